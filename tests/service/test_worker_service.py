"""The worker service against real NATS: real worker processes on the demo model answer
requests published on the bus, exactly as the engine does on its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy

from libs.common.bus import ensure_streams
from libs.common.messages import Event, EventKind, GenerateRequest, SamplingOptions, TokenChunk
from libs.common.settings import BusSettings
from libs.common.subjects import (
    REQUESTS_STREAM,
    event_subject,
    request_consumer,
    request_subject,
    token_subject,
)

if TYPE_CHECKING:
    from services.worker.engine.engine import Completion, LLMEngine

pytestmark = pytest.mark.service

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0
PROMPT = "Once upon a time"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Worker:
    """A `python -m services.worker` child process with its log."""

    def __init__(self, nats_url: str, model_dir: Path, model: str, log_dir: Path,
                 *extra: str) -> None:
        # a worker that exits early leaves its log behind for the failure message
        self.model = model
        self.worker_id = f"w-{uuid.uuid4().hex[:8]}"
        self.log_path = log_dir / f"{self.worker_id}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.worker", "--model-dir", str(model_dir),
                 "--model", model, "--nats", nats_url, "--worker-id", self.worker_id, *extra],
                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)

    def log_tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


async def wait_until_ready(nats_url: str, *workers: Worker) -> None:
    """Until each worker's worker.ready event is in the event stream (or it exits)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, BusSettings())
        pending = {worker.worker_id: worker for worker in workers}
        subjects = {event_subject(EventKind.WORKER_READY, worker.model) for worker in workers}
        subs = [await js.subscribe(subject, ordered_consumer=True,
                                   deliver_policy=DeliverPolicy.ALL) for subject in subjects]
        async with asyncio.timeout(TIMEOUT_S):
            while pending:
                for sub in subs:
                    try:
                        event = Event.model_validate_json((await sub.next_msg(0.1)).data)
                    except TimeoutError:
                        continue
                    pending.pop(event.worker_id or "", None)
                for worker in pending.values():
                    assert worker.process.poll() is None, f"worker exited:\n{worker.log_tail()}"
    finally:
        await nc.close()




async def send(nc: NATS, request: GenerateRequest) -> Subscription:
    """Subscribe to the answer, then queue the request; the answer's subscription."""
    subscription = await nc.subscribe(token_subject(request.request_id))
    await nc.jetstream().publish(request_subject(request.model),
                                 request.model_dump_json().encode(), stream=REQUESTS_STREAM)
    return subscription


async def collect(subscription: Subscription, *,
                  on_chunk: Callable[[TokenChunk], Awaitable[None]] | None = None,
                  ) -> list[TokenChunk]:
    """The chunks of one answer by seq, first copy of each, up to the last one."""
    chunks: dict[int, TokenChunk] = {}
    async with asyncio.timeout(TIMEOUT_S):
        while True:
            chunk = TokenChunk.model_validate_json((await subscription.next_msg(TIMEOUT_S)).data)
            if on_chunk is not None:
                await on_chunk(chunk)
            chunks.setdefault(chunk.seq, chunk)
            last = next((c for c in chunks.values() if c.is_last), None)
            if last is not None and len(chunks) == last.seq + 1:
                return [chunks[seq] for seq in range(last.seq + 1)]


def greedy(max_tokens: int, *, ignore_eos: bool = False) -> SamplingOptions:
    return SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


def reference(engine: LLMEngine, prompt: str, sampling: SamplingOptions) -> Completion:
    """What the engine itself answers, in this process."""
    from services.worker.engine.engine import generate
    from services.worker.engine.sequence import SamplingParams

    return generate(engine, [prompt], SamplingParams(**sampling.model_dump()))[0]


class Fleet:
    """The workers of one model. Tests may stop some; each needs only the live ones."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers = workers
        self.model = workers[0].model

    def alive(self) -> dict[str, Worker]:
        return {w.worker_id: w for w in self.workers if w.process.poll() is None}


@pytest.fixture(scope="module")
def fleet(nats_url: str, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Fleet]:
    """Three workers of one model, started at once (start-up dominates the run time). The
    kill test ends one and the SIGTERM test another, in either order, so one always serves.
    A short ack wait makes a dead worker's requests come back within seconds."""
    logs = tmp_path_factory.mktemp("logs")
    # characters a subject token cannot hold: the name is encoded on the bus
    model = f"demo/tiny v1.{uuid.uuid4().hex[:6]}"
    workers = [Worker(nats_url, demo_model_dir, model, logs, "--ack-wait", "2") for _ in range(3)]
    try:
        asyncio.run(wait_until_ready(nats_url, *workers))
        yield Fleet(workers)
    finally:
        for worker in workers:
            worker.stop()


