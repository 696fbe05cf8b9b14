"""Event replay: a log recorded by running the real policy as the scheduler service would
(ticks at its own phase, decisions a little after the events) replays without divergence;
an altered log diverges at exactly the decision it changes."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import pytest

from hydraserve.cli import build_parser
from hydraserve.replay import PROCESSING_LAG_S, replay
from libs.common.messages import Event, EventKind, NodeInfo
from services.scheduler import events as policy
from services.scheduler.commands import (
    model_registered_event,
    model_spec_of,
    to_outgoing,
    to_policy_event,
)
from services.scheduler.policy import Policy, build_policy
from services.scheduler.state import ClusterState, ModelSpec

pytestmark = pytest.mark.unit

GB = 10**9
KEEP_ALIVE_S = 3.0
# the recording scheduler's processing delay and tick phase (unlike replay's)
LAG_S = 0.02
TICK_PHASE_S = 0.37

SPEC = ModelSpec(name="llama", size_bytes=4 * GB, num_layers=32, kv_cache_bytes=0,
                 ttft_slo_s=10.0, tpot_slo_s=0.2, max_pipeline_degree=2,
                 keep_alive_s=KEEP_ALIVE_S, stage_boundaries={2: (0, 16, 32)},
                 stage_bytes={2: (2 * GB, 2 * GB)})


def heartbeat(at: float, node_id: str, *, gpu_gb: int = 16) -> Event:
    info = NodeInfo(node_id=node_id, gpu_memory_bytes=gpu_gb * GB,
                    nic_bandwidth_bytes_per_s=GB)
    return Event(kind=EventKind.NODE_HEARTBEAT, time=at, node_id=node_id,
                 data=info.model_dump())


def request(at: float, kind: str, request_id: str, *, worker_id: str | None = None,
            **data: object) -> Event:
    return Event(kind=kind, time=at, model=SPEC.name, request_id=request_id,
                 worker_id=worker_id, data=data)


def worker(at: float, kind: str, worker_id: str, **data: object) -> Event:
    return Event(kind=kind, time=at, model=SPEC.name, worker_id=worker_id, data=data)


def ready(at: float, worker_id: str) -> Event:
    return worker(at, EventKind.WORKER_READY, worker_id,
                  phases={"process_started_at": at - 1.5, "ready_at": at})


def done(at: float, request_id: str) -> Event:
    return request(at, EventKind.REQUEST_DONE, request_id, queue_s=0.1, ttft_s=0.6, e2e_s=1.1,
                   usage={"completion_tokens": 11})


def record(chosen: Policy, inputs: Sequence[Event], *, until: float) -> list[Event]:
    """The log the scheduler service would leave: the inputs in order, each followed by the
    command events of its decision (taken `LAG_S` later), ticks every second at its own
    phase, the spec registered at start (`model.registered`)."""
    state = ClusterState()
    log = [model_registered_event(SPEC, now=0.0)]
    state, _ = chosen.decide(state, policy.ModelRegistered(SPEC), 0.0)
    ticks = [(TICK_PHASE_S + k, None) for k in range(int(until))]
    for at, event in heapq.merge(((e.time, e) for e in inputs), ticks, key=lambda p: p[0]):
        if event is not None:
            log.append(event)
            policy_event = to_policy_event(event)
        else:
            policy_event = policy.Tick()
        if policy_event is None:
            continue
        state, commands = chosen.decide(state, policy_event, at + LAG_S)
        for command in commands:
            outgoing = to_outgoing(command, storage_url="http://store", epoch="e1")
            if outgoing is not None:
                log.append(outgoing.event.model_copy(update={"time": at + 2 * LAG_S}))
    return log


def pipeline_inputs(*, node_a_gb: int = 16) -> list[Event]:
    """A degree-2 cold start, consolidation, then scale to zero after the keep-alive."""
    return [heartbeat(0.1, "node-a", gpu_gb=node_a_gb), heartbeat(0.2, "node-b"),
            request(1.0, EventKind.REQUEST_RECEIVED, "r1"),
            ready(3.0, "1"), ready(3.2, "2"),
            request(3.4, EventKind.REQUEST_FIRST_TOKEN, "r1", worker_id="1"),
            done(3.9, "r1"),
            worker(5.0, EventKind.WORKER_CONSOLIDATED, "1"),
            worker(5.3, EventKind.WORKER_STOPPED, "2"),
            heartbeat(6.1, "node-a", gpu_gb=node_a_gb), heartbeat(6.2, "node-b"),
            worker(9.2, EventKind.WORKER_STOPPED, "1")]


def recorded_pipeline(**kwargs: int) -> list[Event]:
    return record(build_policy("hydraserve", degree=2), pipeline_inputs(**kwargs), until=10)


def kinds_of(log: Sequence[Event]) -> list[str]:
    return [e.kind for e in log if e.kind in (
        EventKind.WORKER_PLACED, EventKind.WORKER_STOP_REQUESTED,
        EventKind.ENDPOINT_PIPELINE_READY, EventKind.ENDPOINT_CONSOLIDATE)]


def test_a_model_registered_event_round_trips_the_spec_with_int_degrees() -> None:
    event = Event.model_validate_json(model_registered_event(SPEC, now=1.0).model_dump_json())

    assert event.kind == EventKind.MODEL_REGISTERED and event.data["stage_boundaries"] == {
        "2": [0, 16, 32]}
    assert model_spec_of(event) == SPEC


def test_the_recorded_log_of_a_pipeline_cold_start_replays_without_divergence() -> None:
    log = recorded_pipeline()
    assert kinds_of(log) == [EventKind.WORKER_PLACED, EventKind.WORKER_PLACED,
                             EventKind.ENDPOINT_PIPELINE_READY, EventKind.ENDPOINT_CONSOLIDATE,
                             EventKind.WORKER_STOP_REQUESTED, EventKind.WORKER_STOP_REQUESTED]

    result = replay(log, build_policy("hydraserve", degree=2))

    assert result.divergence is None
    assert result.format() == [f"no divergence: {len(log)} events, 6 decisions"]


def test_a_heartbeat_with_less_gpu_memory_diverges_at_the_first_placement() -> None:
    log = recorded_pipeline()
    first = next(i for i, e in enumerate(log) if e.kind == EventKind.WORKER_PLACED)
    assert log[first].node_id == "node-a"
    # node-a now reports 1 GB: too little for stage 0, which goes elsewhere
    altered = [heartbeat(e.time, "node-a", gpu_gb=1)
               if e.kind == EventKind.NODE_HEARTBEAT and e.node_id == "node-a" else e
               for e in log]

    result = replay(altered, build_policy("hydraserve", degree=2))

    divergence = result.divergence
    assert divergence is not None and divergence.position == 0
    assert divergence.recorded is not None and divergence.recorded.index == first
    assert divergence.decided is not None
    assert divergence.recorded.fields["node_id"] == "node-a"
    assert divergence.decided.fields["node_id"] == "node-b"
    assert divergence.reason.startswith("different node_id 'node-a' != 'node-b'")
    assert result.format()[0].startswith(f"divergence at decision 1 (event {first}, ")


def test_a_dropped_worker_ready_diverges_where_the_pipeline_was_announced() -> None:
    log = recorded_pipeline()
    dropped = next(i for i, e in enumerate(log)
                   if e.kind == EventKind.WORKER_READY and e.worker_id == "2")
    announced = next(i for i, e in enumerate(log)
                     if e.kind == EventKind.ENDPOINT_PIPELINE_READY)

    result = replay(log[:dropped] + log[dropped + 1:], build_policy("hydraserve", degree=2))

    divergence = result.divergence
    assert divergence is not None and divergence.position == 2
    assert divergence.recorded is not None
    assert divergence.recorded.kind == EventKind.ENDPOINT_PIPELINE_READY
    assert divergence.recorded.index == announced - 1
    # without stage 1 ready, the next thing the policy does is scale the endpoint to zero
    assert divergence.decided is not None
    assert divergence.decided.kind == EventKind.WORKER_STOP_REQUESTED
    assert divergence.reason == (f"a {EventKind.WORKER_STOP_REQUESTED} instead of a "
                                 f"{EventKind.ENDPOINT_PIPELINE_READY}")


def single_worker_log() -> list[Event]:
    inputs = [heartbeat(0.1, "node-a"), request(1.0, EventKind.REQUEST_RECEIVED, "r1"),
              ready(2.5, "1"), request(2.6, EventKind.REQUEST_FIRST_TOKEN, "r1", worker_id="1"),
              done(3.1, "r1"), worker(7.0, EventKind.WORKER_STOPPED, "1")]
    return record(build_policy("single_worker"), inputs, until=8)


def test_inferred_ticks_scale_an_idle_worker_to_zero_within_a_tick_of_the_recorded_stop(
) -> None:
    log = single_worker_log()
    (stop,) = [e for e in log if e.kind == EventKind.WORKER_STOP_REQUESTED]
    # the recording scheduler ticked at .37: its first tick past done + keep-alive
    assert stop.time == pytest.approx(6.37 + 2 * LAG_S)

    result = replay(log, build_policy("single_worker"))

    assert result.divergence is None and result.num_decisions == 2


def test_a_stop_more_than_a_tick_from_the_recorded_one_is_a_divergence() -> None:
    log = single_worker_log()
    late = 3.0
    shifted = [e.model_copy(update={"time": e.time + late})
               if e.kind == EventKind.WORKER_STOP_REQUESTED else e for e in log]
    shifted.sort(key=lambda e: e.time)

    result = replay(shifted, build_policy("single_worker"))

    divergence = result.divergence
    assert divergence is not None and divergence.position == 1
    assert divergence.decided is not None and divergence.recorded is not None
    assert divergence.decided.time - divergence.recorded.time < -(1.0 + PROCESSING_LAG_S)
    assert "from the recorded one" in divergence.reason


def test_a_recorded_decision_the_policy_does_not_take_is_a_divergence() -> None:
    log = single_worker_log()
    extra = to_outgoing(policy.StopWorker(9, "node-a"), storage_url="")
    assert extra is not None

    result = replay([*log, extra.event.model_copy(update={"time": log[-1].time})],
                    build_policy("single_worker"))

    divergence = result.divergence
    assert divergence is not None and divergence.recorded is not None
    assert (divergence.position, divergence.recorded.index, divergence.decided,
            divergence.reason) == (2, len(log), None, "the policy decided nothing more")


def test_a_log_not_starting_at_a_fresh_scheduler_gets_a_note() -> None:
    log = [e.model_copy(update={"worker_id": "7"}) if e.kind == EventKind.WORKER_PLACED else e
           for e in single_worker_log()]

    result = replay(log, build_policy("single_worker"))

    assert result.divergence is not None
    assert any("first placement is worker 7" in note for note in result.notes)


def test_the_cli_parses_events_replay() -> None:
    args = build_parser().parse_args(["events", "replay", "--policy", "single_worker",
                                      "--tick", "0.5", "--since", "1h"])

    assert (args.events_command, args.policy, args.tick, args.since, args.degree) == (
        "replay", "single_worker", 0.5, "1h", None)


def test_degree_goes_only_with_the_hydraserve_policy() -> None:
    with pytest.raises(ValueError, match="--degree goes with --policy hydraserve"):
        build_policy("single_worker", degree=2)
