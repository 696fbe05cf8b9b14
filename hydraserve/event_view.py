"""What `hydraserve events` shows, free of NATS: filters, one-line renderings, and the
timeline of one request's cold start built from the events linked to it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from libs.common.messages import Event, EventKind
from libs.common.subjects import event_filter

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# data keys that name the endpoints or workers a request's cold start went through
_ENDPOINT_KEYS = ("endpoint_id", "endpoint_ids")
_WORKER_KEYS = ("worker_id", "worker_ids")
_MAX_DATA_CHARS = 160


def parse_duration(text: str) -> float:
    """`"90s"`, `"10m"`, `"2h"`, `"1d"` -> seconds; ValueError names a bad value."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30s, 10m, 2h or 1d")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True)
class EventFilter:
    """Which events to show; None matches anything."""

    model: str | None = None
    kind: str | None = None
    request_id: str | None = None
    endpoint_id: str | None = None
    # unix time (s): only events at or after it
    since: float | None = None

    @property
    def subject(self) -> str:
        """The server-side part of the filter (kind and model are subject tokens)."""
        return event_filter(self.kind, self.model)

    def matches(self, event: Event) -> bool:
        return ((self.model is None or event.model == self.model)
                and (self.kind is None or event.kind == self.kind)
                and (self.request_id is None or event.request_id == self.request_id)
                and (self.endpoint_id is None or event.endpoint_id == self.endpoint_id)
                and (self.since is None or event.time >= self.since))


def format_time(unix_s: float) -> str:
    stamp = datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def summarize_ids(event: Event) -> str:
    ids = [("model", event.model), ("req", event.request_id), ("ep", event.endpoint_id),
           ("worker", event.worker_id), ("node", event.node_id)]
    return " ".join(f"{name}={value}" for name, value in ids if value is not None)


def summarize_data(data: dict[str, Any]) -> str:
    parts = [f"{key}={json.dumps(value, separators=(',', ':'), default=str)}"
             for key, value in data.items()]
    text = " ".join(parts)
    return text if len(text) <= _MAX_DATA_CHARS else text[:_MAX_DATA_CHARS - 3] + "..."


def format_event(event: Event) -> str:
    """One line: time, kind, ids, data summary."""
    fields = [format_time(event.time), f"{event.kind:<24}", summarize_ids(event),
              summarize_data(event.data)]
    return "  ".join(field for field in fields if field).rstrip()


@dataclass(frozen=True)
class TimelineEntry:
    # seconds since the request arrived
    offset_s: float
    event: Event


def _ids_in(event: Event, attribute: str, keys: tuple[str, ...]) -> set[str]:
    ids = {getattr(event, attribute)} - {None}
    for key in keys:
        value = event.data.get(key)
        values = value if isinstance(value, list) else [value]
        ids |= {str(v) for v in values if v is not None}
    return ids


def timeline(request_id: str, events: Iterable[Event]) -> list[TimelineEntry]:
    """The request's own events plus the endpoint/worker events linked to them by ids, in
    time order, relative to the request's arrival (its `request.received`, else its first
    event). Events of other requests are left out even when they share a worker."""
    pool = sorted(events, key=lambda e: e.time)
    chosen = {e.id: e for e in pool if e.request_id == request_id
              or request_id in e.data.get("request_ids", ())}
    endpoints: set[str] = set()
    workers: set[str] = set()
    while True:  # follow ids to a fixpoint: request -> endpoint -> its workers -> ...
        for event in chosen.values():
            endpoints |= _ids_in(event, "endpoint_id", _ENDPOINT_KEYS)
            workers |= _ids_in(event, "worker_id", _WORKER_KEYS)
        linked = {e.id: e for e in pool if e.id not in chosen and e.request_id is None
                  and (_ids_in(e, "endpoint_id", _ENDPOINT_KEYS) & endpoints
                       or _ids_in(e, "worker_id", _WORKER_KEYS) & workers)}
        if not linked:
            break
        chosen |= linked
    ordered = sorted(chosen.values(), key=lambda e: e.time)
    if not ordered:
        return []
    arrival = next((e.time for e in ordered
                    if e.kind == "request.received" and e.request_id == request_id),
                   ordered[0].time)
    return [TimelineEntry(event.time - arrival, event) for event in ordered]


