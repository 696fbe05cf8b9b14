"""The event -> SSE comment mapping of cold-start progress, and the progress stream's shape
(with a fake answer and feed: no bus)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from libs.common.errors import ServiceUnavailableError
from libs.common.messages import Event, EventKind, TokenChunk
from services.gateway.completions import _progress_then_stream
from services.gateway.formatting import CHAT, ResponseContext
from services.gateway.progress import (
    ProgressFeed,
    comment,
    is_cold_start_event,
    progress_comment,
    queued_comment,
)

pytestmark = pytest.mark.unit


def event(kind: str, node_id: str | None = "node-0", **data: Any) -> Event:
    return Event(kind=kind, model="demo", node_id=node_id, worker_id="7", data=data)


@pytest.mark.parametrize(("kind", "data", "text"), [
    (EventKind.WORKER_PLACED, {"degree": 1, "stage": 0}, "worker placed on node-0"),
    (EventKind.WORKER_PLACED, {"degree": 4, "stage": 2},
     "worker placed on node-0 (stage 3 of 4)"),
    (EventKind.FETCH_STARTED, {}, "fetching weights 0%"),
    (EventKind.FETCH_PROGRESS, {"received_bytes": 45, "total_bytes": 100},
     "fetching weights 45%"),
    (EventKind.FETCH_PROGRESS, {"received_bytes": 2, "total_bytes": 3}, "fetching weights 66%"),
    (EventKind.FETCH_DONE, {"num_bytes": 100}, "fetching weights 100%"),
    (EventKind.FETCH_FAILED, {"error": "boom"}, "fetching weights failed"),
    (EventKind.WORKER_STARTED, {"pid": 12}, "worker started"),
    (EventKind.WORKER_READY, {"load_s": 1.5}, "model loaded"),
    (EventKind.WORKER_STOPPED, {"exit_code": 1}, "worker stopped"),
])
def test_cold_start_events_become_their_comment(kind: str, data: dict[str, Any],
                                                text: str) -> None:
    assert progress_comment(event(kind, **data)) == text


@pytest.mark.parametrize("e", [
    event(EventKind.REQUEST_RECEIVED),
    event(EventKind.REQUEST_FIRST_TOKEN),
    event(EventKind.NODE_HEARTBEAT),
    event(EventKind.WORKER_STOPPED, exit_code=0),
    event(EventKind.FETCH_PROGRESS, received_bytes=5, total_bytes=0),
    event(EventKind.FETCH_PROGRESS, received_bytes="x", total_bytes=10),
    event("admin.model_registered"),
])
def test_other_events_and_malformed_data_give_no_comment(e: Event) -> None:
    assert progress_comment(e) is None


def test_placement_without_a_node_leaves_the_node_out() -> None:
    assert progress_comment(event(EventKind.WORKER_PLACED, node_id=None)) == "worker placed"


def test_comment_is_one_sse_comment_block_even_for_text_with_newlines() -> None:
    assert comment("worker started") == ": worker started\n\n"
    assert comment("a\ndata: x") == ": a\n: data: x\n\n"
    assert comment("") == ": \n\n"


def test_queued_comment_names_the_model_and_says_whether_it_is_a_cold_start() -> None:
    assert queued_comment("demo", cold_start=True) == "queued for model demo (cold start)"
    assert queued_comment("demo", cold_start=False) == "queued for model demo"
    assert is_cold_start_event(event(EventKind.WORKER_PLACED))
    assert not is_cold_start_event(event(EventKind.REQUEST_RECEIVED))


# --- the progress stream, with fakes ---------------------------------------------------------


class FakeAnswer:
    def __init__(self, chunks: list[TokenChunk]) -> None:
        self._chunks = chunks
        self.closed = False

    def __aiter__(self) -> FakeAnswer:
        return self

    async def __anext__(self) -> TokenChunk:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def close(self) -> None:
        self.closed = True


async def run_stream(first: asyncio.Future[TokenChunk], feed: ProgressFeed, answer: FakeAnswer,
                     script: list[tuple[float, Event | TokenChunk | Exception]],
                     keepalive_s: float = 10.0) -> list[str]:
    """Plays `script` (delay, then an event for the feed or the first chunk's outcome)."""

    async def play() -> None:
        for delay, item in script:
            await asyncio.sleep(delay)
            if isinstance(item, Event):
                feed.events.put_nowait(item)
            elif isinstance(item, Exception):
                first.set_exception(item)
            else:
                first.set_result(item)

    player = asyncio.create_task(play())
    ctx = ResponseContext("chatcmpl-1", 0, "demo")
    parts = [part async for part in _progress_then_stream(
        CHAT, ctx, feed, first, answer, keepalive_s=keepalive_s)]  # type: ignore[arg-type]
    await player
    return parts


def chunk(seq: int, text: str, finish: str | None = None) -> TokenChunk:
    return TokenChunk(request_id="chatcmpl-1", seq=seq, text=text,
                      finish_reason=finish)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_progress_comments_come_in_order_before_the_first_data_chunk() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[TokenChunk] = loop.create_future()
    feed = ProgressFeed()
    feed.events.put_nowait(event(EventKind.WORKER_PLACED, degree=1, stage=0))
    answer = FakeAnswer([chunk(1, " there", "stop")])

    parts = await run_stream(first, feed, answer, [
        (0.01, event(EventKind.FETCH_STARTED)),
        (0.01, event(EventKind.REQUEST_RECEIVED)),
        (0.01, event(EventKind.FETCH_PROGRESS, received_bytes=1, total_bytes=2)),
        (0.01, event(EventKind.FETCH_PROGRESS, received_bytes=1, total_bytes=2)),
        (0.01, event(EventKind.WORKER_STARTED)),
        (0.01, event(EventKind.WORKER_READY)),
        (0.05, chunk(0, "Hi")),
    ])

    comments = [p for p in parts if p.startswith(":")]
    assert comments == [comment(t) for t in (
        "queued for model demo (cold start)", "worker placed on node-0", "fetching weights 0%",
        "fetching weights 50%", "worker started", "model loaded")]
    assert parts[:len(comments)] == comments
    data = [json.loads(p.removeprefix("data: ")) for p in parts[len(comments):-1]]
    assert [c["choices"][0]["delta"] for c in data] == [
        {"role": "assistant", "content": ""}, {"content": "Hi"}, {"content": " there"}, {}]
    assert parts[-1] == "data: [DONE]\n\n"
    assert answer.closed


@pytest.mark.anyio
async def test_a_quiet_wait_sends_keepalives_and_a_timeout_ends_with_an_error_event() -> None:
    first: asyncio.Future[TokenChunk] = asyncio.get_running_loop().create_future()
    answer = FakeAnswer([])

    parts = await run_stream(first, ProgressFeed(), answer, [
        (0.45, ServiceUnavailableError("No worker of model 'demo' answered within 1s"))],
        keepalive_s=0.1)

    assert parts[0] == comment("queued for model demo")
    assert 2 <= parts.count(comment("waiting")) <= 5
    error = json.loads(parts[-2].removeprefix("data: "))
    assert error["error"]["code"] == "service_unavailable"
    assert parts[-1] == "data: [DONE]\n\n"
    assert answer.closed
