"""A whole HydraServe cluster as real processes for end-to-end tests: storage (a model
imported), scheduler (on its own database), emulated GPU nodes (node agents with a NIC cap)
and the gateway, over real NATS and PostgreSQL; and reading the events they emit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import httpx
import nats
import pytest
from nats.js.api import DeliverPolicy

from libs.common.bus import ensure_streams
from libs.common.messages import Event, EventKind
from libs.common.settings import BusSettings
from libs.common.subjects import EVENTS_STREAM, EVENTS_SUBJECTS, event_filter
from tests.e2e.conftest import USER_KEY
from tests.processes import free_port, spawn, stop, tail, wait_for_http

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

EVENT_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class ColdStack:
    base_url: str
    nats_url: str
    model: str
    node_ids: tuple[str, ...]
    work_dirs: tuple[Path, ...]
    logs: Path
    event_timeout_s: float = EVENT_TIMEOUT_S


async def read_events(nats_url: str, *, until: Callable[[list[Event]], bool],
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
        events = asyncio.run(read_events(stack.nats_url, until=lambda es: until(ours(es)),
                                          timeout=stack.event_timeout_s))
    except TimeoutError:
        pytest.fail(f"events did not arrive; logs:\n{logs_of(stack)}")
    return ours(events)


def logs_of(stack: ColdStack) -> str:
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


def import_model(storage_url: str, model_dir: Path, name: str,
                  process: subprocess.Popen[bytes], log: Path) -> None:
    wait_for_http(f"{storage_url}/models", process, log)
    response = httpx.post(f"{storage_url}/models", json={"path": str(model_dir), "name": name},
                          timeout=30)
    assert response.status_code == 201, response.text


async def wait_for_consumer(nats_url: str, name: str, process: subprocess.Popen[bytes],
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


async def _wait_for_nodes_known(database_url: str, node_ids: Sequence[str],
                                scheduler: subprocess.Popen[bytes], log: Path) -> None:
    """Until the scheduler has every node in its state (stored once it saw a heartbeat): a
    placement before that would see fewer nodes than the test means to give it."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        async with asyncio.timeout(30):
            while True:
                assert scheduler.poll() is None, f"scheduler exited:\n{tail(log)}"
                known = {r["id"] for r in await conn.fetch("SELECT id FROM nodes")}
                if known >= set(node_ids):
                    return
                await asyncio.sleep(0.1)
    finally:
        await conn.close()


@contextmanager
def cluster(*, nats_url: str, database_url: str, model_dir: Path, workspace: Path,
            name: str, node_names: Sequence[str] = ("node-a", "node-b"),
            scheduler_args: Sequence[str] = (), nic_gbps: float = 8.0,
            gpu_memory_gb: float = 16.0, worker_args: Sequence[str] = ("--capacity=2",),
            cache_gb: float = 0.0, agent_args: Sequence[str] = (),
            event_timeout_s: float = EVENT_TIMEOUT_S) -> Iterator[ColdStack]:
    """Start the cluster with `model_dir` imported as `<name>-<random>`; stop it after."""
    logs = workspace / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    suffix = uuid.uuid4().hex[:6]
    model, consumer = f"{name}-{suffix}", f"scheduler-{suffix}"
    node_ids = tuple(f"{node}-{suffix}" for node in node_names)
    work_dirs = tuple(workspace / f"shm-{node}" for node in node_names)
    storage_url = f"http://127.0.0.1:{free_port()}"
    stack = ColdStack(base_url=f"http://127.0.0.1:{free_port()}", nats_url=nats_url,
                      model=model, node_ids=node_ids, work_dirs=work_dirs, logs=logs,
                      event_timeout_s=event_timeout_s)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        storage = spawn([sys.executable, "-m", "services.storage", "--root",
                          str(workspace / "store"), "--port", storage_url.rsplit(":", 1)[1]],
                         logs / "storage.log")
        processes.append(storage)
        import_model(storage_url, model_dir, model, storage, logs / "storage.log")
        scheduler = spawn([sys.executable, "-m", "services.scheduler", "--nats", nats_url,
                            "--database-url", database_url, "--storage-url", storage_url,
                            "--register-model", model, "--consumer", consumer,
                            *scheduler_args], logs / "scheduler.log")
        processes.append(scheduler)
        for node_id, work_dir in zip(node_ids, work_dirs, strict=True):
            work_dir.mkdir(parents=True, exist_ok=True)
            processes.append(spawn([
                sys.executable, "-m", "services.prefetcher", "--node-id", node_id,
                "--gpu-memory-gb", str(gpu_memory_gb), "--nic-gbps", str(nic_gbps),
                "--storage-url", storage_url, "--nats", nats_url, "--work-dir", str(work_dir),
                "--heartbeat-interval", "1", "--cache-gb", str(cache_gb),
                *(f"--worker-arg={a}" for a in worker_args), *agent_args],
                logs / f"agent-{node_id}.log"))
        gateway = spawn([sys.executable, "-m", "services.gateway"], logs / "gateway.log", env={
            "HYDRASERVE_NATS__URL": nats_url,
            "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
            "HYDRASERVE_GATEWAY__PORT": stack.base_url.rsplit(":", 1)[1],
            "HYDRASERVE_GATEWAY__API_KEYS": json.dumps([USER_KEY]),
            "HYDRASERVE_GATEWAY__MODELS": json.dumps([model]),
        })
        processes.append(gateway)
        asyncio.run(wait_for_consumer(nats_url, consumer, scheduler, logs / "scheduler.log"))
        wait_for_http(f"{stack.base_url}/health", gateway, logs / "gateway.log")
        wait_for_events(stack, lambda es: {e.node_id for e in kinds(
            es, EventKind.NODE_REGISTERED)} == set(node_ids))
        asyncio.run(_wait_for_nodes_known(database_url, node_ids, scheduler,
                                          logs / "scheduler.log"))
        yield stack
    finally:
        for process in reversed(processes):
            stop(process)


