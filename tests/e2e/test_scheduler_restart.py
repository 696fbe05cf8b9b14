"""Requests waiting in `HS_REQUESTS` survive the scheduler: none is lost when it starts late or
restarts. Real storage, node agent, gateway and scheduler processes over real NATS and Postgres.

1. First start: requests queued before the scheduler ever ran (its event consumer, created
   then, delivers only new events) are found in the request backlog and cold-start the model.
2. Restart: requests the scheduler knew of only in memory (queued, waiting for GPU memory that
   another model's worker holds until its keep-alive ends) and one sent while it was down are
   all served after a restart (SIGTERM, start again with the same durable consumer). The one
   sent while it was down would also be found through its replayed `request.received` (and
   its cold start would serve the others too), so the test also checks the scheduler's log
   that the backlog read at start is what found all three.

The single node has GPU memory for one worker of the demo model, so model B has to wait for
model A's worker to scale to zero (`--no-evict`: otherwise B's cold start would stop the idle
A at once, and nothing would wait in the scheduler's memory across the restart).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import nats
import openai
import pytest
from nats.js.api import DeliverPolicy

from libs.common.bus import ensure_streams
from libs.common.messages import Event, EventKind
from libs.common.settings import BusSettings
from libs.common.subjects import EVENTS_STREAM, REQUESTS_STREAM, event_subject, request_subject
from tests.conftest import temporary_database
from tests.e2e.cluster import greedy_text, import_model, wait_for_consumer
from tests.e2e.conftest import USER_KEY
from tests.e2e.test_cold_start import PROMPT
from tests.processes import free_port, spawn, stop, tail, wait_for_http

if TYPE_CHECKING:
    import subprocess

    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
KEEP_ALIVE_S = 8.0
# generous: the test's cores may be shared; a lost request waits for all of it
ANSWER_TIMEOUT_S = 80.0


@dataclass
class Stack:
    nats_url: str
    database_url: str
    storage_url: str
    base_url: str
    model_a: str
    model_b: str
    consumer: str
    logs: Path
    work_dir: Path
    scheduler: subprocess.Popen[bytes] | None = None
    scheduler_starts: int = 0
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start_scheduler(self) -> None:
        assert self.scheduler is None or self.scheduler.poll() is not None
        self.scheduler_starts += 1
        log = self.logs / f"scheduler-{self.scheduler_starts}.log"
        self.scheduler = spawn([
            sys.executable, "-m", "services.scheduler", "--nats", self.nats_url,
            "--database-url", self.database_url, "--storage-url", self.storage_url,
            "--register-model", self.model_a, "--register-model", self.model_b,
            "--keep-alive", str(KEEP_ALIVE_S), "--tick", "0.5", "--no-evict",
            "--consumer", self.consumer], log)
        asyncio.run(wait_for_consumer(self.nats_url, self.consumer, self.scheduler, log))

    def stop_scheduler(self) -> None:
        assert self.scheduler is not None
        assert stop(self.scheduler) == 0, tail(self.logs / f"scheduler-{self.scheduler_starts}.log")

    def log_text(self) -> str:
        paths = sorted(self.logs.glob("*.log")) + sorted((self.work_dir / "logs").glob("*.log"))
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in paths)


async def _queued(nats_url: str, model: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().stream_info(REQUESTS_STREAM,
                                                subjects_filter=request_subject(model))
        return (info.state.subjects or {}).get(request_subject(model), 0)
    finally:
        await nc.close()


def wait_until_queued(stack: Stack, model: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while asyncio.run(_queued(stack.nats_url, model)) < count:
        assert time.monotonic() < deadline, f"requests not queued:\n{stack.log_text()}"
        time.sleep(0.1)


async def _consumer_drained(nats_url: str, consumer: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().consumer_info(EVENTS_STREAM, consumer)
        return info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await nc.close()


def wait_until_scheduler_caught_up(stack: Stack) -> None:
    """Every event so far was processed and acked by the running scheduler."""
    time.sleep(0.5)  # the gateway publishes `request.received` just after queueing
    deadline = time.monotonic() + 20
    while not asyncio.run(_consumer_drained(stack.nats_url, stack.consumer)):
        assert time.monotonic() < deadline, f"scheduler behind:\n{stack.log_text()}"
        time.sleep(0.1)


async def _events(nats_url: str, kind: str, model: str) -> list[Event]:
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(event_subject(kind, model), ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.ALL)
        events = []
        while True:
            try:
                events.append(Event.model_validate_json((await sub.next_msg(0.3)).data))
            except TimeoutError:
                return events
    finally:
        await nc.close()


def events_of(stack: Stack, kind: str, model: str) -> list[Event]:
    """The events of `kind` about `model` so far."""
    return asyncio.run(_events(stack.nats_url, kind, model))


@pytest.fixture(scope="module")
def restart_database_url(database_url: str) -> Iterator[str]:
    with temporary_database(database_url, "hs_restart") as url:
        yield url


@pytest.fixture(scope="module")
def stack(nats_url: str, restart_database_url: str, demo_model_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Storage (models A and B imported), one node agent and the gateway; no scheduler yet."""
    logs = tmp_path_factory.mktemp("restart-logs")
    suffix = uuid.uuid4().hex[:6]
    stack = Stack(nats_url=nats_url, database_url=restart_database_url,
                  storage_url=f"http://127.0.0.1:{free_port()}",
                  base_url=f"http://127.0.0.1:{free_port()}",
                  model_a=f"demo-restart-a-{suffix}", model_b=f"demo-restart-b-{suffix}",
                  consumer=f"scheduler-restart-{suffix}", logs=logs,
                  work_dir=tmp_path_factory.mktemp("restart-shm"))
    # room for one worker of the demo model, not two
    gpu_gb = 1.5 * (demo_model_dir / "model.safetensors").stat().st_size / (1 << 30)
    try:
        storage = spawn([sys.executable, "-m", "services.storage", "--root",
                         str(logs / "store"), "--port", stack.storage_url.rsplit(":", 1)[1]],
                        logs / "storage.log")
        stack.processes.append(storage)
        for model in (stack.model_a, stack.model_b):
            import_model(stack.storage_url, demo_model_dir, model, storage,
                          logs / "storage.log")
        stack.processes.append(spawn([
            sys.executable, "-m", "services.prefetcher", "--node-id", f"node-{suffix}",
            "--gpu-memory-gb", f"{gpu_gb:.9f}", "--nic-gbps", "8",
            "--storage-url", stack.storage_url, "--nats", nats_url,
            "--work-dir", str(stack.work_dir), "--heartbeat-interval", "1",
            "--worker-arg=--capacity=4"], logs / "agent.log"))
        gateway = spawn([sys.executable, "-m", "services.gateway"], logs / "gateway.log", env={
            "HYDRASERVE_NATS__URL": nats_url,
            "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
            "HYDRASERVE_GATEWAY__PORT": stack.base_url.rsplit(":", 1)[1],
            "HYDRASERVE_GATEWAY__API_KEYS": json.dumps([USER_KEY]),
            "HYDRASERVE_GATEWAY__MODELS": json.dumps([stack.model_a, stack.model_b]),
            "HYDRASERVE_GATEWAY__FIRST_TOKEN_TIMEOUT_S": str(ANSWER_TIMEOUT_S),
        })
        stack.processes.append(gateway)
        asyncio.run(_ensure_streams(nats_url))
        wait_for_http(f"{stack.base_url}/health", gateway, logs / "gateway.log")
        yield stack
    finally:
        if stack.scheduler is not None:
            stop(stack.scheduler)
        for process in reversed(stack.processes):
            stop(process)


