"""`hydraserve events tail|show|timeline|replay`: read the HS_EVENTS stream.

Each command reads with an ordered, ephemeral push consumer (no state left on the server),
filtered server-side by subject (kind, model) and client-side by the other ids. `show` reads
what is stored and exits; `tail` follows new events (or from `--since`) until interrupted or
`--count` events have been printed; `timeline` renders one request's cold start: its
events, and where the endpoint's placed workers are known, a table of each stage's phases
(and with `--png`, a Gantt chart of them); `replay` feeds the stored events to the
scheduler's policy and checks that the same decisions come out (`hydraserve.replay`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import nats
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError as StreamNotFoundError
from pydantic import ValidationError

from hydraserve.event_view import (
    EventFilter,
    cold_start,
    format_cold_start,
    format_event,
    format_timeline,
    parse_duration,
    timeline,
)
from libs.common.messages import Event
from libs.common.settings import Settings
from libs.common.subjects import EVENTS_STREAM

logger = logging.getLogger(__name__)

# `show` stops when no further stored event arrives for this long
_IDLE_S = 1.0


async def _stream(nc: NATS, flt: EventFilter, *, follow: bool) -> AsyncIterator[Event]:
    """The events matching `flt`: the stored ones (then new ones too, if `follow`)."""
    js = nc.jetstream()
    last_seq = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    if not follow and last_seq == 0:
        return
    if flt.since is not None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME,
                                opt_start_time=datetime.fromtimestamp(flt.since, UTC))
    else:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW if follow
                                else DeliverPolicy.ALL)
    sub = await js.subscribe(flt.subject, stream=EVENTS_STREAM, ordered_consumer=True,
                             config=config)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=None if follow else _IDLE_S)
            except TimeoutError:
                return
            try:
                event = Event.model_validate_json(msg.data)
            except ValidationError as exc:
                logger.warning("skipping a malformed event on %s: %s", msg.subject, exc)
                event = None
            if event is not None and flt.matches(event):
                yield event
            meta = msg.metadata
            if not follow and (meta.num_pending == 0 or meta.sequence.stream >= last_seq):
                return
    finally:
        await sub.unsubscribe()


async def collect(nats_url: str, flt: EventFilter) -> list[Event]:
    """The stored events matching `flt`, oldest first."""
    nc = await nats.connect(nats_url, name="hydraserve-events")
    try:
        return [event async for event in _stream(nc, flt, follow=False)]
    finally:
        await nc.close()


async def tail(nats_url: str, flt: EventFilter, out: TextIO, *, count: int | None) -> None:
    nc = await nats.connect(nats_url, name="hydraserve-events")
    try:
        num_printed = 0
        async for event in _stream(nc, flt, follow=True):
            print(format_event(event), file=out, flush=True)
            num_printed += 1
            if count is not None and num_printed >= count:
                return
    finally:
        await nc.close()


def _since(args: argparse.Namespace) -> float | None:
    return time.time() - parse_duration(args.since) if args.since else None


def _filter(args: argparse.Namespace) -> EventFilter:
    return EventFilter(model=args.model, kind=args.kind, request_id=args.request,
                       endpoint_id=args.endpoint, since=_since(args))


def show_timeline(request_id: str, events: list[Event], out: TextIO, *,
                  png: Path | None = None) -> int:
    """Print the request's per-stage cold-start table (when its endpoint's workers are
    known) and its events; draw the table into `png` if given. 1 if there is nothing to
    show or to draw."""
    entries = timeline(request_id, events)
    if not entries:
        print(f"no events of request {request_id!r}", file=sys.stderr)
        return 1
    start = cold_start(request_id, events)
    lines = [*format_cold_start(start), ""] if start is not None else []
    for line in [*lines, *format_timeline(entries)]:
        print(line, file=out)
    if png is None:
        return 0
    if start is None:
        print(f"error: no placed workers of request {request_id!r}'s endpoint to draw",
              file=sys.stderr)
        return 1
    from hydraserve.gantt import write_gantt

    try:
        write_gantt(start, png)
    except OSError as exc:
        print(f"error: cannot write {png}: {exc}", file=sys.stderr)
        return 1
    return 0


def replay_events(args: argparse.Namespace, out: TextIO) -> int:
    """`events replay`: 0 if the policy decides what the stored events recorded, else 1."""
    from hydraserve.replay import replay
    from services.scheduler.policy import build_policy

    chosen = build_policy(args.policy, degree=args.degree,
                          heartbeat_timeout_s=args.heartbeat_timeout,
                          max_endpoints=args.max_endpoints, capacity=args.capacity)
    events = asyncio.run(collect(args.nats, EventFilter(since=_since(args))))
    result = replay(events, chosen, tick_s=args.tick, model=args.model)
    for line in result.format():
        print(line, file=out)
    return 0 if result.divergence is None else 1


def run_events(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """The `events` subcommands; 1 on a bad argument or an unreachable bus."""
    if args.nats is None:  # read at the edge, only by the commands that need it
        args.nats = Settings().nats.url
    out = out or sys.stdout
    try:
        if args.events_command == "replay":
            return replay_events(args, out)
        if args.events_command == "timeline":
            events = asyncio.run(collect(args.nats, EventFilter(since=_since(args))))
            return show_timeline(args.request_id, events, out, png=args.png)
        if args.events_command == "show":
            lines = [format_event(e) for e in asyncio.run(collect(args.nats, _filter(args)))]
        else:
            asyncio.run(tail(args.nats, _filter(args), out, count=args.count))
            return 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except StreamNotFoundError:
        print(f"error: the {EVENTS_STREAM} stream does not exist at {args.nats}",
              file=sys.stderr)
        return 1
    except (NatsError, OSError) as exc:
        print(f"error: cannot read events from {args.nats}: {exc!r}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    for line in lines:
        print(line, file=out)
    return 0
