"""Workers forked from a zygote with the worker's imports done (`--launcher forkserver`).

The agent starts one `services.worker.zygote` process at its own start (it imports torch
while the node is idle) and asks it for a worker per placement; the worker skips its imports
(seconds of torch) and starts loading at once. Protocol and process tree: see the zygote's
docstring. The zygote is the workers' parent, so exit codes come from it (`{"exit": ...}`);
the handle signals the worker directly. A zygote that dies fails the launches waiting on it
and every live worker's wait, with exit code -9 (its children die with it).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from libs.common.embedded.process import parent_death_preexec
from services.prefetcher.launcher import WorkerSpec, terminate_worker

logger = logging.getLogger(__name__)

# the exit code reported for workers lost with their zygote (they die by SIGKILL)
LOST = -signal.SIGKILL
ZYGOTE_START_TIMEOUT_S = 120.0


class ForkedWorker:
    def __init__(self, pid: int, exited: asyncio.Future[int]) -> None:
        self._pid = pid
        self._exited = exited

    @property
    def pid(self) -> int:
        return self._pid

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def terminate(self, timeout_s: float) -> int:
        return await terminate_worker(self._pid, self._signal, self.wait, timeout_s)

    def _signal(self, signum: int) -> None:
        if self._exited.done():  # reaped: the pid may be another process's by now
            raise ProcessLookupError(self._pid)
        os.kill(self._pid, signum)


class ForkServerLauncher:
    def __init__(self, *, log_path: Path, cwd: Path | None = None) -> None:
        self._log_path = log_path
        self._cwd = cwd
        self._zygote: asyncio.subprocess.Process | None = None
        # reads the zygote's replies for as long as it lives
        self._reader: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        # request id -> the pid (or the error) once forked
        self._forks: dict[int, asyncio.Future[int]] = {}
        # pid -> its exit code once reaped
        self._exits: dict[int, asyncio.Future[int]] = {}

    async def start(self) -> None:
        """Start the zygote (idempotent); returns once it has done its imports."""
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
        await asyncio.shield(self._starting)

    async def _start(self) -> None:
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("ab") as log:
            self._zygote = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "services.worker.zygote", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, cwd=self._cwd,
                start_new_session=True, preexec_fn=parent_death_preexec(signal.SIGKILL))
        assert self._zygote.stdout is not None
        line = await asyncio.wait_for(self._zygote.stdout.readline(), ZYGOTE_START_TIMEOUT_S)
        if not line:
            raise OSError(f"the worker zygote exited at start (log: {self._log_path})")
        logger.info("worker zygote ready: pid %d", json.loads(line)["ready"])
        self._reader = asyncio.create_task(self._read())

    async def launch(self, spec: WorkerSpec) -> ForkedWorker:
        await self.start()
        assert self._zygote is not None and self._zygote.stdin is not None
        if self._zygote.returncode is not None:
            raise OSError("the worker zygote is gone")
        if spec.argv[1:3] != ["-m", "services.worker"]:
            raise ValueError(f"a fork server runs services.worker only, not {spec.argv}")
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        request_id = next(self._ids)
        forked = self._forks[request_id] = asyncio.get_running_loop().create_future()
        self._zygote.stdin.write(json.dumps({
            "id": request_id, "argv": spec.argv[3:], "env": spec.env,
            "log_path": str(spec.log_path)}).encode() + b"\n")
        await self._zygote.stdin.drain()
        pid = await forked
        logger.info("forked worker %s as pid %d", spec.worker_id, pid)
        return ForkedWorker(pid, self._exit(pid))

    def _exit(self, pid: int) -> asyncio.Future[int]:
        return self._exits.setdefault(pid, asyncio.get_running_loop().create_future())

    async def _read(self) -> None:
        assert self._zygote is not None and self._zygote.stdout is not None
        while line := await self._zygote.stdout.readline():
            message: dict[str, Any] = json.loads(line)
            if "exit" in message:
                exited = self._exit(int(message["exit"]))
                if not exited.done():
                    exited.set_result(int(message["code"]))
            elif (forked := self._forks.pop(int(message["id"]), None)) is not None:
                if "pid" in message:
                    forked.set_result(int(message["pid"]))
                else:
                    forked.set_exception(OSError(f"fork failed: {message.get('error')}"))
        logger.error("the worker zygote exited (log: %s)", self._log_path)
        for forked in self._forks.values():
            if not forked.done():
                forked.set_exception(OSError("the worker zygote is gone"))
        for exited in self._exits.values():
            if not exited.done():
                exited.set_result(LOST)
