"""The scheduler policy on hand-made states and events: exact commands, exact estimates."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import replace

import pytest

from libs.common.db.enums import EndpointStatus, NodeStatus, WorkerStatus
from services.scheduler.estimator import (
    CostModel,
    DegreeChoice,
    available_bandwidth,
    choose_degree,
    estimate_tpot,
    estimate_ttft,
    worker_gpu_bytes,
)
from services.scheduler.events import (
    Command,
    Event,
    MarkNodeDown,
    NodeDown,
    NodeHeartbeat,
    PlaceWorker,
    RequestArrived,
    RequestDone,
    RequestStarted,
    RequeueRequests,
    StopWorker,
    Tick,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.policy import SINGLE_WORKER, Policy, decide
from services.scheduler.state import ClusterState, Fetch, ModelSpec
from tests.policy_timeline import GB, GBPS, cluster, node_state, place_whole

pytestmark = pytest.mark.unit



def model_spec(name: str = "llama", *, size_bytes: int = 13 * GB, kv_cache_bytes: int = 2 * GB,
               keep_alive_s: float = 60.0) -> ModelSpec:
    return ModelSpec(name=name, size_bytes=size_bytes, num_layers=32,
                     kv_cache_bytes=kv_cache_bytes, ttft_slo_s=7.5, tpot_slo_s=0.1,
                     max_pipeline_degree=4, keep_alive_s=keep_alive_s)


def heartbeat(node_id: str, gpu_gb: int) -> NodeHeartbeat:
    return NodeHeartbeat(node_id, "A10", gpu_memory_bytes=gpu_gb * GB,
                         nic_bandwidth_bytes_per_s=16 * GBPS)


def place(worker_id: int, endpoint_id: int, node_id: str, model: ModelSpec) -> PlaceWorker:
    return place_whole(worker_id, node_id, model, endpoint_id=endpoint_id)


def run(state: ClusterState, timeline: Sequence[tuple[float, Event]], *,
        policy: Policy = SINGLE_WORKER) -> tuple[ClusterState, list[Command]]:
    """Feed events in order; every intermediate state must keep its memory books balanced."""
    commands: list[Command] = []
    for now, event in timeline:
        state, new_commands = policy.decide(state, event, now)
        assert_memory_balanced(state)
        commands += new_commands
    return state, commands


def assert_memory_balanced(state: ClusterState) -> None:
    for node in state.nodes.values():
        used = sum(w.gpu_memory_bytes for w in state.workers_on(node.node_id))
        assert node.free_gpu_memory_bytes == node.gpu_memory_bytes - used, node


LLAMA = model_spec()
MISTRAL = model_spec("mistral")
# the single-worker baseline without eviction: a cold start with no room waits for keep-alive
WAIT_FOR_KEEP_ALIVE = replace(SINGLE_WORKER, evict_idle=False)


def test_a_request_for_a_cold_model_places_one_worker_on_the_node_with_most_free_memory() -> None:
    state = cluster([LLAMA], [node_state("a", 24), node_state("b", 80), node_state("c", 40)])

    state, commands = decide(state, RequestArrived("r1", "llama"), 1.0)

    assert commands == [place(1, 1, "b", LLAMA)]
    assert state.nodes["b"].free_gpu_memory_bytes == 65 * GB
    assert state.nodes["b"].fetches == (Fetch(worker_id=1, num_bytes=13 * GB,
                                              bandwidth_bytes_per_s=16 * GBPS, started_at=1.0,
                                              deadline=8.5),)
    assert (state.endpoints[1].state, state.workers[1].state, state.next_worker_id) == (
        EndpointStatus.STARTING, WorkerStatus.STARTING, 2)


def test_nodes_with_equal_free_memory_are_tied_by_the_smallest_node_id() -> None:
    state = cluster([LLAMA], [node_state("c", 40), node_state("b", 40), node_state("a", 16)])

    _, commands = decide(state, RequestArrived("r1", "llama"), 0.0)

    assert commands == [place(1, 1, "b", LLAMA)]


def test_requests_while_an_endpoint_is_starting_or_ready_place_nothing_more() -> None:
    state = cluster([LLAMA], [node_state("a", 40), node_state("b", 40)])

    state, commands = run(state, [(0.0, RequestArrived("r1", "llama")),
                                  (1.0, RequestArrived("r2", "llama")),
                                  (5.0, WorkerReady(1)),
                                  (6.0, RequestArrived("r3", "llama"))])

    assert commands == [place(1, 1, "a", LLAMA)]
    assert (state.endpoints[1].state, state.endpoints[1].last_request_at) == (
        EndpointStatus.READY, 6.0)
    assert state.nodes["a"].fetches == ()


def test_without_eviction_a_request_that_fits_nowhere_waits_for_keep_alive_to_stop_a_worker(
) -> None:
    policy = WAIT_FOR_KEEP_ALIVE
    state = cluster([LLAMA, MISTRAL], [node_state("a", 24)])
    state, _ = run(state, [(0.0, RequestArrived("r1", "llama")), (2.0, WorkerReady(1)),
                           (3.0, RequestStarted("r1", 1)), (4.0, RequestDone("r1"))],
                   policy=policy)

    waiting, deferred = run(state, [(10.0, RequestArrived("r2", "mistral")), (12.0, Tick())],
                            policy=policy)
    state, stopping = run(waiting, [(63.0, heartbeat("a", 24)), (64.0, Tick())], policy=policy)
    state, freed = run(state, [(65.0, WorkerStopped(1))], policy=policy)

    assert (deferred, [r.request_id for r in waiting.queued_requests("mistral")]) == ([], ["r2"])
    assert stopping == [StopWorker(1, "a")]
    assert freed == [place(2, 2, "a", MISTRAL)]
    assert (list(state.endpoints), state.endpoints[2].model) == ([2], "mistral")


def test_a_deferred_request_stays_queued_while_the_stopping_worker_holds_its_memory() -> None:
    policy = WAIT_FOR_KEEP_ALIVE
    state = cluster([LLAMA, MISTRAL], [node_state("a", 24)])
    state, _ = run(state, [(0.0, RequestArrived("r1", "llama")), (4.0, RequestDone("r1")),
                           (10.0, RequestArrived("r2", "mistral")),
                           (63.0, heartbeat("a", 24)), (64.0, Tick())], policy=policy)

    state, commands = run(state, [(65.0, Tick())], policy=policy)

    assert commands == []
    assert [r.request_id for r in state.queued_requests("mistral")] == ["r2"]
    assert state.workers[1].state is WorkerStatus.STOPPING


def test_an_idle_endpoint_scales_to_zero_exactly_when_keep_alive_has_passed() -> None:
    state = cluster([LLAMA], [node_state("a", 40)])
    state, _ = run(state, [(0.0, RequestArrived("r1", "llama")), (5.0, WorkerReady(1)),
                           (5.5, RequestStarted("r1", 1)), (10.0, RequestDone("r1")),
                           (69.0, heartbeat("a", 40))])

    before_boundary, early = decide(state, Tick(), 69.999)
    at_boundary, on_time = decide(state, Tick(), 70.0)
    stopped, after_stop = decide(at_boundary, WorkerStopped(1), 71.0)

    assert (early, before_boundary) == ([], state)
    assert on_time == [StopWorker(1, "a")]
    assert (at_boundary.endpoints[1].state, at_boundary.workers[1].state) == (
        EndpointStatus.DRAINING, WorkerStatus.STOPPING)
    assert at_boundary.nodes["a"].free_gpu_memory_bytes == 25 * GB
    assert (after_stop, dict(stopped.endpoints), dict(stopped.workers)) == ([], {}, {})
    assert stopped.nodes["a"].free_gpu_memory_bytes == 40 * GB


def test_an_endpoint_with_a_request_in_flight_is_not_scaled_to_zero() -> None:
    state = cluster([LLAMA], [node_state("a", 40)])
    state, _ = run(state, [(0.0, RequestArrived("r1", "llama")), (5.0, WorkerReady(1)),
                           (5.5, RequestStarted("r1", 1)), (499.0, heartbeat("a", 40))])

    _, commands = decide(state, Tick(), 500.0)

    assert commands == []


def test_a_node_silent_past_the_heartbeat_timeout_goes_down_and_its_requests_are_requeued() -> None:
    state = cluster([LLAMA], [node_state("a", 80), node_state("b", 40, last_heartbeat=10.0)])
    state, _ = run(state, [(0.0, RequestArrived("r1", "llama")), (4.0, WorkerReady(1)),
                           (5.0, RequestStarted("r1", 1)), (6.0, RequestArrived("r2", "llama"))])

    state, at_timeout = run(state, [(15.0, Tick())])
    state, past_timeout = run(state, [(15.5, Tick())])

    assert at_timeout == []
    assert past_timeout == [MarkNodeDown("a"), RequeueRequests(1, ("r1",)),
                            place(2, 2, "b", LLAMA)]
    assert (state.nodes["a"].state, state.nodes["a"].free_gpu_memory_bytes) == (
        NodeStatus.DOWN, 80 * GB)
    assert (sorted(state.workers), sorted(state.endpoints)) == ([2], [2])
    assert [r.request_id for r in state.queued_requests("llama")] == ["r1", "r2"]


def test_a_down_node_that_heartbeats_again_is_up_and_used_again() -> None:
    state = cluster([LLAMA], [node_state("a", 40)])
    state, commands = run(state, [(0.0, NodeDown("a")), (1.0, RequestArrived("r1", "llama")),
                                  (2.0, heartbeat("a", 40))])

    assert commands == [MarkNodeDown("a"), place(1, 1, "a", LLAMA)]
    assert state.nodes["a"].state is NodeStatus.UP


def test_a_crashed_worker_requeues_its_requests_and_its_model_is_placed_again() -> None:
    state = cluster([LLAMA], [node_state("a", 40), node_state("b", 30)])
    state, _ = run(state, [(0.0, RequestArrived("r1", "llama")), (4.0, WorkerReady(1)),
                           (5.0, RequestStarted("r1", 1))])

    state, commands = run(state, [(6.0, WorkerStopped(1))])

    assert commands == [RequeueRequests(1, ("r1",)), place(2, 2, "a", LLAMA)]
    assert list(state.endpoints) == [2]


def test_the_same_state_and_events_give_the_same_decisions_whatever_the_mapping_order() -> None:
    nodes = [node_state("a", 24), node_state("b", 24), node_state("c", 48)]
    timeline: list[tuple[float, Event]] = [
        (0.0, RequestArrived("r1", "llama")), (0.5, RequestArrived("r2", "mistral")),
        (1.0, RequestArrived("r3", "qwen")), (3.0, WorkerReady(1)),
        (4.0, RequestStarted("r1", 1)), (9.0, RequestDone("r1")), (17.0, Tick()),
        (70.0, Tick()), (71.0, WorkerStopped(1)), (72.0, Tick()),
    ]
    models = [LLAMA, MISTRAL, model_spec("qwen")]
    forward = cluster(models, nodes)
    backward = cluster(models[::-1], nodes[::-1])
    untouched = copy.deepcopy(forward)

    first = run(forward, timeline)
    second = run(forward, timeline)
    reordered = run(backward, timeline)

    assert first == second == reordered
    assert forward == untouched
    assert any(isinstance(c, MarkNodeDown) for c in first[1])


# --- estimator: DESIGN.md's reference formulas and the published reference case -------------


def reference_choice(bandwidths: Sequence[float]) -> DegreeChoice | None:
    """The published case: a 13 GB model, 7.5 s TTFT SLO; start-up constant 2 s (assumed)."""
    return choose_degree(size_bytes=13 * GB, bandwidths=bandwidths, ttft_slo_s=7.5,
                         tpot_slo_s=0.1, max_degree=4, prefill_s=0.25, tpot_s=0.03,
                         cost=CostModel(startup_s=2.0, per_hop_s=0.002))


def test_ttft_estimates_of_the_reference_model_on_16_gbps() -> None:
    one = estimate_ttft(size_bytes=13 * GB, degree=1, bandwidth_bytes_per_s=16 * GBPS,
                        num_full_size=1, prefill_s=0.25, startup_s=2.0)
    two = estimate_ttft(size_bytes=13 * GB, degree=2, bandwidth_bytes_per_s=16 * GBPS,
                        num_full_size=1, prefill_s=0.25, startup_s=2.0, queue_wait_s=0.5)

    assert one == pytest.approx(6.5 + 0.25 + 2.0)
    assert two == pytest.approx(3.25 + 0.375 + 0.5 + 2.0)


def test_tpot_estimate_adds_the_pipeline_factor_and_one_hop_per_extra_stage() -> None:
    assert estimate_tpot(degree=4, num_full_size=1, tpot_s=0.03, per_hop_s=0.002) == (
        pytest.approx(0.03 * 3.25 + 0.006))


def test_13_gb_on_idle_16_gbps_nodes_with_a_7_5_s_slo_takes_two_stages_one_full_size() -> None:
    choice = reference_choice([16 * GBPS] * 4)

    assert choice is not None
    assert (choice.degree, choice.num_full_size, choice.meets_slo) == (2, 1, True)
    assert choice.ttft_s == pytest.approx(5.625)


def test_13_gb_on_a_64_gbps_node_takes_one_stage() -> None:
    choice = reference_choice([64 * GBPS, 16 * GBPS])

    assert choice is not None
    assert (choice.degree, choice.num_full_size, choice.meets_slo) == (1, 1, True)
    assert choice.ttft_s == pytest.approx(13 / 8 + 0.25 + 2.0)


def test_when_no_degree_meets_the_slo_the_fastest_estimate_is_returned_as_a_miss() -> None:
    choice = reference_choice([GBPS, GBPS])

    assert choice is not None
    assert (choice.degree, choice.meets_slo) == (2, False)
    assert reference_choice([0.0]) is None


def test_available_bandwidth_is_the_nic_share_unless_it_breaks_a_fetch_deadline() -> None:
    nic = 16 * GBPS  # 2 GB/s
    relaxed = Fetch(worker_id=1, num_bytes=4 * GB, bandwidth_bytes_per_s=nic, started_at=0.0,
                    deadline=10.0)
    tight = Fetch(worker_id=2, num_bytes=4 * GB, bandwidth_bytes_per_s=nic, started_at=0.0,
                  deadline=2.5)
    late = Fetch(worker_id=3, num_bytes=40 * GB, bandwidth_bytes_per_s=nic, started_at=0.0,
                 deadline=1.0)

    assert available_bandwidth(nic_bandwidth_bytes_per_s=nic, fetches=[], now=0.0) == nic
    assert available_bandwidth(nic_bandwidth_bytes_per_s=nic, fetches=[relaxed], now=0.0) == (
        nic / 2)
    # tight: 4 GB in 2.5 s needs more than half of 2 GB/s
    assert available_bandwidth(nic_bandwidth_bytes_per_s=nic, fetches=[tight], now=0.0) == 0.0
    # 1 s in, 2 GB are left: 2 GB at 1 GB/s is in by 3.0 > 2.5: still breaks it
    assert available_bandwidth(nic_bandwidth_bytes_per_s=nic, fetches=[tight], now=1.0) == 0.0
    assert available_bandwidth(nic_bandwidth_bytes_per_s=nic, fetches=[late], now=0.0) == nic / 2


def test_gpu_memory_per_worker_follows_the_reference_formula() -> None:
    sizes = [worker_gpu_bytes(size_bytes=13 * GB, kv_cache_bytes=2 * GB + 1, degree=degree,
                              is_full_size=is_full_size)
             for degree, is_full_size in [(1, True), (2, False), (3, False), (4, True)]]

    assert sizes == [15 * GB + 1, 7_500_000_001, 5 * GB + 1, 15 * GB + 1]


def test_the_policy_modules_import_no_database_or_bus_stack() -> None:
    script = ("import json, sys\n"
              "import services.scheduler.policy, services.scheduler.estimator\n"
              "print(json.dumps(sorted(m for m in sys.modules"
              " if m.split('.')[0] in ('sqlalchemy', 'asyncpg', 'alembic', 'nats'))))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert json.loads(result.stdout) == []
