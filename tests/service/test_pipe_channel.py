"""The pipeline data plane against a real NATS server: direct sockets found over NATS, NATS
where a stage has no socket, frames in order and intact either way."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from services.worker.pipeline.channel import PipeChannel

pytestmark = pytest.mark.service

TIMEOUT_S = 10.0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.drain()


async def _received(inbox: queue.SimpleQueue[bytes], count: int) -> list[bytes]:
    frames = []
    for _ in range(count):
        frames.append(bytes(await asyncio.to_thread(inbox.get, timeout=TIMEOUT_S)))
    return frames


def _frame(index: int, size: int = 64) -> bytes:
    return index.to_bytes(4, "big") * (size // 4)


@contextlib.asynccontextmanager
async def _channels(nc: NATS, *, direct_receiver: bool = True
                    ) -> AsyncIterator[tuple[PipeChannel, PipeChannel, queue.SimpleQueue[bytes]]]:
    """Stage 0 (direct) and stage 1 of a new endpoint, started, and closed at the end; stage
    1's frames land in the queue."""
    endpoint = uuid.uuid4().hex
    sender = PipeChannel(nc, endpoint, direct=True, advertise_host="127.0.0.1")
    receiver = PipeChannel(nc, endpoint, direct=direct_receiver, advertise_host="127.0.0.1")
    inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    await sender.start(0, lambda frame: None)
    await receiver.start(1, inbox.put)
    try:
        yield sender, receiver, inbox
    finally:
        await asyncio.wait_for(sender.close(), TIMEOUT_S)
        await receiver.close()


@pytest.mark.anyio
async def test_frames_go_on_the_direct_socket_in_order_after_the_first(nc: NATS) -> None:
    async with _channels(nc) as (sender, receiver, inbox):
        assert receiver.address is not None and receiver.address.startswith("127.0.0.1:")
        # a burst: the first frames queue while the sender asks for the address and connects
        frames = [_frame(i) for i in range(200)]
        for frame in frames[:100]:
            sender.send_threadsafe(1, frame)
        assert await _received(inbox, 100) == frames[:100]
        for frame in frames[100:]:
            await asyncio.to_thread(sender.send_threadsafe, 1, frame)
        assert await _received(inbox, 100) == frames[100:]
        assert sender.num_frames_sent == 200
        # everything went on the socket; after the connect, without the sender task
        assert sender.num_frames_direct == 200