async def _ensure_streams(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await ensure_streams(nc.jetstream(), BusSettings())
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def send(pool: ThreadPoolExecutor, stack: Stack, model: str) -> Future[str]:
    """A completion in a background thread; the future holds its text."""
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=USER_KEY, max_retries=0,
                           timeout=ANSWER_TIMEOUT_S + 10)

    def call() -> str:
        response = client.completions.create(model=model, prompt=PROMPT,
                                             max_tokens=MAX_TOKENS, temperature=0)
        return response.choices[0].text

    return pool.submit(call)


def answers(stack: Stack, futures: list[Future[str]]) -> list[str]:
    try:
        return [f.result(timeout=ANSWER_TIMEOUT_S) for f in futures]
    except (TimeoutError, openai.APIError) as exc:
        pytest.fail(f"a request was not answered ({exc!r}); logs:\n{stack.log_text()}")


def test_requests_queued_before_the_scheduler_ever_started_are_served(
    stack: Stack, pool: ThreadPoolExecutor, reference_engine: LLMEngine,
) -> None:
    futures = [send(pool, stack, stack.model_a) for _ in range(2)]
    wait_until_queued(stack, stack.model_a, 2)

    started = time.monotonic()
    stack.start_scheduler()
    texts = answers(stack, futures)

    assert texts == [greedy_text(reference_engine, PROMPT, MAX_TOKENS)] * 2
    assert (stack.logs / "scheduler-1.log").read_text().count("treating them as arrived") == 1
    print(f"\nfirst start: answered {time.monotonic() - started:.2f}s after the start")


def test_a_restarted_scheduler_serves_what_it_had_queued_and_what_came_while_it_was_down(
    stack: Stack, pool: ThreadPoolExecutor, reference_engine: LLMEngine,
) -> None:
    if stack.scheduler is None:
        stack.start_scheduler()
    # model A's worker (warm after the test before) holds the node's memory until its
    # keep-alive ends, counted from this answer: B has to wait
    assert answers(stack, [send(pool, stack, stack.model_a)]) == [
        greedy_text(reference_engine, PROMPT, MAX_TOKENS)]
    futures = [send(pool, stack, stack.model_b) for _ in range(2)]
    wait_until_queued(stack, stack.model_b, 2)
    wait_until_scheduler_caught_up(stack)
    assert not events_of(stack, EventKind.WORKER_PLACED, stack.model_b), \
        "B was placed before the restart"

    stack.stop_scheduler()
    futures.append(send(pool, stack, stack.model_b))
    wait_until_queued(stack, stack.model_b, 3)
    started = time.monotonic()
    stack.start_scheduler()
    texts = answers(stack, futures)

    assert texts == [greedy_text(reference_engine, PROMPT, MAX_TOKENS)] * 3
    # the two it knew of only in memory have no event left to replay: the backlog read at
    # start found them (and the third, whose replayed `request.received` changed nothing)
    assert f"model {stack.model_b}: 3 requests waiting in the backlog at start" in (
        stack.logs / "scheduler-2.log").read_text()
    done = {e.request_id for e in events_of(stack, EventKind.REQUEST_DONE, stack.model_b)}
    assert len(done) == 3
    assert asyncio.run(_queued(stack.nats_url, stack.model_b)) == 0
    print(f"\nrestart: answered {time.monotonic() - started:.2f}s after the restart")