def new_request(model: str, prompt: str, sampling: SamplingOptions) -> GenerateRequest:
    return GenerateRequest(request_id=f"t-{uuid.uuid4().hex}", model=model, prompt=prompt,
                           sampling=sampling)


@pytest.mark.anyio
async def test_worker_answers_with_chunks_whose_text_is_the_engines_greedy_output(
    nats_url: str, fleet: Fleet, reference_engine: LLMEngine,
) -> None:
    request = new_request(fleet.model, PROMPT, greedy(24))
    expected = reference(reference_engine, PROMPT, request.sampling)
    nc = await nats.connect(nats_url)
    try:
        chunks = await collect(await send(nc, request))
    finally:
        await nc.close()

    assert [c.seq for c in chunks] == list(range(24))
    assert "".join(c.text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids
    assert (chunks[-1].finish_reason, chunks[-1].usage and chunks[-1].usage.model_dump()) == (
        "length", {"prompt_tokens": expected.prompt_tokens, "completion_tokens": 24,
                   "total_tokens": expected.prompt_tokens + 24})
    assert len({c.worker_id for c in chunks}) == 1


@pytest.mark.anyio
async def test_oversize_prompt_gets_one_error_chunk_and_leaves_nothing_queued(
    nats_url: str, fleet: Fleet,
) -> None:
    request = new_request(fleet.model, "tale " * 2100, greedy(8))
    nc = await nats.connect(nats_url)
    try:
        chunks = await collect(await send(nc, request))
        js = nc.jetstream()
        async with asyncio.timeout(TIMEOUT_S):
            while True:  # the message is terminated right after the chunk is sent
                info = await js.consumer_info(REQUESTS_STREAM, request_consumer(fleet.model))
                if (info.num_pending, info.num_ack_pending) == (0, 0):
                    break
                await asyncio.sleep(0.02)
    finally:
        await nc.close()

    assert len(chunks) == 1
    assert (chunks[0].finish_reason, chunks[0].text, chunks[0].usage) == ("error", "", None)
    assert chunks[0].error is not None
    assert (chunks[0].error.code, chunks[0].error.param, chunks[0].error.http_status) == (
        "context_length_exceeded", "prompt", 400)


@pytest.mark.anyio
async def test_request_of_a_killed_worker_is_redelivered_to_another_and_answered_in_full(
    nats_url: str, fleet: Fleet, reference_engine: LLMEngine,
) -> None:
    alive = fleet.alive()
    assert len(alive) >= 2
    request = new_request(fleet.model, PROMPT, greedy(300, ignore_eos=True))
    expected = reference(reference_engine, PROMPT, request.sampling)
    killed: list[str] = []

    async def kill_the_worker_that_answers(chunk: TokenChunk) -> None:
        if not killed and chunk.worker_id is not None:
            alive[chunk.worker_id].process.send_signal(signal.SIGKILL)
            killed.append(chunk.worker_id)

    nc = await nats.connect(nats_url)
    try:
        chunks = await collect(await send(nc, request), on_chunk=kill_the_worker_that_answers)
    finally:
        await nc.close()

    assert alive[killed[0]].process.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
    assert chunks[-1].worker_id in set(alive) - set(killed)
    assert "".join(c.text for c in chunks) == expected.text
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids


@pytest.mark.anyio
async def test_sigterm_lets_the_in_flight_request_finish_then_the_worker_exits_cleanly(
    nats_url: str, fleet: Fleet, reference_engine: LLMEngine,
) -> None:
    alive = fleet.alive()
    request = new_request(fleet.model, PROMPT, greedy(200, ignore_eos=True))
    expected = reference(reference_engine, PROMPT, request.sampling)
    terminated: list[str] = []

    async def terminate_the_worker_that_answers(chunk: TokenChunk) -> None:
        if not terminated and chunk.worker_id is not None:
            alive[chunk.worker_id].process.send_signal(signal.SIGTERM)
            terminated.append(chunk.worker_id)

    nc = await nats.connect(nats_url)
    try:
        chunks = await collect(await send(nc, request),
                               on_chunk=terminate_the_worker_that_answers)
    finally:
        await nc.close()

    worker = alive[terminated[0]]
    assert worker.process.wait(timeout=TIMEOUT_S) == 0, worker.log_tail()
    assert {c.worker_id for c in chunks} == {worker.worker_id}
    assert "".join(c.text for c in chunks) == expected.text


def test_worker_service_imports_none_of_the_web_or_database_stacks() -> None:
    forbidden = ("fastapi", "starlette", "sqlalchemy", "asyncpg", "alembic", "kubernetes",
                 "transformers", "uvicorn")
    script = (
        "import json, sys\n"
        "import services.worker.__main__, services.worker.service\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {forbidden!r})))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True, cwd=REPO_ROOT, env={**os.environ})
    assert json.loads(result.stdout) == []
