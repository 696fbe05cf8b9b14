"""Shared fixtures: a real NATS (JetStream) server and a real PostgreSQL server.

Each is taken from the first source that is available:
1. `HS_TEST_NATS_URL` / `HS_TEST_DATABASE_URL` (an existing server; on the database server a
   fresh uniquely named database is created for the session and dropped afterwards);
2. testcontainers (`nats:2 -js`, `postgres:16`) when the package is installed and a Docker
   engine answers;
3. the embedded servers from `libs.common.embedded`, started in a temporary folder.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

from libs.common.embedded import EmbeddedNats, EmbeddedPostgres, wait_for_nats

logger = logging.getLogger(__name__)

_CONTAINER_START_TIMEOUT_S = 60.0


# --- database helpers ----------------------------------------------------------------------


def _with_database(url: str, *, driver: str, database: str | None = None) -> str:
    """`url` with its driver (and optionally its database) replaced, password kept."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url).set(drivername=driver)
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _database_name(url: str) -> str:
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    assert name is not None, url
    return name


async def _execute(dsn: str, sql: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def _create_database(server_url: str, prefix: str) -> str:
    """Create a uniquely named empty database via `server_url`; return its async URL."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_execute(_with_database(server_url, driver="postgresql"),
                         f'CREATE DATABASE "{name}"'))
    return _with_database(server_url, driver="postgresql+asyncpg", database=name)


def _drop_database(server_url: str, name: str) -> None:
    # WITH (FORCE) ends connections a test left open (PostgreSQL >= 13).
    asyncio.run(_execute(_with_database(server_url, driver="postgresql"),
                         f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _wait_for_postgres(dsn: str, *, timeout: float) -> None:
    import asyncpg

    deadline = time.monotonic() + timeout
    while True:
        try:
            await _execute(dsn, "SELECT 1")
            return
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"PostgreSQL at {dsn} not ready after {timeout}s") from exc
        await asyncio.sleep(0.2)


# --- docker (testcontainers) ---------------------------------------------------------------


def _docker_is_usable() -> bool:
    if importlib.util.find_spec("testcontainers") is None:
        logger.info("testcontainers is not installed; not using Docker")
        return False
    import docker
    import docker.errors

    try:
        docker.from_env(timeout=3).ping()
    except (docker.errors.DockerException, OSError) as exc:
        logger.info("no Docker engine reachable (%s); not using Docker", exc)
        return False
    return True


def _start_container(
    stack: ExitStack, image: str, port: int, *, command: str | None = None, **env: str
) -> Any:
    from testcontainers.core.container import DockerContainer

    container = DockerContainer(image).with_exposed_ports(port)
    for key, value in env.items():
        container = container.with_env(key, value)
    if command is not None:
        container = container.with_command(command)
    container.start()
    stack.callback(container.stop)
    return container


def _endpoint(container: Any, port: int) -> tuple[str, int]:
    return container.get_container_host_ip(), int(container.get_exposed_port(port))


def _scratch_dir(stack: ExitStack, name: str) -> Path:
    # Not tmp_path_factory: pytest keeps its base folder 0700 and resets it each session,
    # while the embedded postgres, run as a system user when tests run as root, must
    # traverse it.
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"hs-test-{name}-")))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """URL of a NATS server with JetStream for the whole session."""
    if url := os.environ.get("HS_TEST_NATS_URL"):
        yield url
        return
    with ExitStack() as stack:
        if _docker_is_usable():
            container = _start_container(stack, "nats:2", 4222, command="-js")
            host, port = _endpoint(container, 4222)
            wait_for_nats(host, port, timeout=_CONTAINER_START_TIMEOUT_S)
            yield f"nats://{host}:{port}"
        else:
            yield stack.enter_context(EmbeddedNats(_scratch_dir(stack, "nats"))).url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """Async SQLAlchemy URL (`postgresql+asyncpg://`) of an empty database for the session."""
    if server_url := os.environ.get("HS_TEST_DATABASE_URL"):
        url = _create_database(server_url, "hs_test")
        yield url
        _drop_database(server_url, _database_name(url))
        return
    with ExitStack() as stack:
        if _docker_is_usable():
            container = _start_container(
                stack, "postgres:16", 5432, POSTGRES_PASSWORD="postgres", POSTGRES_DB="hydraserve"
            )
            host, port = _endpoint(container, 5432)
            dsn = f"postgresql://postgres:postgres@{host}:{port}/hydraserve"
            asyncio.run(_wait_for_postgres(dsn, timeout=_CONTAINER_START_TIMEOUT_S))
            yield _with_database(dsn, driver="postgresql+asyncpg")
        else:
            server = EmbeddedPostgres(_scratch_dir(stack, "postgres"), fsync=False)
            yield stack.enter_context(server).url


@contextmanager
def temporary_database(server_url: str, prefix: str) -> Iterator[str]:
    """Async URL of a new empty database on the server of `server_url`, dropped on exit."""
    url = _create_database(server_url, prefix)
    try:
        yield url
    finally:
        _drop_database(server_url, _database_name(url))


@pytest.fixture
def fresh_database_url(database_url: str) -> Iterator[str]:
    """Async URL of a new empty database on the session's server, dropped after the test."""
    with temporary_database(database_url, "hs_fresh") as url:
        yield url


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.worker.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("e2e-demo-model"))


@pytest.fixture(scope="session")
def reference_engine(demo_model_dir: Path) -> LLMEngine:
    """The engine in this process: what the served answers must equal."""
    from services.worker.engine.engine import LLMEngine

    engine = LLMEngine.from_model_dir(demo_model_dir, max_num_seqs=1)
    engine.load()
    return engine
