"""How the node agent starts and stops worker processes.

The interface is narrow on purpose (launch a command, learn its pid, wait for it, terminate
it), so a Kubernetes launcher (a worker pod per worker) can replace the local one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from libs.common.embedded.process import parent_death_preexec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    # the command line of the worker process (`python -m services.worker ...`)
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)


class WorkerHandle(Protocol):
    @property
    def pid(self) -> int: ...

    async def wait(self) -> int:
        """The exit code once the worker is gone."""
        ...

    async def terminate(self, timeout_s: float) -> int:
        """SIGTERM (the worker drains), then kill after `timeout_s`; the exit code."""
        ...


class Launcher(Protocol):
    async def start(self) -> None:
        """Get ready to launch (the agent starts it alongside its own start-up)."""
        ...

    async def launch(self, spec: WorkerSpec) -> WorkerHandle: ...


class LocalProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> int:
        return await self._process.wait()

    async def terminate(self, timeout_s: float) -> int:
        return await terminate_worker(self.pid, self._process.send_signal, self._process.wait,
                                      timeout_s)


async def terminate_worker(pid: int, send_signal: Callable[[int], None],
                           wait: Callable[[], Awaitable[int]], timeout_s: float) -> int:
    """A handle's `terminate`: SIGTERM, the exit code if it comes within `timeout_s`, else
    SIGKILL and the exit code. `send_signal` raises ProcessLookupError for a process that is
    gone (asyncio's processes do)."""
    with contextlib.suppress(ProcessLookupError):
        send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(wait(), timeout_s)
    except TimeoutError:
        logger.warning("worker pid %d ignored SIGTERM for %.1fs; killing it", pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            send_signal(signal.SIGKILL)
        return await wait()


class LocalLauncher:
    """Worker processes on this machine, their output in a log file each.

    A worker runs in a session of its own (a signal to the agent's process group does not
    reach it: the agent stops its workers itself, draining them), but dies with its agent:
    SIGKILL when the agent's process ends without stopping it. The scheduler forgets the
    workers of a node whose agent went silent, so a worker living on would hold memory nobody
    accounts for; killed, its unacknowledged requests go back to the queue (RELIABILITY.md).
    """

    def __init__(self, *, cwd: Path | None = None) -> None:
        self._cwd = cwd

    async def start(self) -> None:
        """Nothing to prepare: each worker is a new process."""

    async def launch(self, spec: WorkerSpec) -> WorkerHandle:
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)

        with spec.log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *spec.argv, stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=self._cwd,
                env={**os.environ, **spec.env}, start_new_session=True,
                preexec_fn=parent_death_preexec(signal.SIGKILL))
        logger.info("launched worker %s as pid %d", spec.worker_id, process.pid)
        return LocalProcess(process)
