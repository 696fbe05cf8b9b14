"""Cold-start progress for a streamed request, as SSE comment lines.

While a streamed request waits for its first token, the gateway follows the events of its
model (a core NATS subscription on `hs.evt.*.*.<model>`: no consumer, nothing stored) and
turns the relevant ones into SSE comments (`: worker placed on node-0`). SSE clients, the
`openai` client included, skip comment lines, so they only keep the connection visibly alive;
`: waiting` is sent when nothing else was for a while, so proxies do not cut an idle stream.

`progress_comment` is the pure event -> text mapping; `ProgressWatcher` the subscription.
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from pydantic import ValidationError

from libs.common.messages import Event, EventKind
from libs.common.subjects import event_filter

logger = logging.getLogger(__name__)

KEEPALIVE_TEXT = "waiting"
# events buffered per watched request before older ones are dropped (a slow client)
_MAX_PENDING = 256


def comment(text: str) -> str:
    """One SSE comment block; newlines in `text` must not start a field line."""
    return "".join(f": {line}\n" for line in (text.splitlines() or [""])) + "\n"


def queued_comment(model: str, *, cold_start: bool) -> str:
    return f"queued for model {model}" + (" (cold start)" if cold_start else "")


def is_cold_start_event(event: Event) -> bool:
    """The event shows a worker of the model being brought up (not yet serving)."""
    return event.kind in (EventKind.WORKER_PLACED, EventKind.FETCH_STARTED,
                          EventKind.FETCH_PROGRESS, EventKind.FETCH_DONE,
                          EventKind.WORKER_LAUNCHED, EventKind.WORKER_STARTED)


def progress_comment(event: Event) -> str | None:
    """The comment text for `event`, or None for an event a waiting client need not see."""
    data = event.data
    node = f" on {event.node_id}" if event.node_id else ""
    match event.kind:
        case EventKind.WORKER_PLACED:
            degree, stage = data.get("degree", 1), data.get("stage", 0)
            part = (f" (stage {int(stage) + 1} of {degree})"
                    if isinstance(degree, int) and degree > 1 and isinstance(stage, int)
                    else "")
            return f"worker placed{node}{part}"
        case EventKind.FETCH_STARTED:
            return "fetching weights 0%"
        case EventKind.FETCH_PROGRESS:
            received, total = data.get("received_bytes"), data.get("total_bytes")
            if not isinstance(received, int) or not isinstance(total, int) or total <= 0:
                return None
            return f"fetching weights {min(100, received * 100 // total)}%"
        case EventKind.FETCH_DONE:
            return "fetching weights 100%"
        case EventKind.FETCH_FAILED:
            return "fetching weights failed"
        case EventKind.WORKER_STARTED:
            return "worker started"
        case EventKind.WORKER_READY:
            return "model loaded"
        case EventKind.WORKER_STOPPED:
            return "worker stopped" if data.get("exit_code") not in (0, None) else None
        case _:
            return None


class ProgressWatcher:
    """Starts one `ProgressFeed` per waiting streamed request."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc

    async def watch(self, model: str) -> ProgressFeed | None:
        """Follow `model`'s events from now on; None if the bus refuses (no progress then)."""
        feed = ProgressFeed()
        try:
            feed.subscription = await self._nc.subscribe(event_filter(model=model),
                                                         cb=feed.on_message)
        except NatsError as exc:
            logger.warning("progress for model %r unavailable: %s", model, exc)
            return None
        return feed


class ProgressFeed:
    """The events of one model, as they arrive, until closed."""

    def __init__(self) -> None:
        self.subscription: Subscription | None = None
        self.events: asyncio.Queue[Event] = asyncio.Queue(maxsize=_MAX_PENDING)
        self._closed = False

    async def on_message(self, msg: Msg) -> None:
        try:
            event = Event.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.debug("ignoring a malformed event on %s: %s", msg.subject, exc)
            return
        if self.events.full():
            self.events.get_nowait()
        self.events.put_nowait(event)

    def drain(self) -> list[Event]:
        """The events received and not yet taken."""
        events = []
        while not self.events.empty():
            events.append(self.events.get_nowait())
        return events

    async def close(self) -> None:
        """Stop following (idempotent)."""
        if self._closed or self.subscription is None:
            return
        self._closed = True
        try:
            await self.subscription.unsubscribe()
        except NatsError as exc:
            logger.warning("unsubscribing from progress events failed: %s", exc)