@pytest.mark.anyio
async def test_a_frame_of_many_megabytes_arrives_intact_on_the_socket(nc: NATS) -> None:
    async with _channels(nc) as (sender, _receiver, inbox):
        # 40 MiB and a bit, over NATS's max_payload
        big = bytes(range(256)) * (40 * 1024 * 1024 // 256 + 3)
        sender.send_threadsafe(1, _frame(1))
        sender.send_threadsafe(1, big)
        sender.send_threadsafe(1, _frame(2))
        assert await _received(inbox, 3) == [_frame(1), big, _frame(2)]
        assert sender.num_frames_direct == 3


@pytest.mark.anyio
async def test_a_stage_without_a_socket_gets_its_frames_over_nats(nc: NATS) -> None:
    # stage 1 answers no address requests
    async with _channels(nc, direct_receiver=False) as (sender, _receiver, inbox):
        frames = [_frame(i) for i in range(20)]
        for frame in frames:
            sender.send_threadsafe(1, frame)
        assert await _received(inbox, 20) == frames
        assert sender.num_frames_sent == 20 and sender.num_frames_direct == 0


@pytest.mark.anyio
async def test_an_unreachable_address_falls_back_to_nats(nc: NATS) -> None:
    async with _channels(nc) as (sender, receiver, inbox):
        receiver.address = "127.0.0.1:1"  # it advertises an address nothing listens on
        sender.send_threadsafe(1, _frame(7))
        sender.send_threadsafe(1, _frame(8))
        assert await _received(inbox, 2) == [_frame(7), _frame(8)]
        assert sender.num_frames_direct == 0


@pytest.mark.anyio
async def test_after_a_direct_receiver_closes_later_frames_take_nats(nc: NATS) -> None:
    async with _channels(nc) as (sender, receiver, inbox):
        sender.send_threadsafe(1, _frame(1))
        assert await _received(inbox, 1) == [_frame(1)]
        await receiver.close()
        # a stage 1 that listens on NATS only (as a replacement would, before it is asked)
        successor = PipeChannel(nc, receiver.endpoint_id, direct=False)
        later: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        await successor.start(1, later.put)
        # a write into the closed socket fails within a few frames (the peer resets it; the
        # first writes may still land in the kernel's buffer, lost as to a dead stage); from the
        # failed one on, the frames take NATS and reach the successor
        frames = [_frame(i, size=64 * 1024) for i in range(50)]
        for frame in frames:
            await asyncio.to_thread(sender.send_threadsafe, 1, frame)
            await asyncio.sleep(0.005)
        over_nats = 51 - sender.num_frames_direct
        assert 0 < over_nats <= 50
        assert sender.num_frames_sent == 51
        assert await _received(later, over_nats) == frames[-over_nats:]
        await successor.close()


def _stray_client(address: str, payload: bytes) -> bytes:
    """Connect to a stage's listener, send `payload`; what it answers before it closes."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as stray:
        stray.sendall(payload)
        try:
            return stray.recv(1)  # b"" once the receiver closes it
        except ConnectionResetError:  # closed with our extra bytes unread: a reset
            return b""


@pytest.mark.anyio
async def test_a_connection_that_sends_no_hello_is_closed(
    nc: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    async with _channels(nc) as (sender, receiver, inbox):
        assert receiver.address is not None

        # not a stage at all: a length that would ask for exabytes, behind the wrong magic
        assert await asyncio.to_thread(
            _stray_client, receiver.address, b"GET / HTTP/1.1\r\n" + b"\xff" * 16) == b""
        assert "no valid hello" in caplog.text
        sender.send_threadsafe(1, _frame(3))
        assert await _received(inbox, 1) == [_frame(3)]
        assert sender.num_frames_direct == 1


@pytest.mark.anyio
async def test_a_client_that_knows_the_wire_format_but_not_the_token_gets_no_frame_in(
    nc: NATS, caplog: pytest.LogCaptureFixture
) -> None:
    async with _channels(nc) as (sender, receiver, inbox):
        assert receiver.address is not None
        forged = (struct.pack(">4s16s", b"HSH1", bytes(16))
                  + struct.pack(">4sQ", b"HSP1", 64) + _frame(666))

        assert await asyncio.to_thread(_stray_client, receiver.address, forged) == b""
        assert "no valid hello" in caplog.text
        # the stage's own sender, which asked NATS for the token, gets through; the forged
        # frame never arrived
        sender.send_threadsafe(1, _frame(4))
        assert await _received(inbox, 1) == [_frame(4)]
        assert inbox.empty()


@pytest.mark.anyio
async def test_direct_frames_can_be_taken_on_their_reader_thread_and_nats_frames_stay_apart(
    nc: NATS,
) -> None:
    endpoint = uuid.uuid4().hex
    sender = PipeChannel(nc, endpoint, direct=True, advertise_host="127.0.0.1")
    nats_sender = PipeChannel(nc, endpoint, direct=False)
    receiver = PipeChannel(nc, endpoint, direct=True, advertise_host="127.0.0.1")
    loop_thread = threading.get_ident()
    direct: queue.SimpleQueue[tuple[bytes, int]] = queue.SimpleQueue()
    over_nats: queue.SimpleQueue[bytes] = queue.SimpleQueue()
    await sender.start(0, lambda frame: None)
    await nats_sender.start(2, lambda frame: None)
    await receiver.start(1, over_nats.put,
                         on_direct_frame=lambda frame: direct.put((frame, threading.get_ident())))
    try:
        for index in range(5):
            await asyncio.to_thread(sender.send_threadsafe, 1, _frame(index))
        nats_sender.send_threadsafe(1, _frame(99))
        got = [await asyncio.to_thread(direct.get, timeout=TIMEOUT_S) for _ in range(5)]
        assert await _received(over_nats, 1) == [_frame(99)]
    finally:
        for channel in (sender, nats_sender):
            await asyncio.wait_for(channel.close(), TIMEOUT_S)
        await receiver.close()

    assert [bytes(frame) for frame, _ in got] == [_frame(i) for i in range(5)]
    # the first went through the sender task (connecting), all arrived on the socket
    assert sender.num_frames_direct == 5
    (reader,) = {thread for _, thread in got}
    assert reader != loop_thread
