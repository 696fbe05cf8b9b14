"""The shared NATS / PostgreSQL fixtures and the embedded servers behind them."""

from __future__ import annotations

import asyncio
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import pytest

from libs.common.embedded import DEFAULT_MAX_PAYLOAD, EmbeddedNats, EmbeddedPostgres

pytestmark = [pytest.mark.service, pytest.mark.anyio]

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0


@pytest.fixture
def anyio_backend() -> str:
    # nats-py and asyncpg run on asyncio only.
    return "asyncio"


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    # Not tmp_path: pytest's base folder is 0700, which the postgres system user (used when
    # the tests run as root) cannot traverse.
    with tempfile.TemporaryDirectory(prefix="hs-test-embedded-") as path:
        yield Path(path)


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _process_is_alive(pid: int) -> bool:
    """False once the process is gone or a zombie (nobody may reap it in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _stream_names(url: str) -> list[str]:
    nc = await nats.connect(url, connect_timeout=5, allow_reconnect=False)
    try:
        return [info.config.name for info in await nc.jetstream(timeout=5).streams_info()]
    finally:
        await nc.close()


async def test_jetstream_on_the_nats_fixture_returns_the_exact_message_published(
    nats_url: str,
) -> None:
    stream = f"HS_TEST_{uuid.uuid4().hex[:8].upper()}"
    subject = f"hs.test.{stream.lower()}"
    async with asyncio.timeout(TIMEOUT_S):
        nc = await nats.connect(nats_url, connect_timeout=5, allow_reconnect=False)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(name=stream, subjects=[subject])
            try:
                ack = await js.publish(subject, b"hello jetstream")
                message = await js.get_msg(stream, seq=ack.seq)
            finally:
                await js.delete_stream(stream)
        finally:
            await nc.close()
    assert (ack.stream, ack.seq, message.subject, message.data) == (
        stream, 1, subject, b"hello jetstream",
    )


async def test_embedded_nats_advertises_a_max_payload_of_8_mib(scratch_dir: Path) -> None:
    with EmbeddedNats(scratch_dir / "nats") as server:
        async with asyncio.timeout(TIMEOUT_S):
            nc = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
            max_payload = nc.max_payload
            await nc.close()
    assert max_payload == DEFAULT_MAX_PAYLOAD == 8 * 1024 * 1024


async def test_embedded_nats_delivers_a_7_mib_message_intact(scratch_dir: Path) -> None:
    payload = bytes(range(256)) * (7 * 1024 * 1024 // 256)
    with EmbeddedNats(scratch_dir / "nats") as server:
        async with asyncio.timeout(TIMEOUT_S):
            nc = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
            try:
                subscription = await nc.subscribe("hs.test.big")
                await nc.publish("hs.test.big", payload)
                message = await subscription.next_msg(timeout=10)
            finally:
                await nc.close()
    assert message.data == payload


async def test_embedded_nats_keeps_a_jetstream_stream_across_a_restart_on_the_same_store_dir(
    scratch_dir: Path,
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        with EmbeddedNats(scratch_dir / "nats") as server:
            nc = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
            try:
                js = nc.jetstream(timeout=5)
                await js.add_stream(name="KEPT", subjects=["hs.kept"])
                await js.publish("hs.kept", b"survives restarts")
            finally:
                await nc.close()
        with EmbeddedNats(scratch_dir / "nats") as server:
            nc = await nats.connect(server.url, connect_timeout=5, allow_reconnect=False)
            try:
                message = await nc.jetstream(timeout=5).get_msg("KEPT", seq=1)
            finally:
                await nc.close()
    assert (message.subject, message.data) == ("hs.kept", b"survives restarts")


def test_embedded_nats_stop_leaves_no_process_running(scratch_dir: Path) -> None:
    server = EmbeddedNats(scratch_dir / "nats").start()
    pid = server.pid
    assert pid is not None and _process_is_alive(pid)

    server.stop()

    assert (_process_is_alive(pid), server.pid, server.is_running()) == (False, None, False)


async def test_postgres_fixture_accepts_an_asyncpg_connection_and_reports_its_version(
    database_url: str,
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        connection = await asyncpg.connect(_plain_dsn(database_url), timeout=10)
        try:
            version = await connection.fetchval("select version()")
        finally:
            await connection.close()
    assert re.match(r"PostgreSQL \d+\.\d+ ", version), version


async def test_fresh_database_url_is_an_empty_database_other_than_the_session_one(
    database_url: str, fresh_database_url: str
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        connection = await asyncpg.connect(_plain_dsn(fresh_database_url), timeout=10)
        try:
            name = await connection.fetchval("select current_database()")
            num_tables = await connection.fetchval(
                "select count(*) from information_schema.tables where table_schema = 'public'"
            )
        finally:
            await connection.close()
    assert (fresh_database_url.rsplit("/", 1)[1], num_tables) == (name, 0)
    assert fresh_database_url != database_url


async def test_embedded_postgres_keeps_rows_across_a_stop_and_start_on_the_same_data_dir(
    scratch_dir: Path,
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        with EmbeddedPostgres(scratch_dir / "pgdata") as server:
            connection = await asyncpg.connect(server.dsn, timeout=10)
            try:
                await connection.execute("create table kept (id int primary key, note text)")
                await connection.execute("insert into kept values (1, 'survives restarts')")
            finally:
                await connection.close()
        with EmbeddedPostgres(scratch_dir / "pgdata") as server:
            connection = await asyncpg.connect(server.dsn, timeout=10)
            try:
                rows = await connection.fetch("select id, note from kept")
            finally:
                await connection.close()
    assert [tuple(row) for row in rows] == [(1, "survives restarts")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
async def test_embedded_servers_exit_when_their_parent_process_is_killed(
    scratch_dir: Path,
) -> None:
    script = (
        "import sys\n"
        "from libs.common.embedded import EmbeddedNats, EmbeddedPostgres\n"
        f"nats = EmbeddedNats({str(scratch_dir / 'nats')!r}).start()\n"
        f"pg = EmbeddedPostgres({str(scratch_dir / 'pgdata')!r}, fsync=False).start()\n"
        "print(nats.pid, pg.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    async with asyncio.timeout(TIMEOUT_S):
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert parent.stdout is not None
        line = await parent.stdout.readline()
        server_pids = [int(pid) for pid in line.split()]
        assert len(server_pids) == 2, line
        parent.kill()
        await parent.wait()
        deadline = time.monotonic() + 15
        while any(_process_is_alive(pid) for pid in server_pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert [_process_is_alive(pid) for pid in server_pids] == [False, False]