def format_timeline(entries: list[TimelineEntry]) -> list[str]:
    """`+   0.000s  request.received  ids  data`, one line per phase."""
    return [f"{entry.offset_s:+9.3f}s  {entry.event.kind:<24}  "
            f"{summarize_ids(entry.event)}  {summarize_data(entry.event.data)}".rstrip()
            for entry in entries]


# --- a cold start, stage by stage -----------------------------------------------------------

# the worker's start-up phases: (name, phases key it starts at, phases key it ends at)
_WORKER_PHASES = (
    ("imports", "process_started_at", "imports_done_at"),
    ("engine import", "imports_done_at", "engine_imported_at"),
    # waiting for the partition's first bytes, then building the stage on the meta device
    ("build", "engine_imported_at", "load_started_at"),
    ("load", "load_started_at", "loaded_at"),
    ("engine ready", "loaded_at", "ready_at"),
)
# events drawn as instants, by the name the timeline gives them
MARKER_KINDS = {
    EventKind.ENDPOINT_PIPELINE_READY: "pipeline ready",
    EventKind.REQUEST_FIRST_TOKEN: "first token",
    EventKind.REQUEST_DONE: "request done",
    EventKind.ENDPOINT_CONSOLIDATE: "consolidate",
    EventKind.KV_HANDOVER: "kv handover",
    EventKind.KV_EXPORTED: "kv exported",
    EventKind.KV_MIGRATED: "kv migrated",
    EventKind.WORKER_CONSOLIDATED: "consolidated",
}
_NO_STAGE = "-"


@dataclass(frozen=True)
class StageWorker:
    stage: int
    worker_id: str
    start_layer: int | None
    end_layer: int | None


@dataclass(frozen=True)
class Phase:
    """An interval of the cold start, in seconds since the request arrived."""

    name: str
    start_s: float
    end_s: float
    # None: the request's own phases (queue, prefill)
    stage: int | None = None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Marker:
    """An instant of the cold start (first token, consolidation steps)."""

    name: str
    at_s: float
    # None: not tied to one stage's worker
    stage: int | None = None


@dataclass(frozen=True)
class ColdStart:
    request_id: str
    endpoint_id: str
    stages: list[StageWorker]
    # per stage in stage order (fetch first, then the worker's phases), then the request's
    phases: list[Phase]
    # in time order
    markers: list[Marker]

    @property
    def degree(self) -> int:
        return len(self.stages)


def _first(events: list[Event], kind: str, **ids: str | None) -> Event | None:
    return next((e for e in events if e.kind == kind
                 and all(getattr(e, name) == value for name, value in ids.items())), None)


def _time(event: Event | None) -> float | None:
    return None if event is None else event.time


def _stage_workers(endpoint_id: str, events: list[Event], until: float) -> list[StageWorker]:
    """The endpoint's workers placed before `until`, one per stage (the first placed)."""
    by_stage: dict[int, StageWorker] = {}
    for event in events:
        if (event.kind == EventKind.WORKER_PLACED and event.endpoint_id == endpoint_id
                and event.worker_id is not None and event.time <= until):
            stage = int(event.data.get("stage", 0))
            by_stage.setdefault(stage, StageWorker(stage, event.worker_id,
                                                   event.data.get("start_layer"),
                                                   event.data.get("end_layer")))
    return [by_stage[stage] for stage in sorted(by_stage)]


