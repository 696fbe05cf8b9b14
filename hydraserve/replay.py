"""`hydraserve events replay`: feed a recorded event log to the pure policy and check that
the same decisions come out (DESIGN.md, "The scheduler's policy is a pure function").

The log's events go to `Policy.decide` in stream order, mapped as the live scheduler maps them
(`commands.to_policy_event`; `model.registered` rebuilds the spec the scheduler fed), each at
its own `time` (never earlier than the previous event's: the scheduler's clock only moves on).
Ticks are not recorded: before each event, ticks are fed every `tick_s` since the previous
one, as the live scheduler ticks every second. The policy's commands, mapped to the events the
scheduler publishes (`commands.to_outgoing`), must equal the recorded command events in order:
`worker.placed`, `worker.stop_requested`, `endpoint.pipeline_ready`, `endpoint.consolidate`,
compared on their ids and placement facts, not on times, except that a stop must come within
one tick (plus the scheduler's processing lag) of the recorded one.

The policy numbers workers and endpoints from 1, as a scheduler on a fresh database does, so
the log must start before that scheduler's start (docs/EVENTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hydraserve.event_view import format_time
from libs.common.messages import Event, EventKind
from services.scheduler import events as policy
from services.scheduler.commands import (
    model_spec_of,
    to_outgoing,
    to_policy_event,
)
from services.scheduler.policy import Policy
from services.scheduler.state import ClusterState

# the command events the scheduler publishes, compared between the log and the policy
DECISION_KINDS = (EventKind.WORKER_PLACED, EventKind.WORKER_STOP_REQUESTED,
                  EventKind.ENDPOINT_PIPELINE_READY, EventKind.ENDPOINT_CONSOLIDATE)
# how much later than its tick the live scheduler may publish a decision (queue, database)
PROCESSING_LAG_S = 0.5
_PLACED_DATA = ("degree", "stage", "start_layer", "end_layer", "gpu_bytes")
_CONSOLIDATE_DATA = ("degree", "stages", "partial_worker_ids")


@dataclass(frozen=True)
class Decision:
    """One scheduler decision as the bus records it: its kind and what identifies it."""

    kind: str
    fields: dict[str, Any]
    time: float
    # the log index of the recorded event, or of the last event fed before the policy decided
    index: int
    # what the policy reacted to ("" for a recorded decision)
    cause: str = ""

    @property
    def model(self) -> str | None:
        return self.fields.get("model")

    def describe(self) -> str:
        text = " ".join(f"{key}={value}" for key, value in self.fields.items()
                        if value is not None)
        return f"{self.kind} {text} at {format_time(self.time)}"


@dataclass(frozen=True)
class Divergence:
    # the decision's position among the compared ones (0-based)
    position: int
    recorded: Decision | None
    decided: Decision | None
    reason: str

    def format(self) -> list[str]:
        anchor = self.recorded or self.decided
        assert anchor is not None
        where = "event" if self.recorded is not None else "after event"
        lines = [f"divergence at decision {self.position + 1} ({where} {anchor.index}, "
                 f"{format_time(anchor.time)}): {self.reason}",
                 f"  recorded: {self.recorded.describe() if self.recorded else 'nothing'}",
                 f"  policy:   {self.decided.describe() if self.decided else 'nothing'}"]
        if self.decided is not None:
            lines.append(f"            (on {self.decided.cause})")
        return lines


@dataclass(frozen=True)
class ReplayResult:
    num_events: int
    # decisions compared (recorded ones, up to the divergence if any)
    num_decisions: int
    divergence: Divergence | None = None
    # hints on why a replay may not reproduce the log (e.g. it starts mid-run)
    notes: list[str] = field(default_factory=list)
    # decisions the policy took too close to the log's end for the log to hold them
    num_pending: int = 0

    def format(self) -> list[str]:
        if self.divergence is None:
            lines = [f"no divergence: {self.num_events} events, {self.num_decisions} decisions"]
            if self.num_pending:
                lines.append(f"({self.num_pending} later decisions past the log's end "
                             "not compared)")
        else:
            lines = self.divergence.format()
        return lines + [f"note: {note}" for note in self.notes]


def decision_of(event: Event, *, index: int, cause: str = "") -> Decision | None:
    """The comparable part of a command event (recorded, or from `to_outgoing`)."""
    ids = {"endpoint_id": event.endpoint_id, "worker_id": event.worker_id,
           "node_id": event.node_id, "model": event.model}
    data = event.data
    if event.kind == EventKind.WORKER_PLACED:
        fields = {**ids, **{key: data.get(key) for key in _PLACED_DATA},
                  # logs from before scale-out have no flag: every placement was a cold start
                  "scale_out": bool(data.get("scale_out", False))}
    elif event.kind == EventKind.WORKER_STOP_REQUESTED:
        fields = {"worker_id": event.worker_id, "node_id": event.node_id}
    elif event.kind == EventKind.ENDPOINT_PIPELINE_READY:
        stages = [tuple(sorted(s.items())) for s in data.get("stages", [])
                  if isinstance(s, dict)]
        fields = {"endpoint_id": event.endpoint_id, "model": event.model,
                  "degree": data.get("degree"), "stages": stages}
    elif event.kind == EventKind.ENDPOINT_CONSOLIDATE:
        fields = {**ids, **{key: data.get(key) for key in _CONSOLIDATE_DATA}}
    else:
        return None
    return Decision(event.kind, fields, event.time, index, cause)


def replay(events: Sequence[Event], chosen: Policy, *, tick_s: float = 1.0,
           model: str | None = None) -> ReplayResult:
    """Feed `events` (stream order) to `chosen`; compare its decisions with the recorded ones
    (only those about `model`, if given: the whole log is still fed, models share nodes)."""
    if tick_s <= 0:
        raise ValueError(f"the tick period must be > 0, not {tick_s}")
    feed = _Feed(chosen)
    recorded: list[Decision] = []
    notes: list[str] = []
    next_tick: float | None = None
    for index, event in enumerate(events):
        now = max(event.time, feed.now)
        next_tick = now + tick_s if next_tick is None else next_tick
        while next_tick <= now:
            feed.tick(next_tick, index=index - 1)
            next_tick += tick_s
        if event.kind in DECISION_KINDS:
            decision = decision_of(event, index=index)
            assert decision is not None
            recorded.append(decision)
        else:
            feed.event(event, now, index=index, notes=notes)
    if events:
        # the live scheduler may have decided at its last tick just before the log's end
        end = max(events[-1].time, feed.now)
        assert next_tick is not None
        while next_tick <= end + tick_s:
            feed.tick(next_tick, index=len(events) - 1)
            next_tick += tick_s
    if model is not None:
        recorded = _about(recorded, model)
        decided = _about(feed.decided, model)
    else:
        decided = feed.decided
    notes.extend(_id_notes(recorded))
    end_time = events[-1].time if events else 0.0
    return _compare(len(events), recorded, decided, tick_s=tick_s, end_time=end_time,
                    notes=notes)


class _Feed:
    """The policy's state along the log, and the decisions it took."""

    def __init__(self, chosen: Policy) -> None:
        self.policy = chosen
        self.state = ClusterState()
        self.now = float("-inf")
        self.decided: list[Decision] = []

    def tick(self, now: float, *, index: int) -> None:
        self._decide(policy.Tick(), now, index=index, cause=f"tick at {format_time(now)}")

    def event(self, event: Event, now: float, *, index: int, notes: list[str]) -> None:
        if event.kind == EventKind.MODEL_REGISTERED:
            spec = model_spec_of(event)
            if spec is None:
                notes.append(f"event {index}: a malformed {EventKind.MODEL_REGISTERED} event, "
                             "skipped")
                return
            policy_event: policy.Event | None = policy.ModelRegistered(spec)
        else:
            policy_event = to_policy_event(event)
        if policy_event is None:
            return
        if (isinstance(policy_event, policy.RequestArrived)
                and policy_event.model not in self.state.models):
            notes.append(f"event {index}: a request for {policy_event.model!r}, which no "
                         f"earlier {EventKind.MODEL_REGISTERED} event registered")
        self._decide(policy_event, now, index=index,
                     cause=f"event {index} {event.kind} at {format_time(event.time)}")

    def _decide(self, event: policy.Event, now: float, *, index: int, cause: str) -> None:
        self.now = now
        self.state, commands = self.policy.decide(self.state, event, now)
        for command in commands:
            outgoing = to_outgoing(command, storage_url="")
            if outgoing is None:
                continue
            decision = decision_of(outgoing.event.model_copy(update={"time": now}),
                                   index=index, cause=cause)
            if decision is not None:
                self.decided.append(decision)


