"""The data-plane channel of one pipeline worker over core NATS.

Sending: every frame goes through one queue and one sender task, so frames from this
process reach each receiver in the order they were sent (NATS keeps a publisher's order per
subscriber). A frame larger than the server's max_payload goes as numbered parts with
headers, reassembled by the receiver. Receiving: a subscription on the stage's own inbox hands
complete frames to a callback (called on the event loop, in arrival order).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs.common.subjects import pipe_subject

logger = logging.getLogger(__name__)

# room left in a part for the NATS headers
_HEADER_ROOM = 1024
_MSG = "Hs-Frame"
_PART = "Hs-Part"


class PipeChannel:
    def __init__(self, nc: NATS, endpoint_id: str) -> None:
        self._nc = nc
        self.endpoint_id = endpoint_id
        self._outbox: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        # frame id -> parts received so far
        self._partial: dict[str, list[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_frames_sent = 0
        self.num_bytes_sent = 0

    async def start(self, stage: int, on_frame: Callable[[bytes], None]) -> None:
        """Start sending, and deliver the frames addressed to `stage` to `on_frame`."""
        self._loop = asyncio.get_running_loop()
        self._sender = asyncio.create_task(self._send_loop())

        async def receive(msg: Msg) -> None:
            frame = self._reassemble(msg)
            if frame is not None:
                on_frame(frame)

        self._subscription = await self._nc.subscribe(pipe_subject(self.endpoint_id, stage),
                                                      cb=receive, pending_bytes_limit=-1,
                                                      pending_msgs_limit=-1)
        await self._nc.flush()

    def send_threadsafe(self, stage: int, frame: bytes) -> None:
        """Queue a frame for stage `stage` from any thread."""
        assert self._loop is not None, "start the channel first"
        item = (pipe_subject(self.endpoint_id, stage), frame)
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, item)

    async def close(self) -> None:
        """Send what is queued, then stop."""
        if self._sender is not None:
            self._outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await self._sender
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    async def _send_loop(self) -> None:
        while (item := await self._outbox.get()) is not None:
            subject, frame = item
            try:
                await self._publish(subject, frame)
            except Exception:  # the stage or the connection is gone; the scheduler notices
                logger.exception("sending a %d-byte frame to %s failed", len(frame), subject)

    async def _publish(self, subject: str, frame: bytes) -> None:
        limit = max(1, self._nc.max_payload - _HEADER_ROOM)
        self.num_frames_sent += 1
        self.num_bytes_sent += len(frame)
        if len(frame) <= limit:
            await self._nc.publish(subject, frame)
            return
        frame_id = uuid.uuid4().hex
        num_parts = -(-len(frame) // limit)
        for index in range(num_parts):
            await self._nc.publish(subject, frame[index * limit:(index + 1) * limit],
                                   headers={_MSG: frame_id, _PART: f"{index}/{num_parts}"})

    def _reassemble(self, msg: Msg) -> bytes | None:
        headers = msg.headers or {}
        if _MSG not in headers:
            return msg.data
        frame_id = headers[_MSG]
        index, num_parts = (int(x) for x in headers[_PART].split("/"))
        parts = self._partial.setdefault(frame_id, [])
        if index != len(parts):
            logger.error("frame %s: part %d arrived after %d parts; dropping it", frame_id,
                         index, len(parts))
            self._partial.pop(frame_id, None)
            return None
        parts.append(msg.data)
        if len(parts) < num_parts:
            return None
        del self._partial[frame_id]
        return b"".join(parts)
