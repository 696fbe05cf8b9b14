"""ClusterState to and from PostgreSQL: a restarted scheduler rebuilds its view from here.

`apply(before, after)` writes the difference between two states in one transaction: nodes
upserted; endpoints and workers inserted, updated, or marked stopped when they left the
state (their rows stay, as history, and keep ids monotonic across restarts); a consolidated
worker's new layer range is written with its state. Model and partition rows are written by
model registration; the store only reads them (a model's stage boundaries come from its
partitions). The policy's calibration is not stored: it starts again from the cost model.
Requests are not stored: they wait in the NATS request stream, and the service replays that
backlog after `load()`. Times round-trip through `timestamptz`, i.e. to the microsecond.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db.enums import EndpointStatus, NodeStatus, WorkerStatus
from libs.common.db.models import Endpoint, Model, Node, Worker
from libs.common.db.session import transaction
from libs.common.errors import NotFoundError
from services.scheduler.registration import load_stage_layouts, model_spec
from services.scheduler.state import (
    ClusterState,
    EndpointState,
    Fetch,
    NodeState,
    WorkerState,
)


class StateStore:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def load(self) -> ClusterState:
        async with transaction(self._sessionmaker) as session:
            return await load_state(session)

    async def apply(self, before: ClusterState, after: ClusterState, *, now: float) -> None:
        async with transaction(self._sessionmaker) as session:
            await apply_changes(session, before, after, now=now)


async def load_state(session: AsyncSession) -> ClusterState:
    layouts = await load_stage_layouts(session)
    models = {row.name: model_spec(row, layouts.get(row.id))
              for row in await session.scalars(select(Model))}
    endpoint_rows = await session.execute(
        select(Endpoint, Model.name).join(Model).where(Endpoint.state != EndpointStatus.STOPPED))
    endpoints = {row.id: _endpoint_state(row, model) for row, model in endpoint_rows}
    worker_rows = (await session.execute(
        select(Worker, Model.name).join(Endpoint, Worker.endpoint_id == Endpoint.id)
        .join(Model).where(Worker.state != WorkerStatus.STOPPED).order_by(Worker.id))).all()
    workers = {row.id: _worker_state(row, model) for row, model in worker_rows}
    fetches = [(row.node_id, _fetch(row)) for row, _ in worker_rows
               if row.state is WorkerStatus.STARTING and row.fetch_bytes]
    nodes = {row.id: _node_state(row, workers.values(), fetches)
             for row in await session.scalars(select(Node))}
    max_endpoint_id = await session.scalar(select(func.max(Endpoint.id)))
    max_worker_id = await session.scalar(select(func.max(Worker.id)))
    return ClusterState(models=models, nodes=nodes, endpoints=endpoints, workers=workers,
                        requests={}, next_endpoint_id=(max_endpoint_id or 0) + 1,
                        next_worker_id=(max_worker_id or 0) + 1)


async def apply_changes(session: AsyncSession, before: ClusterState, after: ClusterState, *,
                        now: float) -> None:
    """Write what changed from `before` to `after` (the caller owns the transaction)."""
    nodes = [_node_row(n) for n in _changed(before.nodes, after.nodes)]
    if nodes:
        statement = insert(Node).values(nodes)
        await session.execute(statement.on_conflict_do_update(
            index_elements=[Node.id],
            set_={key: statement.excluded[key] for key in nodes[0] if key != "id"}))
    new_endpoints = [e for e in after.endpoints.values() if e.endpoint_id not in before.endpoints]
    new_workers = [w for w in after.workers.values() if w.worker_id not in before.workers]
    model_ids = await _model_ids(session, {e.model for e in new_endpoints})
    if new_endpoints:
        await session.execute(insert(Endpoint),
                              [_endpoint_row(e, model_ids) for e in new_endpoints])
    if new_workers:
        await session.execute(insert(Worker), [_worker_row(w, after) for w in new_workers])
    endpoint_updates = [
        {"id": e.endpoint_id, "state": e.state, "pipeline_degree": e.pipeline_degree,
         "last_request_at": _datetime(e.last_request_at)}
        for e in _changed(before.endpoints, after.endpoints) if e.endpoint_id in before.endpoints
    ] + [{"id": endpoint_id, "state": EndpointStatus.STOPPED}
         for endpoint_id in before.endpoints.keys() - after.endpoints.keys()]
    worker_updates = [
        {"id": w.worker_id, "state": w.state, "ready_at": _datetime(w.ready_at),
         "capacity": w.capacity,
         # a consolidated worker serves the whole model
         "start_layer": w.start_layer, "end_layer": w.end_layer}
        for w in _changed(before.workers, after.workers) if w.worker_id in before.workers
    ] + [{"id": worker_id, "state": WorkerStatus.STOPPED, "stopped_at": _datetime(now)}
         for worker_id in before.workers.keys() - after.workers.keys()]
    for table, rows in ((Endpoint, endpoint_updates), (Worker, worker_updates)):
        if rows:
            await session.execute(update(table), rows)


def _changed(before: Mapping[Any, Any], after: Mapping[Any, Any]) -> list[Any]:
    if before is after:
        return []
    return [value for key, value in after.items()
            if (old := before.get(key)) is not value and old != value]


async def _model_ids(session: AsyncSession, names: set[str]) -> dict[str, int]:
    if not names:
        return {}
    rows = await session.execute(select(Model.name, Model.id).where(Model.name.in_(names)))
    model_ids = {row.name: row.id for row in rows}
    if missing := names - model_ids.keys():
        raise NotFoundError(f"models not registered in the database: {sorted(missing)}")
    return model_ids


def _datetime(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, tz=UTC)


def _seconds(moment: datetime) -> float:
    return moment.timestamp()


def _node_state(row: Node, workers: Iterable[WorkerState],
                fetches: list[tuple[str, Fetch]]) -> NodeState:
    used = sum(w.gpu_memory_bytes for w in workers if w.node_id == row.id)
    return NodeState(node_id=row.id, gpu_type=row.gpu_type, gpu_memory_bytes=row.gpu_memory_bytes,
                     free_gpu_memory_bytes=row.gpu_memory_bytes - used,
                     nic_bandwidth_bytes_per_s=row.nic_bandwidth_bytes_per_s,
                     state=NodeStatus(row.state), last_heartbeat=_seconds(row.last_heartbeat),
                     fetches=tuple(fetch for node_id, fetch in fetches if node_id == row.id))


def _endpoint_state(row: Endpoint, model: str) -> EndpointState:
    created_at = _seconds(row.created_at)
    last_request_at = created_at if row.last_request_at is None else _seconds(row.last_request_at)
    return EndpointState(endpoint_id=row.id, model=model, state=EndpointStatus(row.state),
                         pipeline_degree=row.pipeline_degree, created_at=created_at,
                         last_request_at=last_request_at)


def _worker_state(row: Worker, model: str) -> WorkerState:
    return WorkerState(
        worker_id=row.id, endpoint_id=row.endpoint_id, node_id=row.node_id, model=model,
        stage=row.stage, start_layer=row.start_layer, end_layer=row.end_layer,
        gpu_memory_bytes=row.gpu_memory_bytes, is_full_size=row.is_full_size,
        state=WorkerStatus(row.state), created_at=_seconds(row.created_at),
        ready_at=None if row.ready_at is None else _seconds(row.ready_at),
        capacity=row.capacity)


def _fetch(row: Worker) -> Fetch:
    assert row.fetch_bytes is not None, row.id
    # no deadline stored: a scale-out's fetch, which has none
    deadline = math.inf if row.fetch_deadline is None else _seconds(row.fetch_deadline)
    return Fetch(worker_id=row.id, num_bytes=row.fetch_bytes,
                 bandwidth_bytes_per_s=row.fetch_bandwidth_bytes_per_s or 0.0,
                 started_at=_seconds(row.created_at), deadline=deadline)


def _node_row(node: NodeState) -> dict[str, Any]:
    return {"id": node.node_id, "gpu_type": node.gpu_type,
            "gpu_memory_bytes": node.gpu_memory_bytes,
            "nic_bandwidth_bytes_per_s": node.nic_bandwidth_bytes_per_s, "state": node.state,
            "last_heartbeat": _datetime(node.last_heartbeat)}


def _endpoint_row(endpoint: EndpointState, model_ids: Mapping[str, int]) -> dict[str, Any]:
    return {"id": endpoint.endpoint_id, "model_id": model_ids[endpoint.model],
            "state": endpoint.state, "pipeline_degree": endpoint.pipeline_degree,
            "last_request_at": _datetime(endpoint.last_request_at),
            "created_at": _datetime(endpoint.created_at)}


def _worker_row(worker: WorkerState, state: ClusterState) -> dict[str, Any]:
    fetch = next((f for f in state.nodes[worker.node_id].fetches
                  if f.worker_id == worker.worker_id), None)
    return {"id": worker.worker_id, "endpoint_id": worker.endpoint_id, "node_id": worker.node_id,
            "stage": worker.stage, "start_layer": worker.start_layer,
            "end_layer": worker.end_layer, "gpu_memory_bytes": worker.gpu_memory_bytes,
            "is_full_size": worker.is_full_size, "state": worker.state,
            "fetch_bytes": None if fetch is None else fetch.num_bytes,
            "fetch_bandwidth_bytes_per_s": None if fetch is None else fetch.bandwidth_bytes_per_s,
            "fetch_deadline": (None if fetch is None or math.isinf(fetch.deadline)
                               else _datetime(fetch.deadline)),
            "created_at": _datetime(worker.created_at),
            "ready_at": _datetime(worker.ready_at), "capacity": worker.capacity}
