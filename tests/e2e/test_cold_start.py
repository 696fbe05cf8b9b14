"""The single-worker cold start end to end: storage (demo model imported), scheduler, two node
agents and the gateway as real processes over real NATS and PostgreSQL; the `openai` client
asks for a model no worker serves -> placed -> fetched while the worker starts -> answered;
then warm; then scaled to zero after its keep-alive, and cold-started again."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import nats
import openai
import pytest
from nats.js.api import DeliverPolicy

from libs.common.bus import ensure_streams
from libs.common.messages import Event, EventKind
from libs.common.settings import BusSettings
from libs.common.subjects import EVENTS_STREAM, EVENTS_SUBJECTS
from tests.conftest import temporary_database
from tests.e2e.conftest import USER_KEY
from tests.processes import free_port, spawn, stop, tail, wait_for_http

if TYPE_CHECKING:
    import subprocess

    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
KEEP_ALIVE_S = 3.0
EVENT_TIMEOUT_S = 45.0
NODE_IDS = ("node-a", "node-b")
COLD_START_ORDER = [EventKind.REQUEST_RECEIVED, EventKind.WORKER_PLACED,
                    EventKind.FETCH_STARTED, EventKind.WORKER_STARTED, EventKind.WORKER_READY,
                    EventKind.REQUEST_FIRST_TOKEN]


@dataclass(frozen=True)
class ColdStack:
    base_url: str
    nats_url: str
    model: str
    node_ids: tuple[str, ...]
    work_dirs: tuple[Path, ...]
    logs: Path


async def _read_events(nats_url: str, *, until: Callable[[list[Event]], bool],
                       timeout: float) -> list[Event]:
    """Every event in the stream, in stream order, once `until` holds for them."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(EVENTS_SUBJECTS, ordered_consumer=True,
                                 deliver_policy=DeliverPolicy.ALL)
        events: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    events.append(Event.model_validate_json((await sub.next_msg(0.2)).data))
                    continue
                except TimeoutError:
                    pass
                if until(events):
                    return events
    finally:
        await nc.close()


def wait_for_events(stack: ColdStack, until: Callable[[list[Event]], bool]) -> list[Event]:
    """The events of the stack's model and nodes, once `until` holds for them."""

    def ours(events: list[Event]) -> list[Event]:
        return [e for e in events if e.model == stack.model or e.node_id in stack.node_ids]

    try:
        events = asyncio.run(_read_events(stack.nats_url, until=lambda es: until(ours(es)),
                                          timeout=EVENT_TIMEOUT_S))
    except TimeoutError:
        pytest.fail(f"events did not arrive; logs:\n{_logs(stack)}")
    return ours(events)


def _logs(stack: ColdStack) -> str:
    paths = sorted(stack.logs.glob("*.log")) + sorted(
        p for d in stack.work_dirs for p in (d / "logs").glob("*.log"))
    return "\n".join(f"--- {p.name}\n{tail(p)}" for p in paths)


def kinds(events: list[Event], kind: str, **data: object) -> list[Event]:
    return [e for e in events if e.kind == kind
            and all(e.data.get(k) == v for k, v in data.items())]


def timeline(events: list[Event]) -> str:
    """The cold start's events and the worker's start-up phases, in seconds from arrival."""
    start = kinds(events, EventKind.REQUEST_RECEIVED)[0].time
    moments = [(e.time, e.kind) for e in events if e.kind != EventKind.NODE_HEARTBEAT]
    (ready,) = kinds(events, EventKind.WORKER_READY)
    moments += [(at, f"  worker phase {name}") for name, at in ready.data["phases"].items()]
    return "\n".join(f"{at - start:+8.3f}s {what}" for at, what in sorted(moments)
                     if at >= start)


def _import_model(storage_url: str, model_dir: Path, name: str,
                  process: subprocess.Popen[bytes], log: Path) -> None:
    wait_for_http(f"{storage_url}/models", process, log)
    response = httpx.post(f"{storage_url}/models", json={"path": str(model_dir), "name": name},
                          timeout=30)
    assert response.status_code == 201, response.text


