"""What `hydraserve events` shows, free of NATS: filters, one-line renderings, and the
timeline of one request's cold start built from the events linked to it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from libs.common.messages import Event
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