def _about(decisions: list[Decision], model: str) -> list[Decision]:
    """The decisions about `model`; a stop is about its worker's model."""
    models: dict[str | None, str | None] = {}
    kept = []
    for decision in decisions:
        if decision.kind == EventKind.WORKER_PLACED:
            models[decision.fields["worker_id"]] = decision.model
        about = (models.get(decision.fields["worker_id"])
                 if decision.kind == EventKind.WORKER_STOP_REQUESTED else decision.model)
        if about == model:
            kept.append(decision)
    return kept


def _id_notes(recorded: list[Decision]) -> list[str]:
    first = next((d for d in recorded if d.kind == EventKind.WORKER_PLACED), None)
    if first is None or first.fields["worker_id"] == "1":
        return []
    return [f"the log's first placement is worker {first.fields['worker_id']}: it does not "
            "start at the start of a scheduler on a fresh database, where replay must start "
            "(--since)"]


def _compare(num_events: int, recorded: list[Decision], decided: list[Decision], *,
             tick_s: float, end_time: float, notes: list[str]) -> ReplayResult:
    for position, want in enumerate(recorded):
        got = decided[position] if position < len(decided) else None
        reason = _difference(want, got, tick_s=tick_s)
        if reason is not None:
            return ReplayResult(num_events, position, Divergence(position, want, got, reason),
                                notes)
    extra = decided[len(recorded):]
    # the log may end before the scheduler published what it decided last
    pending = [d for d in extra if d.time >= end_time - tick_s - PROCESSING_LAG_S]
    if len(pending) < len(extra):
        got = extra[0]
        return ReplayResult(num_events, len(recorded), Divergence(
            len(recorded), None, got, "the policy decided more than the log holds"), notes)
    return ReplayResult(num_events, len(recorded), None, notes, num_pending=len(pending))


def _difference(want: Decision, got: Decision | None, *, tick_s: float) -> str | None:
    if got is None:
        return "the policy decided nothing more"
    if got.kind != want.kind:
        return f"a {got.kind} instead of a {want.kind}"
    differing = [f"{key} {want.fields.get(key)!r} != {got.fields.get(key)!r}"
                 for key in want.fields if want.fields.get(key) != got.fields.get(key)]
    if differing:
        return "different " + ", ".join(differing)
    if (want.kind == EventKind.WORKER_STOP_REQUESTED
            and abs(got.time - want.time) > tick_s + PROCESSING_LAG_S):
        return (f"the stop came {got.time - want.time:+.3f}s from the recorded one "
                f"(more than a tick, {tick_s:g}s)")
    return None
