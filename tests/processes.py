"""Real service processes for service and end-to-end tests: start, wait for, stop, read logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def tail(log_path: Path) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, process: subprocess.Popen[bytes], log_path: Path, *,
                  timeout: float = START_TIMEOUT_S) -> None:
    """Poll `url` until it answers 200, failing at once (with the log) if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"{log_path.stem} exited:\n{tail(log_path)}"
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer:\n{tail(log_path)}"
        time.sleep(0.05)