def _stage_phases(worker: StageWorker, events: list[Event], arrival: float) -> list[Phase]:
    """Fetch (from the node agent's events), then process start to engine ready (from the
    worker's `phases`, unix times it records itself)."""
    wid = worker.worker_id

    def phase(name: str, start: float | None, end: float | None) -> list[Phase]:
        if start is None or end is None:
            return []
        return [Phase(name, start - arrival, end - arrival, worker.stage)]

    fetch_started = _first(events, EventKind.FETCH_STARTED, worker_id=wid)
    fetch_done = _first(events, EventKind.FETCH_DONE, worker_id=wid)
    placed = _first(events, EventKind.WORKER_PLACED, worker_id=wid)
    launched = _first(events, EventKind.WORKER_LAUNCHED, worker_id=wid)
    reported = (_first(events, EventKind.WORKER_READY, worker_id=wid)
                or _first(events, EventKind.WORKER_STARTED, worker_id=wid))
    moments: dict[str, float] = dict(reported.data.get("phases", {})) if reported else {}
    # the process's own spawn time; the node agent's worker.launched comes just after it
    spawned = moments.get("process_started_at", _time(launched))
    phases = phase("fetch", _time(fetch_started), _time(fetch_done))
    phases += phase("process start", _time(placed), spawned)
    for name, start_key, end_key in _WORKER_PHASES:
        phases += phase(name, moments.get(start_key), moments.get(end_key))
    return phases


def _request_phases(first_token: Event | None, arrival: float) -> list[Phase]:
    """Queue (until a worker pulled it) and prefill, from request.first_token's timings,
    which count from the gateway's acceptance."""
    if first_token is None or "ttft_s" not in first_token.data:
        return []
    accepted = first_token.time - float(first_token.data["ttft_s"])
    pulled = accepted + float(first_token.data.get("queue_s", 0.0))
    return [Phase("queue", 0.0, pulled - arrival),
            Phase("prefill", pulled - arrival, first_token.time - arrival)]


def cold_start(request_id: str, events: Iterable[Event]) -> ColdStart | None:
    """The per-stage phases of the endpoint that served the request: its workers placed
    before the request finished. None if no endpoint or no placed worker is known."""
    pool = sorted(events, key=lambda e: e.time)
    own = [e for e in pool if e.request_id == request_id]
    received = _first(own, EventKind.REQUEST_RECEIVED)
    first_token = _first(own, EventKind.REQUEST_FIRST_TOKEN)
    served = [e for e in own if e.kind in (EventKind.REQUEST_FIRST_TOKEN,
                                           EventKind.REQUEST_DONE)]
    endpoint_id = next((e.endpoint_id for e in served if e.endpoint_id is not None), None)
    if endpoint_id is None:
        return None
    done = _first(own, EventKind.REQUEST_DONE)
    stages = _stage_workers(endpoint_id, pool, done.time if done else own[-1].time)
    if not stages:
        return None
    arrival = received.time if received else own[0].time
    phases = [p for worker in stages for p in _stage_phases(worker, pool, arrival)]
    phases += _request_phases(first_token, arrival)
    stage_of = {worker.worker_id: worker.stage for worker in stages}
    markers = [Marker(MARKER_KINDS[e.kind], e.time - arrival, stage_of.get(e.worker_id or ""))
               for e in pool if e.kind in MARKER_KINDS
               and (e.request_id == request_id if e.request_id is not None
                    else e.endpoint_id == endpoint_id or e.worker_id in stage_of)]
    return ColdStart(request_id, endpoint_id, stages, phases, markers)


def format_cold_start(start: ColdStart) -> list[str]:
    """An aligned table: one row per stage and phase, then the request's phases, then the
    markers; times in seconds since the request arrived."""
    worker_of = {w.stage: w.worker_id for w in start.stages}
    width = max([len("worker"), *(len(w.worker_id) for w in start.stages)])

    def row(stage: int | None, name: str, start_s: float, end_s: float | None) -> str:
        label, worker = (_NO_STAGE, _NO_STAGE) if stage is None else (
            str(stage), worker_of[stage])
        times = f"{start_s:8.3f}" + ("" if end_s is None
                                    else f"  {end_s:8.3f}  {end_s - start_s:8.3f}")
        return f"{label:<5}  {worker:<{width}}  {name:<14}  {times}"

    header = (f"request {start.request_id}  endpoint {start.endpoint_id}  "
              f"degree {start.degree}  (seconds since request.received)")
    columns = (f"{'stage':<5}  {'worker':<{width}}  {'phase':<14}  "
               f"{'start':>8}  {'end':>8}  {'duration':>8}")
    return [header, columns,
            *(row(p.stage, p.name, p.start_s, p.end_s) for p in start.phases),
            *(row(m.stage, m.name, m.at_s, None) for m in start.markers)]