@dataclass(frozen=True)
class AdminGateway:
    base_url: str
    # async URL of the gateway's own (migrated) database
    database_url: str
    log: Path


@contextmanager
def admin_gateway(*, nats_url: str, database_url: str, workspace: Path, admin_key: str,
                  env: dict[str, str] | None = None) -> Iterator[AdminGateway]:
    """A gateway on a database of its own (migrated) with a storage service behind its admin
    API; `env` adds HYDRASERVE_* settings. Stopped, and the database dropped, on exit."""
    from hydraserve.cli import main
    from tests.conftest import temporary_database

    with temporary_database(database_url, "hs_admin") as db_url:
        assert main(["db", "upgrade", "--database-url", db_url]) == 0
        storage_url = f"http://127.0.0.1:{free_port()}"
        storage = spawn([sys.executable, "-m", "services.storage", "--root",
                          str(workspace / "store"), "--port", storage_url.rsplit(":", 1)[1]],
                         workspace / "storage.log")
        base_url = f"http://127.0.0.1:{free_port()}"
        gateway = spawn([sys.executable, "-m", "services.gateway"], workspace / "gateway.log",
                        env={"HYDRASERVE_NATS__URL": nats_url,
                             "HYDRASERVE_DATABASE__URL": db_url,
                             "HYDRASERVE_GATEWAY__STORAGE_URL": storage_url,
                             "HYDRASERVE_GATEWAY__PORT": base_url.rsplit(":", 1)[1],
                             "HYDRASERVE_GATEWAY__ADMIN_KEY": admin_key, **(env or {})})
        try:
            wait_for_http(f"{storage_url}/models", storage, workspace / "storage.log")
            wait_for_http(f"{base_url}/health", gateway, workspace / "gateway.log")
            yield AdminGateway(base_url, db_url, workspace / "gateway.log")
        finally:
            stop(gateway)
            stop(storage)


async def audit_events(nats_url: str) -> list[Event]:
    """Every `admin.*` event in the stream."""
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.jetstream().subscribe(event_filter("admin.*"), ordered_consumer=True,
                                             deliver_policy=DeliverPolicy.ALL)
        events = []
        while True:
            try:
                events.append(Event.model_validate_json((await sub.next_msg(1.0)).data))
            except TimeoutError:
                return events
    finally:
        await nc.close()


def greedy_text(engine: LLMEngine, prompt: str, max_tokens: int) -> str:
    """What a served greedy completion of `prompt` must say: the engine in this process."""
    from services.worker.engine.sequence import SamplingParams

    engine.add_request("reference", prompt, SamplingParams(max_tokens=max_tokens,
                                                           temperature=0.0))
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    return text
