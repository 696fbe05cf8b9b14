"""The `hydraserve` policy on hand-made states: SLO-aware pipeline cold starts, consolidation,
calibration, the baselines, and their mapping to bus messages. Exact outcomes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from libs.common.db.enums import EndpointStatus, WorkerStatus
from libs.common.messages import ConsolidateCommand, Event, EventKind, PlaceWorkerCommand
from libs.common.subjects import command_subject
from services.scheduler.commands import Outgoing, to_outgoing, to_policy_event
from services.scheduler.events import (
    AnnouncePipeline,
    Command,
    Consolidate,
    PipelineStage,
    PlaceWorker,
    RequestArrived,
    RequestDone,
    RequestStarted,
    StopWorker,
    WorkerConsolidated,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.events import Event as PolicyEvent
from services.scheduler.policy import HYDRASERVE, POLICIES, SERVERLESS_VLLM, SINGLE_WORKER, Policy
from services.scheduler.state import ClusterState, Fetch, ModelSpec, ModelTimings, NodeState
from tests.policy_timeline import GB, GBPS, cluster, node_state, run_balanced

pytestmark = pytest.mark.unit


# The published reference case: 13 GB of weights, a 7.5 s TTFT SLO, 16 Gbps NICs (2 GB/s),
# and the cost model's defaults: start-up 2 s, prefill 0.25 s, TPOT 30 ms, 2 ms a hop.
# Degree 1: 6.5 + 0.25 + 2 = 8.75 s > 7.5 s; degree 2: 3.25 + 0.25 * 1.5 + 2 = 5.625 s.
LLAMA = ModelSpec(name="llama", size_bytes=13 * GB, num_layers=32, kv_cache_bytes=1 * GB,
                  ttft_slo_s=7.5, tpot_slo_s=0.1, max_pipeline_degree=4, keep_alive_s=60.0,
                  stage_boundaries={2: (0, 16, 32), 3: (0, 11, 22, 32), 4: (0, 8, 16, 24, 32)},
                  stage_bytes={2: (6_600_000_000, 6_400_000_000)})
FULL = 14 * GB  # weights + KV cache: the full-size worker
HALF = 7 * GB  # ceil(14 GB / 2): a partial worker of a degree-2 pipeline


def place(worker_id: int, node_id: str, *, degree: int, stage: int, layers: tuple[int, int],
          gpu_bytes: int, endpoint_id: int = 1, model: str = "llama",
          overlap: bool = True) -> PlaceWorker:
    return PlaceWorker(worker_id=worker_id, endpoint_id=endpoint_id, node_id=node_id,
                       model=model, pipeline_degree=degree, stage=stage, start_layer=layers[0],
                       end_layer=layers[1], gpu_memory_bytes=gpu_bytes,
                       is_full_size=stage == 0, overlap=overlap)


def run(policy: Policy, state: ClusterState, timeline: Sequence[tuple[float, PolicyEvent]]
        ) -> tuple[ClusterState, list[Command]]:
    return run_balanced(policy, state, timeline)


# four idle 16 Gbps nodes; c has the most free memory, d too little for a full copy
IDLE = [node_state("a", 24), node_state("b", 40), node_state("c", 80), node_state("d", 10)]
PIPELINE_PLACED = [place(1, "c", degree=2, stage=0, layers=(0, 16), gpu_bytes=FULL),
                   place(2, "b", degree=2, stage=1, layers=(16, 32), gpu_bytes=HALF)]


def test_13_gb_on_idle_16_gbps_nodes_gets_two_stages_with_the_full_size_worker_on_stage_0(
) -> None:
    state, commands = run(HYDRASERVE, cluster([LLAMA], IDLE),
                          [(0.0, RequestArrived("r1", "llama"))])

    assert commands == PIPELINE_PLACED
    # each stage fetches its own partition's bytes, at its node's whole NIC
    assert (state.nodes["c"].fetches, state.nodes["b"].fetches) == (
        (Fetch(1, 6_600_000_000, 16 * GBPS, started_at=0.0, deadline=7.5),),
        (Fetch(2, 6_400_000_000, 16 * GBPS, started_at=0.0, deadline=7.5),))
    assert (state.endpoints[1].pipeline_degree, state.endpoints[1].state) == (
        2, EndpointStatus.STARTING)


def test_13_gb_with_a_64_gbps_node_gets_one_worker_there() -> None:
    nodes = [*IDLE, node_state("fast", 24, nic_gbps=64)]

    _, commands = run(HYDRASERVE, cluster([LLAMA], nodes), [(0.0, RequestArrived("r1", "llama"))])

    assert commands == [place(1, "fast", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL)]


def test_a_node_whose_share_would_make_a_fetch_in_flight_miss_its_deadline_is_not_chosen(
) -> None:
    # 4 GB due in 2.5 s: on time at the whole 2 GB/s NIC, late at half of it
    tight = Fetch(worker_id=99, num_bytes=4 * GB, bandwidth_bytes_per_s=16 * GBPS,
                  started_at=0.0, deadline=2.5)
    nodes = [node_state("a", 80, fetches=(tight,)), node_state("b", 40), node_state("c", 24)]

    _, commands = HYDRASERVE.decide(cluster([LLAMA], nodes), RequestArrived("r1", "llama"), 0.0)

    assert commands == [place(1, "b", degree=2, stage=0, layers=(0, 16), gpu_bytes=FULL),
                        place(2, "c", degree=2, stage=1, layers=(16, 32), gpu_bytes=HALF)]


def test_the_stages_of_a_pipeline_go_behind_different_nics() -> None:
    # c and b are GPUs of one server: one NIC. Two stages there would share its 2 GB/s, so
    # stage 1 goes to a, the next fastest behind another NIC
    nodes = [node_state("a", 24, nic_id="s2"), node_state("b", 40, nic_id="s1"),
             node_state("c", 80, nic_id="s1")]

    _, commands = run(HYDRASERVE, cluster([LLAMA], nodes), [(0.0, RequestArrived("r1", "llama"))])

    assert commands == [place(1, "c", degree=2, stage=0, layers=(0, 16), gpu_bytes=FULL),
                        place(2, "a", degree=2, stage=1, layers=(16, 32), gpu_bytes=HALF)]


def test_a_fetch_on_one_gpu_of_a_server_halves_the_share_of_the_others() -> None:
    busy = Fetch(worker_id=99, num_bytes=1 * GB, bandwidth_bytes_per_s=16 * GBPS,
                 started_at=0.0, deadline=100.0)
    nodes = [node_state("g0", 40, nic_id="s1", fetches=(busy,)), node_state("g1", 40,
                                                                             nic_id="s1")]

    state, _ = run(SINGLE_WORKER, cluster([LLAMA], nodes), [(0.0, RequestArrived("r1", "llama"))])

    (planned,) = [f for n in state.nodes.values() for f in n.fetches if f.worker_id == 1]
    assert planned.bandwidth_bytes_per_s == 16 * GBPS / 2


def test_when_no_degree_meets_the_slo_one_whole_model_worker_is_placed() -> None:
    # 1 Gbps: even 4 stages fetch for 26 s
    nodes = [node_state(name, gb, nic_gbps=1) for name, gb in [("a", 24), ("b", 40), ("c", 40),
                                                                ("d", 40)]]

    state, commands = HYDRASERVE.decide(cluster([LLAMA], nodes), RequestArrived("r1", "llama"),
                                        0.0)

    assert commands == [place(1, "b", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL)]
    assert state.nodes["b"].fetches == (Fetch(1, 13 * GB, GBPS, started_at=0.0, deadline=7.5),)


def test_no_node_holding_a_full_copy_defers_the_cold_start() -> None:
    nodes = [node_state(name, 10) for name in "abcd"]  # room for partial workers only

    state, commands = HYDRASERVE.decide(cluster([LLAMA], nodes), RequestArrived("r1", "llama"),
                                        0.0)

    assert commands == []
    assert [r.request_id for r in state.queued_requests("llama")] == ["r1"]


def test_a_degree_without_known_layer_boundaries_is_no_candidate() -> None:
    only_four = ModelSpec(name="llama", size_bytes=13 * GB, num_layers=32, kv_cache_bytes=1 * GB,
                          ttft_slo_s=7.5, tpot_slo_s=0.2, max_pipeline_degree=4,
                          keep_alive_s=60.0, stage_boundaries={4: (0, 8, 16, 24, 32)})
    nodes = [node_state(name, 40) for name in "abcde"]

    state, commands = HYDRASERVE.decide(cluster([only_four], nodes),
                                        RequestArrived("r1", "llama"), 0.0)

    quarter = 3_500_000_000  # ceil(14 GB / 4)
    assert commands == [
        place(1, "a", degree=4, stage=0, layers=(0, 8), gpu_bytes=FULL),
        place(2, "b", degree=4, stage=1, layers=(8, 16), gpu_bytes=quarter),
        place(3, "c", degree=4, stage=2, layers=(16, 24), gpu_bytes=quarter),
        place(4, "d", degree=4, stage=3, layers=(24, 32), gpu_bytes=quarter)]
    # partition sizes unknown: each stage fetches size / p
    assert state.nodes["d"].fetches[0].num_bytes == 3_250_000_000


def test_when_every_stage_is_ready_the_pipeline_is_announced_and_consolidation_starts() -> None:
    state, _ = run(HYDRASERVE, cluster([LLAMA], IDLE), [(0.0, RequestArrived("r1", "llama"))])

    state, first = run(HYDRASERVE, state, [(4.0, WorkerReady(2))])
    state, second = run(HYDRASERVE, state, [(5.0, WorkerReady(1))])

    assert first == []
    assert second == [
        AnnouncePipeline(endpoint_id=1, model="llama", degree=2, stages=(
            PipelineStage(worker_id=1, node_id="c", stage=0, start_layer=0, end_layer=16),
            PipelineStage(worker_id=2, node_id="b", stage=1, start_layer=16, end_layer=32))),
        Consolidate(endpoint_id=1, worker_id=1, node_id="c", model="llama", degree=2,
                    stages=(1,), partial_worker_ids=(2,))]
    assert state.endpoints[1].state is EndpointStatus.READY


def test_single_worker_announces_no_pipeline() -> None:
    state = cluster([LLAMA], IDLE)

    _, commands = run(SINGLE_WORKER, state, [(0.0, RequestArrived("r1", "llama")),
                                             (5.0, WorkerReady(1))])

    assert commands == [place(1, "c", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL)]


def test_a_consolidated_worker_takes_the_whole_model_and_only_the_partial_workers_stop() -> None:
    state, _ = run(HYDRASERVE, cluster([LLAMA], IDLE), [
        (0.0, RequestArrived("r1", "llama")), (4.0, WorkerReady(1)), (5.0, WorkerReady(2)),
        (5.5, RequestStarted("r1", 1))])

    consolidated, stopping = run(HYDRASERVE, state, [(9.0, WorkerConsolidated(1))])
    state, stopped = run(HYDRASERVE, consolidated, [(10.0, WorkerStopped(2))])

    assert stopping == [StopWorker(2, "b")]
    worker = consolidated.workers[1]
    assert (worker.start_layer, worker.end_layer, worker.state) == (0, 32, WorkerStatus.READY)
    assert consolidated.endpoints[1].pipeline_degree == 1
    assert consolidated.nodes["b"].free_gpu_memory_bytes == 40 * GB - HALF
    assert stopped == []
    assert (list(state.workers), state.endpoints[1].state) == ([1], EndpointStatus.READY)
    assert state.nodes["b"].free_gpu_memory_bytes == 40 * GB
    assert state.requests["r1"].worker_id == 1


def test_a_partial_worker_dying_before_consolidation_breaks_the_endpoint() -> None:
    state, _ = run(HYDRASERVE, cluster([LLAMA], IDLE), [
        (0.0, RequestArrived("r1", "llama")), (4.0, WorkerReady(1)), (5.0, WorkerReady(2))])

    state, commands = run(HYDRASERVE, state, [(6.0, WorkerStopped(2))])

    # r1 has waited 6 s already: no degree meets the 7.5 s SLO, so one worker starts over
    assert commands == [StopWorker(1, "c"),
                        place(3, "c", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL,
                              endpoint_id=2)]
    assert state.endpoints[1].state is EndpointStatus.DRAINING


def test_a_measured_start_up_constant_changes_the_chosen_degree() -> None:
    mistral = ModelSpec(**{**LLAMA.__dict__, "name": "mistral"})
    nodes = [node_state(name, 40) for name in "abcd"]
    # planned fetches: 6.6 GB and 6.4 GB at 2 GB/s, i.e. 3.3 s and 3.2 s inside the spans
    state, placed = run(HYDRASERVE, cluster([LLAMA, mistral], nodes), [
        (0.0, RequestArrived("r1", "llama")), (3.8, WorkerReady(1, startup_s=3.8)),
        (3.9, WorkerReady(2, startup_s=3.7))])

    state, commands = run(HYDRASERVE, state, [(4.0, RequestArrived("r2", "mistral"))])

    assert [c.pipeline_degree for c in placed if isinstance(c, PlaceWorker)] == [2, 2]
    assert state.calibration.startup_s == pytest.approx(0.5)
    # 6.5 + 0.25 + 0.5 = 7.25 s: one worker meets the 7.5 s SLO now
    assert commands == [place(3, "c", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL,
                              endpoint_id=2, model="mistral")]


def test_the_start_up_measurement_is_a_moving_average_of_the_time_beyond_the_fetch() -> None:
    state, _ = run(HYDRASERVE, cluster([LLAMA], IDLE), [
        (0.0, RequestArrived("r1", "llama")), (4.0, WorkerReady(1, startup_s=4.3)),
        (5.0, WorkerReady(2, startup_s=5.2))])

    # 4.3 - 3.3 = 1.0 s, then 5.2 - 3.2 = 2.0 s with weight 0.3
    assert state.calibration.startup_s == pytest.approx(1.3)


def test_without_overlap_the_whole_start_up_span_is_the_start_up_constant() -> None:
    state, commands = run(SERVERLESS_VLLM, cluster([LLAMA], IDLE), [
        (0.0, RequestArrived("r1", "llama")), (9.0, WorkerReady(1, startup_s=3.0))])

    assert commands == [place(1, "c", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL,
                              overlap=False)]
    assert state.calibration.startup_s == 3.0


def test_request_times_calibrate_only_from_a_whole_model_worker() -> None:
    state, _ = run(HYDRASERVE, cluster([LLAMA], IDLE), [
        (0.0, RequestArrived("r1", "llama")), (4.0, WorkerReady(1)), (5.0, WorkerReady(2)),
        (5.5, RequestStarted("r1", 1)), (6.0, RequestArrived("r2", "llama")),
        (6.5, RequestStarted("r2", 1))])

    piped, _ = run(HYDRASERVE, state, [(7.0, RequestDone("r1", prefill_s=0.9, tpot_s=0.09))])
    whole, _ = run(HYDRASERVE, piped, [(8.0, WorkerConsolidated(1)),
                                       (9.0, RequestDone("r2", prefill_s=0.4, tpot_s=0.02))])

    assert piped.calibration.models == {}
    assert whole.calibration.models == {"llama": ModelTimings(prefill_s=0.4, tpot_s=0.02)}


def test_the_policies_are_registered_by_their_baseline_names() -> None:
    assert POLICIES == {"serverless_vllm": SERVERLESS_VLLM, "single_worker": SINGLE_WORKER,
                        "hydraserve": HYDRASERVE}
    assert (HYDRASERVE.consolidate, SERVERLESS_VLLM.overlap, SINGLE_WORKER.consolidate) == (
        True, False, False)


# --- mapping to and from the bus -------------------------------------------------------------


def test_a_pipeline_announce_is_an_event_only() -> None:
    command = AnnouncePipeline(endpoint_id=1, model="llama", degree=2, stages=(
        PipelineStage(worker_id=1, node_id="c", stage=0, start_layer=0, end_layer=16),
        PipelineStage(worker_id=2, node_id="b", stage=1, start_layer=16, end_layer=32)))

    outgoing = to_outgoing(command, storage_url="http://store", epoch="e1")

    assert outgoing is not None
    assert (outgoing.subject, outgoing.message, outgoing.command_id) == (None, None, None)
    event = outgoing.event
    assert (event.kind, event.endpoint_id, event.model) == (
        EventKind.ENDPOINT_PIPELINE_READY, "1", "llama")
    assert event.data == {"degree": 2, "stages": [
        {"worker_id": "1", "node_id": "c", "stage": 0, "start_layer": 0, "end_layer": 16},
        {"worker_id": "2", "node_id": "b", "stage": 1, "start_layer": 16, "end_layer": 32}]}


def test_consolidate_goes_to_the_full_size_workers_node_with_its_event() -> None:
    command = Consolidate(endpoint_id=1, worker_id=1, node_id="c", model="llama", degree=3,
                          stages=(1, 2), partial_worker_ids=(2, 3))

    outgoing = to_outgoing(command, storage_url="http://store", storage_model="llama-st",
                           epoch="e1")

    assert isinstance(outgoing, Outgoing) and isinstance(outgoing.message, ConsolidateCommand)
    message = outgoing.message
    assert (outgoing.subject, outgoing.command_id) == (command_subject("node", "c"),
                                                       "consolidate-w1-e1")
    assert message == ConsolidateCommand(
        command_id="consolidate-w1-e1", worker_id="1", endpoint_id="1", node_id="c",
        model="llama", degree=3, stages=[1, 2], partial_worker_ids=["2", "3"],
        storage_url="http://store", storage_model="llama-st", issued_at=message.issued_at)
    event = outgoing.event
    assert (event.kind, event.endpoint_id, event.worker_id, event.node_id) == (
        EventKind.ENDPOINT_CONSOLIDATE, "1", "1", "c")
    assert event.data == message.model_dump(mode="json", exclude={"type"})


def test_place_worker_carries_full_size_and_overlap() -> None:
    command = place(2, "b", degree=2, stage=1, layers=(16, 32), gpu_bytes=HALF, overlap=False)

    outgoing = to_outgoing(command, storage_url="http://store", epoch="e1")

    assert outgoing is not None and isinstance(outgoing.message, PlaceWorkerCommand)
    assert (outgoing.message.is_full_size, outgoing.message.overlap) == (False, False)


def test_bus_events_carry_the_measurements_to_the_policy() -> None:
    ready = Event(kind=EventKind.WORKER_READY, worker_id="3", data={
        "load_s": 2.0, "phases": {"process_started_at": 100.0, "loaded_at": 103.0,
                                  "ready_at": 104.5}})
    done = Event(kind=EventKind.REQUEST_DONE, request_id="r1", worker_id="3", data={
        "queue_s": 1.0, "ttft_s": 1.4, "e2e_s": 2.4, "usage": {
            "prompt_tokens": 5, "completion_tokens": 11, "total_tokens": 16}})
    consolidated = Event(kind=EventKind.WORKER_CONSOLIDATED, worker_id="3")

    events = [to_policy_event(e) for e in (ready, done, consolidated)]

    assert events[0] == WorkerReady(3, startup_s=4.5)
    assert isinstance(events[1], RequestDone)
    assert (events[1].prefill_s, events[1].tpot_s) == (pytest.approx(0.4), pytest.approx(0.1))
    assert events[2] == WorkerConsolidated(3)
    assert to_policy_event(Event(kind=EventKind.WORKER_READY, worker_id="3")) == WorkerReady(3)



# --- the host-memory cache -------------------------------------------------------------------


def cached(node: NodeState, *labels: str) -> NodeState:
    return NodeState(**{**node.__dict__, "cached": frozenset(labels)})


def test_a_node_holding_the_model_in_host_memory_gets_a_single_worker_and_no_fetch() -> None:
    nodes = [node_state("a", 24), cached(node_state("b", 40), "llama/1/0"),
             node_state("c", 80)]

    state, commands = run(HYDRASERVE, cluster([LLAMA], nodes),
                          [(0.0, RequestArrived("r1", "llama"))])

    # without the cache this SLO needs two stages (the test above); from memory one suffices
    assert commands == [place(1, "b", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL)]
    assert state.nodes["b"].fetches == ()


@pytest.mark.parametrize("policy", [SINGLE_WORKER, SERVERLESS_VLLM], ids=["single", "vllm"])
def test_the_baselines_prefer_the_node_with_the_cached_model(policy: Policy) -> None:
    nodes = [node_state("a", 24), cached(node_state("b", 40), "llama/1/0", "other/1/0"),
             node_state("c", 80)]

    _, commands = run(policy, cluster([LLAMA], nodes), [(0.0, RequestArrived("r1", "llama"))])

    assert commands == [place(1, "b", degree=1, stage=0, layers=(0, 32), gpu_bytes=FULL,
                              overlap=policy.overlap)]


def test_a_cached_stage_of_a_pipeline_does_not_count_as_the_whole_model() -> None:
    nodes = [node_state("a", 24), cached(node_state("b", 40), "llama/2/0"),
             node_state("c", 80), node_state("d", 10)]

    _, commands = run(HYDRASERVE, cluster([LLAMA], nodes), [(0.0, RequestArrived("r1", "llama"))])

    assert commands == PIPELINE_PLACED


def test_heartbeats_carry_the_cached_partitions_to_the_policy() -> None:
    info = {"node_id": "n1", "gpu_type": "cpu", "gpu_memory_bytes": GB,
            "nic_bandwidth_bytes_per_s": GBPS, "cached": ["llama/1/0"]}
    event = to_policy_event(Event(kind=EventKind.NODE_HEARTBEAT, node_id="n1", data=info))

    state, _ = HYDRASERVE.decide(cluster([LLAMA], []), event, 0.0)  # type: ignore[arg-type]

    assert state.nodes["n1"].cached == frozenset({"llama/1/0"})
    assert state.nodes["n1"].holds_model("llama")


# --- a fixed degree (experiments, bench/coldstart.py) ----------------------------------------


def test_a_fixed_degree_places_that_many_stages_whatever_the_slo() -> None:
    import dataclasses
    import functools

    from services.scheduler.placement import place_fixed_degree

    policy = dataclasses.replace(HYDRASERVE, placer=functools.partial(place_fixed_degree,
                                                                      degree=4))
    nodes = [node_state("a", 24), node_state("b", 40), node_state("c", 80),
             node_state("e", 24)]
    quarter = -(-(14 * GB) // 4)

    _, commands = run(policy, cluster([LLAMA], nodes), [(0.0, RequestArrived("r1", "llama"))])

    assert commands == [
        place(1, "c", degree=4, stage=0, layers=(0, 8), gpu_bytes=FULL),
        place(2, "b", degree=4, stage=1, layers=(8, 16), gpu_bytes=quarter),
        place(3, "a", degree=4, stage=2, layers=(16, 24), gpu_bytes=quarter),
        place(4, "e", degree=4, stage=3, layers=(24, 32), gpu_bytes=quarter),
    ]


def test_a_fixed_degree_shrinks_to_the_nodes_there_are() -> None:
    import dataclasses
    import functools

    from services.scheduler.placement import place_fixed_degree

    policy = dataclasses.replace(HYDRASERVE, placer=functools.partial(place_fixed_degree,
                                                                      degree=4))

    _, commands = run(policy, cluster([LLAMA], [node_state("b", 40), node_state("c", 80)]),
                      [(0.0, RequestArrived("r1", "llama"))])

    assert commands == PIPELINE_PLACED
