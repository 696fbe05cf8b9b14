"""The data-plane channel of one pipeline worker: direct sockets, with core NATS beside them.

NATS: every frame goes through one queue and one sender task, so frames from this process
reach each receiver in the order they were sent (NATS keeps a publisher's order per
subscriber). A frame larger than the server's max_payload goes as numbered parts with
headers, reassembled by the receiver. A subscription on the stage's own inbox hands complete
frames to a callback.

Direct (`direct=True`): each stage also listens on a TCP socket and answers requests for its
`host:port` on `pipe_address_subject`, with a random token of the listening channel. A
connection must open with a hello (a magic and that token) before its frames are read: the
token travels only over NATS, so only a peer on the bus can feed a stage (not a port scan,
not a stray client, not another endpoint's stale sender).

The first frame to a stage goes through the sender task, which asks for that address and
connects; from then on frames to that stage are written on the socket by the sending thread
itself, and the receiving stage's reader thread hands them to the callback. A hop is then one
socket write and one thread wake-up, where NATS took four (the sender's event loop, the server,
the receiver's event loop, the stage thread); after a stage has been idle each wake-up costs
the most (measured in docs/BENCHMARKS.md). A stage that does not answer, or cannot be reached,
gets its frames over NATS. Per receiver, frames keep their order across the switch: a frame
goes direct only when none to that stage is still queued for the sender task.

The callback runs on the event loop (NATS) or on a reader thread (direct): it must be
thread-safe. `on_direct_frame`, if given, takes the direct frames instead, on their reader
thread: a stage runs them there (`StageServer.handle_now`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import socket
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from libs.common.subjects import pipe_address_subject, pipe_subject

logger = logging.getLogger(__name__)

# a direct connection opens with a hello: a 4-byte magic and the receiver's 16-byte token;
# one that does not is closed before anything else it sent is read
_HELLO = struct.Struct(">4s16s")
_HELLO_MAGIC = b"HSH1"
_TOKEN_BYTES = 16
# then each frame: a 4-byte magic, its 8-byte big-endian length, then the frame (a header
# without the magic is closed before its length is believed)
_FRAME_HEADER = struct.Struct(">4sQ")
_MAGIC = b"HSP1"
# asking a stage for its address, and connecting to it
DIRECT_CONNECT_TIMEOUT_S = 2.0

# room left in a part for the NATS headers
_HEADER_ROOM = 1024
_MSG = "Hs-Frame"
_PART = "Hs-Part"


class PipeChannel:
    def __init__(self, nc: NATS, endpoint_id: str, *, direct: bool = False,
                 advertise_host: str | None = None) -> None:
        self._nc = nc
        self.endpoint_id = endpoint_id
        self.direct = direct
        self._advertise_host = advertise_host
        self._outbox: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        # direct: stage -> its socket (None: it answered no or could not be reached; NATS)
        self._routes: dict[int, socket.socket | None] = {}
        # frames per stage queued for the sender task and not yet sent
        self._queued: Counter[int] = Counter()
        # held while writing a socket and while choosing a frame's way
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        # what a connection to this stage's listener must present (`_listen`)
        self._token = secrets.token_bytes(_TOKEN_BYTES)
        self._readers: list[socket.socket] = []
        self._closed = False
        self.address: str | None = None
        self._sender: asyncio.Task[None] | None = None
        self._subscription: Subscription | None = None
        self._address_subscription: Subscription | None = None
        # frame id -> parts received so far
        self._partial: dict[str, list[bytes]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_frames_sent = 0
        self.num_bytes_sent = 0
        self.num_frames_direct = 0

    async def start(self, stage: int, on_frame: Callable[[bytes], None], *,
                    on_direct_frame: Callable[[bytes], None] | None = None) -> None:
        """Start sending, and deliver the frames addressed to `stage` to `on_frame` (those
        from direct sockets to `on_direct_frame`, if given)."""
        self._loop = asyncio.get_running_loop()
        self._sender = asyncio.create_task(self._send_loop())
        if self.direct:
            await self._listen(stage, on_direct_frame or on_frame)

        async def receive(msg: Msg) -> None:
            frame = self._reassemble(msg)
            if frame is not None:
                on_frame(frame)

        self._subscription = await self._nc.subscribe(pipe_subject(self.endpoint_id, stage),
                                                      cb=receive, pending_bytes_limit=-1,
                                                      pending_msgs_limit=-1)
        await self._nc.flush()

    def send_threadsafe(self, stage: int, frame: bytes) -> None:
        """Send a frame to stage `stage` from any thread: on its socket now, if it has one
        and no frame to it waits in the queue; else through the sender task."""
        assert self._loop is not None, "start the channel first"
        with self._lock:
            sock = self._routes.get(stage)
            if sock is not None and not self._queued[stage] and self._write(stage, sock, frame):
                return
            self._queued[stage] += 1
        self._loop.call_soon_threadsafe(self._outbox.put_nowait, (stage, frame))

    async def close(self) -> None:
        """Send what is queued, then stop."""
        if self._sender is not None:
            self._outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await self._sender
        for subscription in (self._subscription, self._address_subscription):
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        self._closed = True
        with self._lock:
            sockets = [s for s in self._routes.values() if s is not None] + self._readers
            if self._listener is not None:
                sockets.append(self._listener)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    async def _send_loop(self) -> None:
        while (item := await self._outbox.get()) is not None:
            stage, frame = item
            try:
                if self.direct and stage not in self._routes:
                    self._routes[stage] = await self._connect(stage)
                sock = self._routes.get(stage)
                if sock is None or not await asyncio.to_thread(self._write_locked, stage, sock,
                                                                frame):
                    await self._publish(pipe_subject(self.endpoint_id, stage), frame)
            except Exception:  # the stage or the connection is gone; the scheduler notices
                logger.exception("sending a %d-byte frame to stage %d failed", len(frame),
                                 stage)
            finally:
                with self._lock:
                    self._queued[stage] -= 1

    # --- direct sockets ------------------------------------------------------------------------
    async def _listen(self, stage: int, on_frame: Callable[[bytes], None]) -> None:
        listener = socket.create_server(("", 0), backlog=16)
        self._listener = listener
        host = self._advertise_host or _host_address()
        self.address = f"{host}:{listener.getsockname()[1]}"
        threading.Thread(target=self._accept, args=(listener, on_frame), daemon=True,
                         name=f"pipe-accept-{stage}").start()

        async def answer(msg: Msg) -> None:
            reply = f"{self.address} {self._token.hex()}" if self.address else ""
            await msg.respond(reply.encode())

        self._address_subscription = await self._nc.subscribe(
            pipe_address_subject(self.endpoint_id, stage), cb=answer)

    async def _connect(self, stage: int) -> socket.socket | None:
        """A socket to `stage`, or None (its frames then go over NATS)."""
        try:
            reply = await self._nc.request(pipe_address_subject(self.endpoint_id, stage), b"",
                                           timeout=DIRECT_CONNECT_TIMEOUT_S)
            address, _, token = reply.data.decode().partition(" ")
            host, _, port = address.rpartition(":")
            hello = _HELLO.pack(_HELLO_MAGIC, bytes.fromhex(token))
            sock = await asyncio.to_thread(socket.create_connection, (host, int(port)),
                                           DIRECT_CONNECT_TIMEOUT_S)
            try:
                await asyncio.to_thread(sock.sendall, hello)
            except OSError:
                sock.close()
                raise
        except Exception as exc:
            logger.warning("stage %d of %s has no direct socket (%r): its frames go over NATS",
                           stage, self.endpoint_id, exc)
            return None
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        logger.info("direct data plane to stage %d of %s at %s:%s", stage, self.endpoint_id,
                    host, port)
        return sock

    def _write_locked(self, stage: int, sock: socket.socket, frame: bytes) -> bool:
        with self._lock:
            return self._write(stage, sock, frame)

    def _write(self, stage: int, sock: socket.socket, frame: bytes) -> bool:
        """Write one frame (the caller holds the lock); False if the socket failed. A failed
        socket is dropped: this frame and the later ones take NATS (a receiver that lost the
        connection mid-frame drops the part it has, so none arrives twice)."""
        try:
            sock.sendall(_FRAME_HEADER.pack(_MAGIC, len(frame)))
            sock.sendall(frame)
        except OSError as exc:
            logger.warning("the direct socket to stage %d failed (%r); NATS from now on",
                           stage, exc)
            self._routes[stage] = None
            sock.close()
            return False
        self.num_frames_sent += 1
        self.num_frames_direct += 1
        self.num_bytes_sent += len(frame)
        return True

    def _accept(self, listener: socket.socket, on_frame: Callable[[bytes], None]) -> None:
        while not self._closed:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._readers.append(conn)
            threading.Thread(target=self._read, args=(conn, on_frame), daemon=True,
                             name="pipe-reader").start()

    def _read(self, conn: socket.socket, on_frame: Callable[[bytes], None]) -> None:
        """Check the sender's hello, then hand each of its frames to `on_frame` until it
        closes."""
        with conn:
            hello = _read_exactly(conn, _HELLO.size)
            if hello is None:
                return
            magic, token = _HELLO.unpack(hello)
            if magic != _HELLO_MAGIC or not hmac.compare_digest(token, self._token):
                logger.error("a data-plane connection sent no valid hello (magic and this "
                             "stage's token); closing it")
                return
            while (head := _read_exactly(conn, _FRAME_HEADER.size)) is not None:
                magic, length = _FRAME_HEADER.unpack(head)
                if magic != _MAGIC:
                    logger.error("a data-plane connection sent no frame header; closing it")
                    return
                frame = _read_exactly(conn, length)
                if frame is None:
                    if not self._closed:
                        logger.error("a direct sender closed mid-frame (%d bytes announced)",
                                     length)
                    return
                on_frame(frame)  # type: ignore[arg-type]

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


def _read_exactly(conn: socket.socket, length: int) -> bytearray | None:
    """`length` bytes from the socket, or None if it closes (or fails) first."""
    buffer = bytearray(length)
    view = memoryview(buffer)
    got = 0
    while got < length:
        try:
            count = conn.recv_into(view[got:])
        except OSError:
            return None
        if count == 0:
            return None
        got += count
    return buffer


def _host_address() -> str:
    """This host's name, resolved (a pod's or container's address); loopback if it resolves
    to nothing (then only stages on this host can connect; the others use NATS)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
