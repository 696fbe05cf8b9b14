"""Scale-out and scale-in: a model whose queued requests outnumber its READY endpoints' free
slots gets another endpoint, when no cold start waits and no fetch is in flight (never by
evicting, at most `max_endpoints_per_model`); an endpoint its load no longer needs stops
after the keep-alive, an idle one first, a busy one draining. Hand-made states, exact
commands; endpoints of 2 slots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pytest

from libs.common.db.enums import EndpointStatus, WorkerStatus
from services.scheduler.events import (
    Command,
    Event,
    PlaceWorker,
    RequestArrived,
    RequestDone,
    RequestStarted,
    StopWorker,
    Tick,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.policy import SINGLE_WORKER, Policy, PolicyConfig
from services.scheduler.scaling import endpoints_to_scale_in
from services.scheduler.state import ClusterState, ModelSpec
from tests import policy_timeline
from tests.policy_timeline import GB, node_state, place_whole, run_balanced

pytestmark = pytest.mark.unit

# a 15 GB worker, keep-alive 60 s; and a 4 GB one
LLAMA = ModelSpec(name="llama", size_bytes=13 * GB, num_layers=32, kv_cache_bytes=2 * GB,
                  ttft_slo_s=7.5, tpot_slo_s=0.1, max_pipeline_degree=4, keep_alive_s=60.0)
TINY = replace(LLAMA, name="tiny", size_bytes=3 * GB, kv_cache_bytes=1 * GB)
# 2 requests an endpoint, at most 2 endpoints a model; nodes never time out
POLICY = replace(SINGLE_WORKER, config=PolicyConfig(
    heartbeat_timeout_s=math.inf, endpoint_capacity=2, max_endpoints_per_model=2))


def three_nodes() -> ClusterState:
    """Three 24 GB nodes: one llama worker each."""
    return policy_timeline.cluster([LLAMA, TINY], [node_state(n, 24) for n in "abc"])


def place(worker_id: int, node_id: str, model: ModelSpec = LLAMA) -> PlaceWorker:
    return place_whole(worker_id, node_id, model)


def scale_out(worker_id: int, node_id: str) -> PlaceWorker:
    """A llama worker placed as extra capacity (its `worker.placed` says `scale_out`)."""
    return replace(place(worker_id, node_id), is_scale_out=True)


def run(state: ClusterState, timeline: Sequence[tuple[float, Event]], *,
        policy: Policy = POLICY) -> tuple[ClusterState, list[Command]]:
    return run_balanced(policy, state, timeline)


def arrivals(*times: float) -> list[tuple[float, Event]]:
    return [(t, RequestArrived(f"r{i}", "llama")) for i, t in enumerate(times, start=1)]


def two_endpoints_serving() -> ClusterState:
    """r1 and r2 run on endpoint 1 (full), r3 on endpoint 2 (placed when endpoint 1 was
    ready, at t = 1, with 3 requests queued for its 2 slots; ready at t = 2)."""
    state, commands = run(three_nodes(), [
        *arrivals(0.0, 0.1, 0.2), (1.0, WorkerReady(1)), (1.0, RequestStarted("r1", 1)),
        (1.0, RequestStarted("r2", 1)), (2.0, WorkerReady(2)), (2.0, RequestStarted("r3", 2))])
    assert commands == [place(1, "a"), scale_out(2, "b")]
    return state


def test_no_scale_out_while_the_models_endpoint_starts_then_one_for_the_third_request() -> None:
    starting, commands = run(three_nodes(), arrivals(0.0, 0.1, 0.2, 0.3))
    # r3 and r4 outnumber the starting endpoint's 2 slots, but its cold start comes first
    assert commands == [place(1, "a")]

    state, commands = run(starting, [(1.0, WorkerReady(1))])
    assert commands == [scale_out(2, "b")]
    assert [(e.endpoint_id, e.state) for e in state.endpoints.values()] == [
        (1, EndpointStatus.READY), (2, EndpointStatus.STARTING)]
    # a fifth request would need a third endpoint: at most 2 a model
    _, commands = run(state, [(3.0, WorkerReady(2)), (3.5, RequestArrived("r5", "llama"))])
    assert commands == []


def test_running_requests_take_slots_and_a_free_slot_takes_the_next_request() -> None:
    state, _ = run(three_nodes(), [*arrivals(0.0), (1.0, WorkerReady(1)),
                                   (1.0, RequestStarted("r1", 1))])

    # one slot free: r2 fits
    state, commands = run(state, [(2.0, RequestArrived("r2", "llama"))])
    assert commands == []
    # both slots taken: r3 waits for nothing, a second endpoint starts
    state, commands = run(state, [(2.5, RequestStarted("r2", 1)),
                                  (3.0, RequestArrived("r3", "llama"))])
    assert commands == [scale_out(2, "b")]


def test_without_scale_out_the_queue_waits_for_the_one_endpoint() -> None:
    _, commands = run(three_nodes(), arrivals(0.0, 0.1, 0.2, 0.3),
                      policy=replace(POLICY, scale_out=False))

    assert commands == [place(1, "a")]


def test_a_scale_out_never_evicts_an_idle_endpoint() -> None:
    # tiny sits idle on a (12 GB left there); llama serves on b; a second llama worker fits
    # only where tiny is
    state, _ = run(policy_timeline.cluster([LLAMA, TINY], [node_state("a", 16),
                                                           node_state("b", 16)]),
                   [(0.0, RequestArrived("t1", "tiny")), (1.0, WorkerReady(1)),
                    (1.0, RequestStarted("t1", 1)), (2.0, RequestDone("t1")), *arrivals(3.0),
                    (4.0, WorkerReady(2)), (4.0, RequestStarted("r1", 2))])
    assert [(w.model, w.node_id) for w in state.workers.values()] == [("tiny", "a"),
                                                                      ("llama", "b")]

    state, commands = run(state, arrivals(5.0, 5.1, 5.2)[1:])

    assert commands == []
    assert [r.request_id for r in state.queued_requests("llama")] == ["r2", "r3"]


def test_an_extra_endpoint_its_load_left_stops_after_the_keep_alive_and_drains() -> None:
    state = two_endpoints_serving()
    # r3 (the only request endpoint 2 ran) is done; 2 requests fit endpoint 1 alone
    state, _ = run(state, [(5.0, RequestDone("r3"))])

    # endpoint 2's clock started at its placement (1.0): due at 61; it is idle, so it goes
    # rather than endpoint 1, which runs r1 and r2
    state, before = run(state, [(60.9, Tick())])
    state, commands = run(state, [(61.0, Tick())])

    assert (before, commands) == ([], [StopWorker(2, "b")])
    assert state.endpoints[1].state is EndpointStatus.READY
    assert (state.endpoints[2].state, state.workers[2].state) == (EndpointStatus.DRAINING,
                                                                  WorkerStatus.STOPPING)
    state, _ = run(state, [(61.1, WorkerStopped(2))])
    assert list(state.endpoints) == [1]


def test_an_extra_endpoint_stays_while_the_requests_need_it_and_drains_what_it_runs() -> None:
    state = two_endpoints_serving()

    # 3 requests need both endpoints, whatever the clock says
    state, commands = run(state, [(70.0, Tick())])
    assert commands == []
    assert endpoints_to_scale_in(state, 70.0, default_capacity=2) == []

    # r1 is done: 2 requests fit one endpoint; each runs one, so the newer goes, draining r3
    state, commands = run(state, [(71.0, RequestDone("r1")), (71.5, Tick())])
    assert commands == [StopWorker(2, "b")]
    assert state.requests["r3"].worker_id == 2  # not requeued: it finishes where it runs
    state, commands = run(state, [(72.0, RequestDone("r3")), (72.5, WorkerStopped(2))])
    assert commands == []
    assert list(state.endpoints) == [1]
    assert sorted(state.requests) == ["r2"]


def test_the_extra_endpoints_clock_runs_only_while_the_load_exceeds_the_endpoints_before_it(
) -> None:
    state = two_endpoints_serving()
    # r4 arrives while 3 run (4 > 2: endpoint 2 is needed, its clock restarts at 30), and
    # when r4 is done 3 are left (still needed, at 32); after r3, 2 fit endpoint 1
    state, _ = run(state, [(30.0, RequestArrived("r4", "llama")),
                           (31.0, RequestStarted("r4", 2)), (32.0, RequestDone("r4")),
                           (33.0, RequestDone("r3"))])

    assert [state.endpoints[i].last_request_at for i in (1, 2)] == [33.0, 32.0]
    _, commands = run(state, [(91.9, Tick())])
    assert commands == []
    _, commands = run(state, [(92.0, Tick())])
    assert commands == [StopWorker(2, "b")]


def test_the_oldest_endpoint_keeps_the_models_keep_alive() -> None:
    state = two_endpoints_serving()
    state, _ = run(state, [(5.0, RequestDone("r1")), (5.0, RequestDone("r2")),
                           (5.0, RequestDone("r3"))])

    # both idle: at 61 the newer one goes; at 65 (keep-alive after the last request) the
    # model scales to zero
    state, extra = run(state, [(61.0, Tick())])
    _, last = run(state, [(65.0, Tick())])

    assert (extra, last) == ([StopWorker(2, "b")], [StopWorker(1, "a")])


def test_the_config_refuses_an_endpoint_of_no_slots() -> None:
    with pytest.raises(ValueError, match="endpoint_capacity"):
        PolicyConfig(endpoint_capacity=0)


def test_a_scale_out_waits_until_no_fetch_is_in_flight() -> None:
    state, _ = run(three_nodes(), [*arrivals(0.0, 0.0), (1.0, WorkerReady(1)),
                                   (1.0, RequestStarted("r1", 1)), (1.0, RequestStarted("r2", 1))])
    # tiny's cold start fetches; llama's third request waits for it
    state, commands = run(state, [(2.0, RequestArrived("t1", "tiny")),
                                  (2.5, RequestArrived("r3", "llama"))])
    assert [(c.worker_id, c.model) for c in commands if isinstance(c, PlaceWorker)] == [
        (2, "tiny")]

    _, commands = run(state, [(3.0, WorkerReady(2))])

    assert [(c.worker_id, c.model) for c in commands if isinstance(c, PlaceWorker)] == [
        (3, "llama")]


def test_the_capacity_a_worker_reports_when_ready_counts_instead_of_the_default() -> None:
    state, commands = run(three_nodes(), [*arrivals(0.0, 0.0), (1.0, WorkerReady(1, capacity=1)),
                                          (1.0, RequestStarted("r1", 1))])

    # 1 slot, taken: r2 outnumbers it (with the default 2 slots it would fit)
    assert commands == [place(1, "a"), scale_out(2, "b")]
    assert state.workers[1].capacity == 1


def test_a_cold_start_stops_a_scale_out_still_starting_and_it_comes_back_later() -> None:
    state, _ = run(three_nodes(), [*arrivals(0.0, 0.0), (1.0, WorkerReady(1)),
                                   (1.0, RequestStarted("r1", 1)), (1.0, RequestStarted("r2", 1)),
                                   (2.0, RequestArrived("r3", "llama"))])
    assert state.endpoints[2].state is EndpointStatus.STARTING  # r3's scale-out, fetching

    # tiny has no endpoint at all: the scale-out gives way (its fetch and memory)
    state, commands = run(state, [(3.0, RequestArrived("t1", "tiny"))])
    assert commands == [StopWorker(2, "b"), place(3, "c", TINY)]
    assert [r.request_id for r in state.queued_requests("llama")] == ["r3"]

    # tiny's fetch is done, none is in flight: llama scales out again (b's memory is not
    # back yet; c has room)
    _, commands = run(state, [(4.0, WorkerReady(3))])
    assert commands == [scale_out(4, "c")]
