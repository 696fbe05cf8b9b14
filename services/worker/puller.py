"""Bounded pulling from a JetStream pull consumer: never more messages held than capacity.

Messages are fetched one at a time, and only while the worker has room, so the number of
unacknowledged messages this worker holds never exceeds its capacity; the rest of the queue
stays in the stream for other workers (and, for the scheduler, counts as backlog).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

logger = logging.getLogger(__name__)


class BoundedPuller:
    def __init__(self, psub: JetStreamContext.PullSubscription, *,
                 has_room: Callable[[], bool], on_message: Callable[[Msg], Awaitable[None]],
                 on_connection_lost: Callable[[Exception], None],
                 fetch_timeout_s: float) -> None:
        self._psub = psub
        self._has_room = has_room
        self._on_message = on_message
        self._on_connection_lost = on_connection_lost
        # one pull's longest wait; also how long `run` takes to notice `stop`
        self._fetch_timeout_s = fetch_timeout_s
        self._room = asyncio.Event()
        self._stopping = False

    def notify_room(self) -> None:
        """A held message was finished: pulling may resume."""
        self._room.set()

    def stop(self) -> None:
        self._stopping = True
        self._room.set()

    async def run(self) -> None:
        """Pull until `stop()`; a message pulled while stopping goes straight back (nak)."""
        timeout = self._fetch_timeout_s
        while not self._stopping:
            if not self._has_room():
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), timeout)
                continue
            try:
                msgs = await self._psub.fetch(1, timeout=timeout)
            except TimeoutError:
                continue
            except ConnectionClosedError as exc:  # reconnecting gave up: nothing more to do
                self._on_connection_lost(exc)
                return
            except NatsError:
                logger.exception("pulling requests failed; retrying")
                await asyncio.sleep(timeout)
                continue
            for msg in msgs:
                try:
                    await (msg.nak() if self._stopping else self._on_message(msg))
                except NatsError:  # unacknowledged, so JetStream redelivers it after ack_wait
                    logger.exception("handling a pulled request failed")
        # Late replies to expired pulls would keep the connection's drain() waiting on this
        # subscription, so it goes now.
        with contextlib.suppress(NatsError):
            await self._psub.unsubscribe()
