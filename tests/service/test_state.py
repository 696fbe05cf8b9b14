"""The schema, its migrations and the scheduler's state store against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import anyio
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from libs.common.db.api_keys import find_active_api_key, hash_api_key, issue_api_key
from libs.common.db.enums import EndpointStatus, NodeStatus, WorkerStatus
from libs.common.db.migrate import head_revision, upgrade, upgrade_async
from libs.common.db.models import ApiKey, Base, Endpoint, Model, Tenant, Worker
from libs.common.db.session import create_engine, create_sessionmaker, transaction
from services.scheduler.events import (
    Command,
    Event,
    NodeDown,
    NodeHeartbeat,
    RequestArrived,
    RequestDone,
    RequestStarted,
    StopWorker,
    Tick,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.policy import decide
from services.scheduler.state import ClusterState
from services.scheduler.state_store import StateStore

pytestmark = [pytest.mark.service, pytest.mark.anyio]

TIMEOUT_S = 30.0
GB = 10**9
T0 = 1_700_000_000.0  # times on a whole-microsecond grid survive timestamptz exactly


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg runs on asyncio only


@pytest.fixture
async def engine(fresh_database_url: str) -> AsyncIterator[AsyncEngine]:
    await upgrade_async(fresh_database_url)
    engine = create_engine(fresh_database_url)
    yield engine
    await engine.dispose()


def _schema_diffs(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, Base.metadata))


async def _add_models(engine: AsyncEngine, *names: str) -> None:
    async with transaction(create_sessionmaker(engine)) as session:
        session.add_all(Model(name=name, architecture="LlamaForCausalLM", family="llama",
                              num_layers=32, size_bytes=13 * GB, kv_cache_bytes=2 * GB,
                              storage_path=f"models/{name}", ttft_slo_ms=7500, tpot_slo_ms=100,
                              max_pipeline_degree=4, keep_alive_s=60.0) for name in names)


async def _drive(store: StateStore, state: ClusterState,
                 timeline: Sequence[tuple[float, Event]]) -> tuple[ClusterState, list[Command]]:
    """Decide each event and persist each decision, as the live scheduler does."""
    commands: list[Command] = []
    for now, event in timeline:
        new_state, new_commands = decide(state, event, T0 + now)
        await store.apply(state, new_state, now=T0 + now)
        state, commands = new_state, commands + new_commands
    return state, commands


def _heartbeat(node_id: str, gpu_gb: int) -> NodeHeartbeat:
    return NodeHeartbeat(node_id, "A10", gpu_memory_bytes=gpu_gb * GB,
                         nic_bandwidth_bytes_per_s=2 * GB)


async def test_migrating_an_empty_database_yields_exactly_the_models_schema(
    engine: AsyncEngine,
) -> None:
    async with asyncio.timeout(TIMEOUT_S), engine.connect() as connection:
        diffs = await connection.run_sync(_schema_diffs)
        tables = await connection.run_sync(lambda sync: set(inspect(sync).get_table_names()))
        version = await connection.scalar(text("select version_num from alembic_version"))
    assert diffs == []
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    assert version == head_revision()


async def test_upgrade_from_synchronous_code_migrates_and_a_second_run_changes_nothing(
    fresh_database_url: str,
) -> None:
    with anyio.fail_after(TIMEOUT_S):
        await anyio.to_thread.run_sync(upgrade, fresh_database_url)
        await anyio.to_thread.run_sync(upgrade, fresh_database_url)
    engine = create_engine(fresh_database_url)
    try:
        async with engine.connect() as connection:
            diffs = await connection.run_sync(_schema_diffs)
    finally:
        await engine.dispose()
    assert diffs == []


async def test_decisions_applied_to_the_store_reload_as_the_same_state(engine: AsyncEngine) -> None:
    await _add_models(engine, "llama", "mistral")
    store = StateStore(create_sessionmaker(engine))
    async with asyncio.timeout(TIMEOUT_S):
        first, _ = await _drive(store, await store.load(), [
            (0.0, _heartbeat("a", 40)), (0.0, _heartbeat("b", 30)),
            (1.0, RequestArrived("r1", "llama")), (1.5, RequestArrived("r2", "mistral")),
            (4.0, WorkerReady(1)),
        ])
        first_loaded = await store.load()
        second, commands = await _drive(store, first, [
            (5.0, RequestDone("r1")), (6.0, _heartbeat("a", 40)), (6.0, NodeDown("b")),
            # r2's new worker (3, on a) is stopped by keep-alive while still fetching
            (7.0, RequestDone("r2")), (66.0, _heartbeat("a", 40)), (67.0, Tick()),
        ])
        second_loaded = await store.load()

    # requests are not stored: they wait in the NATS stream
    assert first_loaded == replace(first, requests={})
    assert second_loaded == replace(second, requests={})
    assert (first_loaded.models["llama"].ttft_slo_s, first_loaded.nodes["a"].free_gpu_memory_bytes,
            first_loaded.nodes["b"].fetches[0].deadline) == (7.5, 25 * GB, T0 + 9.0)
    assert commands[-2:] == [StopWorker(1, "a"), StopWorker(3, "a")]
    assert (second_loaded.nodes["b"].state, second_loaded.nodes["a"].fetches,
            [(e.endpoint_id, e.state) for e in second_loaded.endpoints.values()]) == (
        NodeStatus.DOWN, (), [(1, EndpointStatus.DRAINING), (3, EndpointStatus.DRAINING)])


async def test_a_scale_outs_fetch_without_a_deadline_and_a_reported_capacity_reload(
    engine: AsyncEngine,
) -> None:
    await _add_models(engine, "llama")
    store = StateStore(create_sessionmaker(engine))
    async with asyncio.timeout(TIMEOUT_S):
        state, commands = await _drive(store, await store.load(), [
            (0.0, _heartbeat("a", 40)), (1.0, RequestArrived("r1", "llama")),
            (3.0, WorkerReady(1, capacity=1)), (3.0, RequestStarted("r1", 1)),
            (4.0, RequestArrived("r2", "llama")),
        ])
        reloaded = await store.load()

    # r2 outnumbers worker 1's one slot: worker 2 scales out, its fetch with no deadline
    assert [c.worker_id for c in commands] == [1, 2]
    assert [(f.worker_id, f.deadline) for f in state.nodes["a"].fetches] == [(2, float("inf"))]
    assert reloaded.nodes == state.nodes
    # the capacity worker 1 reported when ready is stored: a restarted scheduler counts it
    assert reloaded.workers == state.workers
    assert reloaded.workers[1].capacity == 1


async def test_a_restarted_scheduler_sees_the_same_endpoints_workers_and_next_ids(
    fresh_database_url: str, engine: AsyncEngine,
) -> None:
    await _add_models(engine, "llama")
    store = StateStore(create_sessionmaker(engine))
    async with asyncio.timeout(TIMEOUT_S):
        state, _ = await _drive(store, await store.load(), [
            (0.0, _heartbeat("a", 40)), (1.0, RequestArrived("r1", "llama")),
            (3.0, WorkerReady(1)), (4.0, RequestDone("r1")), (64.0, _heartbeat("a", 40)),
            (64.0, Tick()), (65.0, WorkerStopped(1)), (70.0, RequestArrived("r2", "llama")),
        ])
        await engine.dispose()
        restarted_engine = create_engine(fresh_database_url)
        try:
            reloaded = await StateStore(create_sessionmaker(restarted_engine)).load()
            async with restarted_engine.connect() as connection:
                rows = (await connection.execute(
                    select(Worker.id, Worker.state).order_by(Worker.id))).all()
                endpoint_states = (await connection.execute(
                    select(Endpoint.id, Endpoint.state).order_by(Endpoint.id))).all()
        finally:
            await restarted_engine.dispose()

    assert (dict(reloaded.endpoints), dict(reloaded.workers), dict(reloaded.nodes)) == (
        dict(state.endpoints), dict(state.workers), dict(state.nodes))
    assert (reloaded.next_endpoint_id, reloaded.next_worker_id) == (3, 3)
    assert rows == [(1, WorkerStatus.STOPPED), (2, WorkerStatus.STARTING)]
    assert endpoint_states == [(1, EndpointStatus.STOPPED), (2, EndpointStatus.STARTING)]
    # with the same backlog (none here), the reloaded view decides as the live one did
    event = RequestArrived("r3", "llama")
    assert decide(reloaded, event, T0 + 71.0) == decide(replace(state, requests={}), event,
                                                        T0 + 71.0)


async def test_an_api_key_is_stored_as_its_sha256_and_never_as_the_key(engine: AsyncEngine) -> None:
    sessionmaker = create_sessionmaker(engine)
    async with asyncio.timeout(TIMEOUT_S):
        async with transaction(sessionmaker) as session:
            tenant = Tenant(name="acme")
            session.add(tenant)
            await session.flush()
            issued = await issue_api_key(session, tenant_id=tenant.id, name="ci")
        async with engine.connect() as connection:
            rows = (await connection.execute(text("select * from api_keys"))).all()
        async with transaction(sessionmaker) as session:
            found = await find_active_api_key(session, issued.key)
            missing = await find_active_api_key(session, issued.key + "x")
        with pytest.raises(IntegrityError):
            async with transaction(sessionmaker) as session:
                session.add(ApiKey(tenant_id=tenant.id, key_hash=issued.key, name="raw"))

    assert len(rows) == 1 and all(issued.key not in str(value) for value in rows[0])
    assert rows[0].key_hash == hashlib.sha256(issued.key.encode()).hexdigest()
    assert rows[0].key_hash == hash_api_key(issued.key)
    assert (found is not None and found.id, missing) == (issued.api_key_id, None)
