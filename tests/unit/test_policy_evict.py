"""Eviction: a cold start with no room stops idle endpoints, least recently used first, only
where and as much as the placement needs; and the order the queue of cold starts is served
in. Hand-made states, exact commands."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from libs.common.db.enums import EndpointStatus, WorkerStatus
from services.scheduler.events import (
    Command,
    Event,
    RequestArrived,
    RequestDone,
    RequestStarted,
    StopWorker,
    Tick,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.eviction import idle_endpoints, reclaimable_bytes
from services.scheduler.policy import HYDRASERVE, SINGLE_WORKER, Policy
from services.scheduler.state import ClusterState, ModelSpec, NodeState
from tests import policy_timeline
from tests.policy_timeline import GB, node_state, place_whole, run_balanced

pytestmark = pytest.mark.unit



def model_spec(name: str, *, size_gb: int = 13, kv_gb: int = 2,
               ttft_slo_s: float = 7.5) -> ModelSpec:
    return ModelSpec(name=name, size_bytes=size_gb * GB, num_layers=32,
                     kv_cache_bytes=kv_gb * GB, ttft_slo_s=ttft_slo_s, tpot_slo_s=0.1,
                     max_pipeline_degree=4, keep_alive_s=60.0)


# 15 GB a worker, and a small one of 4 GB
LLAMA, MISTRAL, QWEN, GEMMA = (model_spec(n) for n in ("llama", "mistral", "qwen", "gemma"))
TINY = model_spec("tiny", size_gb=3, kv_gb=1)
# TTFT SLOs of 7.5 s, 60 s and 12 s, for the queue order
LATE, LONG, SHORT = (model_spec(n, ttft_slo_s=slo)
                     for n, slo in (("late", 7.5), ("long", 60.0), ("short", 12.0)))
MODELS = (LLAMA, MISTRAL, QWEN, GEMMA, TINY, LATE, LONG, SHORT)


def cluster(*nodes: NodeState) -> ClusterState:
    return policy_timeline.cluster(MODELS, nodes)


place = place_whole


def run(state: ClusterState, timeline: Sequence[tuple[float, Event]], *,
        policy: Policy = SINGLE_WORKER) -> tuple[ClusterState, list[Command]]:
    return run_balanced(policy, state, timeline)


def served(model: ModelSpec, worker_id: int, *, at: float) -> list[tuple[float, Event]]:
    """One request of `model` cold-starts worker `worker_id` at `at` and is done at `at` + 2,
    leaving the endpoint idle with its keep-alive clock at `at` + 2."""
    request_id = f"{model.name}-{at:g}"
    return [(at, RequestArrived(request_id, model.name)), (at + 1, WorkerReady(worker_id)),
            (at + 1, RequestStarted(request_id, worker_id)), (at + 2, RequestDone(request_id))]


def test_a_cold_start_with_no_room_stops_an_idle_endpoint_and_is_placed_once_it_stopped() -> None:
    state, _ = run(cluster(node_state("a", 24)), served(LLAMA, 1, at=0.0))

    evicting, stop = run(state, [(10.0, RequestArrived("r2", "mistral"))])
    state, placed = run(evicting, [(10.1, WorkerStopped(1))])

    assert stop == [StopWorker(1, "a")]
    assert (evicting.endpoints[1].state, evicting.workers[1].state) == (
        EndpointStatus.DRAINING, WorkerStatus.STOPPING)
    assert [r.request_id for r in evicting.queued_requests("mistral")] == ["r2"]
    assert placed == [place(2, "a", MISTRAL)]
    assert list(state.endpoints) == [2]


def test_the_least_recently_used_idle_endpoint_is_stopped_first() -> None:
    state, _ = run(cluster(node_state("a", 16), node_state("b", 16)),
                   served(LLAMA, 1, at=0.0) + served(MISTRAL, 2, at=3.0))
    # mistral's request came after llama's, but llama's endpoint was used last
    state, _ = run(state, [(7.0, RequestArrived("r3", "llama")), (8.0, RequestStarted("r3", 1)),
                           (9.0, RequestDone("r3"))])

    _, commands = run(state, [(10.0, RequestArrived("r4", "qwen"))])

    assert commands == [StopWorker(2, "b")]


def test_an_idle_endpoint_whose_node_would_still_be_too_small_is_not_stopped() -> None:
    # tiny (4 GB, idle longest) is alone on a 12 GB node: stopping it frees too little there
    state, _ = run(cluster(node_state("a", 12), node_state("b", 16)),
                   served(LLAMA, 1, at=0.0) + served(TINY, 2, at=1.0))
    state, _ = run(state, [(5.0, RequestArrived("r3", "llama")), (5.0, RequestStarted("r3", 1)),
                           (7.0, RequestDone("r3"))])

    _, commands = run(state, [(10.0, RequestArrived("r4", "qwen"))])

    assert [(w.model, w.node_id) for w in state.workers.values()] == [("llama", "b"),
                                                                      ("tiny", "a")]
    assert commands == [StopWorker(1, "b")]


def test_an_older_idle_endpoint_the_placement_does_without_is_kept() -> None:
    # tiny (idle longest) and llama share node a; stopping llama alone makes room
    state, _ = run(cluster(node_state("a", 24)),
                   served(TINY, 1, at=0.0) + served(LLAMA, 2, at=3.0))

    _, commands = run(state, [(10.0, RequestArrived("r3", "qwen"))])

    assert commands == [StopWorker(2, "a")]


def test_a_serving_endpoint_is_never_stopped_and_the_cold_start_waits() -> None:
    state, _ = run(cluster(node_state("a", 16)),
                   [(0.0, RequestArrived("r1", "llama")), (1.0, WorkerReady(1)),
                    (1.0, RequestStarted("r1", 1))])

    state, commands = run(state, [(10.0, RequestArrived("r2", "mistral")), (11.0, Tick())])

    assert commands == []
    assert [r.request_id for r in state.queued_requests("mistral")] == ["r2"]


def test_memory_being_freed_for_an_older_cold_start_is_neither_taken_nor_freed_twice() -> None:
    state, _ = run(cluster(node_state("a", 16), node_state("b", 16)),
                   served(LLAMA, 1, at=0.0) + served(MISTRAL, 2, at=3.0))

    state, first = run(state, [(10.0, RequestArrived("r3", "qwen"))])
    state, waiting = run(state, [(10.02, Tick())])
    # the younger cold start cannot have the memory qwen waits for: it evicts mistral
    state, second = run(state, [(10.05, RequestArrived("r4", "gemma"))])
    state, placed = run(state, [(10.1, WorkerStopped(1)), (10.15, WorkerStopped(2))])

    assert (first, waiting, second) == ([StopWorker(1, "a")], [], [StopWorker(2, "b")])
    assert placed == [place(3, "a", QWEN), place(4, "b", GEMMA)]


def test_idle_endpoints_and_reclaimable_memory_leave_out_busy_and_starting_ones() -> None:
    state, _ = run(cluster(node_state("a", 24), node_state("b", 24)),
                   [*served(LLAMA, 1, at=0.0), (3.0, RequestArrived("r2", "mistral")),
                    (4.0, RequestArrived("r3", "tiny"))])

    assert [(w.model, w.node_id, w.state) for w in state.workers.values()] == [
        ("llama", "a", WorkerStatus.READY), ("mistral", "b", WorkerStatus.STARTING),
        ("tiny", "a", WorkerStatus.STARTING)]
    assert [e.model for e in idle_endpoints(state)] == ["llama"]
    assert reclaimable_bytes(state) == {"a": 15 * GB}


def test_hydraserve_evicts_for_its_full_size_head_too() -> None:
    state, _ = run(cluster(node_state("a", 16, nic_gbps=64)), served(LLAMA, 1, at=0.0),
                   policy=HYDRASERVE)

    state, stop = run(state, [(10.0, RequestArrived("r2", "mistral"))], policy=HYDRASERVE)
    _, placed = run(state, [(10.1, WorkerStopped(1))], policy=HYDRASERVE)

    # 13 GB at 64 Gbps: 1.6 s + 0.25 s prefill + 2 s start-up meets 7.5 s with one worker
    assert (stop, placed) == ([StopWorker(1, "a")], [place(2, "a", MISTRAL)])


@pytest.mark.parametrize(("policy", "first"), [(SINGLE_WORKER, SHORT),
                                               (replace(SINGLE_WORKER, deadline_order=False),
                                                LATE)])
def test_the_on_time_cold_start_with_the_earliest_deadline_gets_the_memory_first(
        policy: Policy, first: ModelSpec) -> None:
    # at 20 s: late's deadline (2 + 7.5) has passed; short's (10 + 12) comes before long's
    # (5 + 60). Oldest first (deadline_order off), late would go first.
    state, _ = run(cluster(node_state("a", 16)),
                   [(0.0, RequestArrived("r1", "llama")), (1.0, WorkerReady(1)),
                    (1.0, RequestStarted("r1", 1)), (2.0, RequestArrived("r2", "late")),
                    (5.0, RequestArrived("r3", "long")), (10.0, RequestArrived("r4", "short"))],
                   policy=policy)

    state, stop = run(state, [(20.0, RequestDone("r1"))], policy=policy)
    _, placed = run(state, [(20.1, WorkerStopped(1))], policy=policy)

    assert (stop, placed) == ([StopWorker(1, "a")], [place(2, "a", first)])
