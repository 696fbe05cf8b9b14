"""End-to-end fixtures: a real worker process and a real gateway (uvicorn) over real NATS."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nats
import pytest
from nats.js.api import DeliverPolicy

from libs.common.bus import ensure_streams
from libs.common.messages import Event, EventKind
from libs.common.settings import BusSettings
from libs.common.subjects import event_subject
from tests.processes import START_TIMEOUT_S, free_port, spawn, stop, tail, wait_for_http

if TYPE_CHECKING:
    pass

ADMIN_KEY = "sk-admin-e2e-0123456789"
USER_KEY = "sk-user-e2e-0123456789"


@dataclass(frozen=True)
class WarmStack:
    base_url: str
    admin_key: str
    user_key: str
    # served by a warm worker
    model: str
    # registered on the gateway, but no worker serves it
    idle_model: str
    # registered, for a test to play a worker that goes silent mid-answer
    stalled_model: str








async def _wait_for_worker_ready(nats_url: str, model: str, worker_id: str,
                                 process: subprocess.Popen[bytes], log_path: Path) -> None:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, BusSettings())
        sub = await js.subscribe(event_subject(EventKind.WORKER_READY, model),
                                 ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                assert process.poll() is None, f"worker exited:\n{tail(log_path)}"
                try:
                    event = Event.model_validate_json((await sub.next_msg(0.1)).data)
                except TimeoutError:
                    continue
                if event.worker_id == worker_id:
                    return
    finally:
        await nc.close()






@pytest.fixture
def anyio_backend() -> str:
    # nats-py runs on asyncio only
    return "asyncio"


@pytest.fixture(scope="module")
def warm_stack(nats_url: str, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[WarmStack]:
    """One warm worker of `model` and a gateway serving it (and `idle_model`, workerless)."""
    logs = tmp_path_factory.mktemp("e2e-logs")
    suffix = uuid.uuid4().hex[:6]
    stack = WarmStack(base_url=f"http://127.0.0.1:{free_port()}", admin_key=ADMIN_KEY,
                      user_key=USER_KEY,
                      model=f"hydra/demo-tiny-{suffix}", idle_model=f"hydra/idle-{suffix}",
                      stalled_model=f"hydra/stalled-{suffix}")
    worker_id = f"e2e-{suffix}"
    worker = spawn([sys.executable, "-m", "services.worker", "--model-dir",
                     str(demo_model_dir), "--model", stack.model, "--nats", nats_url,
                     "--worker-id", worker_id, "--capacity", "4"], logs / "worker.log")
    gateway = spawn([sys.executable, "-m", "services.gateway"], logs / "gateway.log", env={
        "HYDRASERVE_NATS__URL": nats_url,
        "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
        "HYDRASERVE_GATEWAY__PORT": stack.base_url.rsplit(":", 1)[1],
        "HYDRASERVE_GATEWAY__ADMIN_KEY": ADMIN_KEY,
        "HYDRASERVE_GATEWAY__API_KEYS": json.dumps([USER_KEY]),
        "HYDRASERVE_GATEWAY__MODELS": json.dumps([stack.model, stack.idle_model,
                                                  stack.stalled_model]),
        "HYDRASERVE_GATEWAY__FIRST_TOKEN_TIMEOUT_S": "2",
        "HYDRASERVE_GATEWAY__INTER_TOKEN_TIMEOUT_S": "2",
        "HYDRASERVE_GATEWAY__RETRY_AFTER_S": "3",
    })
    try:
        asyncio.run(_wait_for_worker_ready(nats_url, stack.model, worker_id, worker,
                                           logs / "worker.log"))
        wait_for_http(f"{stack.base_url}/health", gateway, logs / "gateway.log")
        yield stack
    finally:
        exit_codes = (stop(gateway), stop(worker))
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to exit
    assert exit_codes in ((0, 0), (-signal.SIGTERM, 0)), \
        f"{tail(logs / 'gateway.log')}\n{tail(logs / 'worker.log')}"