async def _wait_for_consumer(nats_url: str, name: str, process: subprocess.Popen[bytes],
                             log: Path) -> None:
    """The scheduler is listening once its durable consumer exists (after registration)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, BusSettings())
        async with asyncio.timeout(60):
            while True:
                assert process.poll() is None, f"scheduler exited:\n{tail(log)}"
                try:
                    await js.consumer_info(EVENTS_STREAM, name)
                    return
                except nats.js.errors.NotFoundError:
                    await asyncio.sleep(0.05)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def cold_database_url(database_url: str) -> Iterator[str]:
    with temporary_database(database_url, "hs_cold") as url:
        yield url


@pytest.fixture(scope="module")
def cold_stack(nats_url: str, cold_database_url: str, demo_model_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ColdStack]:
    logs = tmp_path_factory.mktemp("cold-logs")
    suffix = uuid.uuid4().hex[:6]
    model, consumer = f"demo-cold-{suffix}", f"scheduler-{suffix}"
    node_ids = tuple(f"{node}-{suffix}" for node in NODE_IDS)
    work_dirs = tuple(tmp_path_factory.mktemp(f"shm-{node}") for node in NODE_IDS)
    storage_url = f"http://127.0.0.1:{free_port()}"
    stack = ColdStack(base_url=f"http://127.0.0.1:{free_port()}", nats_url=nats_url,
                      model=model, node_ids=node_ids, work_dirs=work_dirs, logs=logs)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        storage = spawn([sys.executable, "-m", "services.storage", "--root",
                          str(logs / "store"), "--port", storage_url.rsplit(":", 1)[1]],
                         logs / "storage.log")
        processes.append(storage)
        _import_model(storage_url, demo_model_dir, model, storage, logs / "storage.log")
        scheduler = spawn([sys.executable, "-m", "services.scheduler", "--nats", nats_url,
                            "--database-url", cold_database_url, "--storage-url", storage_url,
                            "--register-model", model, "--keep-alive", str(KEEP_ALIVE_S),
                            "--consumer", consumer], logs / "scheduler.log")
        processes.append(scheduler)
        for node_id, work_dir in zip(node_ids, work_dirs, strict=True):
            processes.append(spawn([
                sys.executable, "-m", "services.prefetcher", "--node-id", node_id,
                "--gpu-memory-gb", "16", "--nic-gbps", "8", "--storage-url", storage_url,
                "--nats", nats_url, "--work-dir", str(work_dir), "--heartbeat-interval", "1",
                "--worker-arg=--capacity=2"], logs / f"agent-{node_id}.log"))
        gateway = spawn([sys.executable, "-m", "services.gateway"], logs / "gateway.log", env={
            "HYDRASERVE_NATS__URL": nats_url,
            "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
            "HYDRASERVE_GATEWAY__PORT": stack.base_url.rsplit(":", 1)[1],
            "HYDRASERVE_GATEWAY__API_KEYS": json.dumps([USER_KEY]),
            "HYDRASERVE_GATEWAY__MODELS": json.dumps([model]),
        })
        processes.append(gateway)
        asyncio.run(_wait_for_consumer(nats_url, consumer, scheduler, logs / "scheduler.log"))
        wait_for_http(f"{stack.base_url}/health", gateway, logs / "gateway.log")
        wait_for_events(stack, lambda es: {e.node_id for e in kinds(
            es, EventKind.NODE_REGISTERED)} == set(node_ids))
        yield stack
    finally:
        for process in reversed(processes):
            stop(process)


@pytest.fixture
def client(cold_stack: ColdStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cold_stack.base_url}/v1", api_key=USER_KEY,
                         max_retries=0, timeout=60)


def expected_text(engine: LLMEngine, max_tokens: int) -> str:
    from services.worker.engine.sequence import SamplingParams

    engine.add_request("reference", PROMPT, SamplingParams(max_tokens=max_tokens,
                                                           temperature=0.0))
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    return text


def complete(client: openai.OpenAI, stack: ColdStack) -> tuple[str, float]:
    started = time.monotonic()
    response = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=12,
                                         temperature=0)
    return response.choices[0].text, time.monotonic() - started


def test_a_request_for_a_model_without_workers_cold_starts_one_and_gets_the_greedy_answer(
    client: openai.OpenAI, cold_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    text, seconds = complete(client, cold_stack)

    assert text == expected_text(reference_engine, 12)
    events = wait_for_events(cold_stack, lambda es: bool(kinds(es, EventKind.REQUEST_DONE)))
    firsts = [next(i for i, e in enumerate(events) if e.kind == kind)
              for kind in COLD_START_ORDER]
    assert firsts == sorted(firsts), [events[i].kind for i in firsts]
    assert len(kinds(events, EventKind.WORKER_PLACED)) == 1
    print(f"\ncold start: {seconds:.2f}s to the answer; timeline:\n{timeline(events)}")


def test_a_second_request_is_served_warm_without_a_new_placement(
    client: openai.OpenAI, cold_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    text, seconds = complete(client, cold_stack)

    assert text == expected_text(reference_engine, 12)
    events = wait_for_events(cold_stack,
                             lambda es: len(kinds(es, EventKind.REQUEST_DONE)) == 2)
    assert len(kinds(events, EventKind.WORKER_PLACED)) == 1
    print(f"warm: {seconds:.2f}s to the answer")


def test_an_idle_worker_stops_after_its_keep_alive_and_the_next_request_cold_starts_again(
    client: openai.OpenAI, cold_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    events = wait_for_events(cold_stack, lambda es: bool(
        kinds(es, EventKind.WORKER_STOPPED, by="node_agent")))
    (launched,) = kinds(events, EventKind.WORKER_LAUNCHED)
    with pytest.raises(ProcessLookupError):
        os.kill(launched.data["pid"], 0)
    assert [p for d in cold_stack.work_dirs for p in d.glob("w*")] == []

    text, _ = complete(client, cold_stack)

    assert text == expected_text(reference_engine, 12)
    events = wait_for_events(cold_stack,
                             lambda es: len(kinds(es, EventKind.REQUEST_DONE)) == 3)
    assert len(kinds(events, EventKind.WORKER_PLACED)) == 2
