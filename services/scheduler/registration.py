"""Model registration: the model row the scheduler plans with, from the model store's facts.

Size, layer count and architecture come from the storage service's description of the
imported model; SLOs and keep-alive from the caller (the CLI now, the admin API later).
Registering again updates the row (upsert by name).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db.models import MAX_PIPELINE_DEGREE, Model, Partition
from libs.common.db.session import transaction
from libs.common.errors import NotFoundError
from services.scheduler.state import ModelSpec, StageLayout
from services.storage.schemas import ModelInfo


@dataclass(frozen=True)
class ModelRegistration:
    name: str
    ttft_slo_s: float = 10.0
    tpot_slo_s: float = 0.2
    keep_alive_s: float = 60.0
    # KV-cache memory a whole-model worker reserves next to the weights
    kv_cache_bytes: int = 0
    # None: as many stages as the store partitioned the model into
    max_pipeline_degree: int | None = None

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0 or self.tpot_slo_s <= 0 or self.keep_alive_s < 0:
            raise ValueError(f"SLOs must be > 0 and keep-alive >= 0: {self}")


async def describe_model(storage_url: str, name: str, *, timeout_s: float = 10.0) -> ModelInfo:
    async with httpx.AsyncClient(base_url=storage_url, timeout=timeout_s) as client:
        response = await client.get(f"/models/{name}")
    if response.status_code == 404:
        raise NotFoundError(f"model {name!r} is not in the model store at {storage_url}",
                            param="model")
    response.raise_for_status()
    return ModelInfo.model_validate_json(response.content)


async def register_model(sessionmaker: async_sessionmaker[AsyncSession], storage_url: str,
                         registration: ModelRegistration) -> ModelSpec:
    """Insert or update the model's row; the spec to feed the policy (ModelRegistered)."""
    info = await describe_model(storage_url, registration.name)
    max_degree = min(registration.max_pipeline_degree or info.max_degree, info.max_degree,
                     MAX_PIPELINE_DEGREE)
    ttft_slo_ms = round(registration.ttft_slo_s * 1000)
    tpot_slo_ms = round(registration.tpot_slo_s * 1000)
    row = {"name": info.name, "architecture": info.architecture, "family": info.family,
           "num_layers": info.num_layers, "size_bytes": info.num_bytes,
           "kv_cache_bytes": registration.kv_cache_bytes,
           "storage_path": f"{storage_url.rstrip('/')}/models/{info.name}",
           "ttft_slo_ms": ttft_slo_ms, "tpot_slo_ms": tpot_slo_ms,
           "max_pipeline_degree": max_degree, "keep_alive_s": registration.keep_alive_s}
    async with transaction(sessionmaker) as session:
        statement = insert(Model).values(row)
        await session.execute(statement.on_conflict_do_update(
            index_elements=[Model.name],
            set_={key: statement.excluded[key] for key in row if key != "name"}))
    layout = StageLayout.of(
        (int(degree), s.stage, s.start_layer, s.end_layer, s.num_bytes)
        for degree, stages in info.partitions.items() if int(degree) <= max_degree
        for s in stages)
    return ModelSpec(name=info.name, size_bytes=info.num_bytes, num_layers=info.num_layers,
                     kv_cache_bytes=registration.kv_cache_bytes,
                     ttft_slo_s=ttft_slo_ms / 1000, tpot_slo_s=tpot_slo_ms / 1000,
                     max_pipeline_degree=max_degree, keep_alive_s=registration.keep_alive_s,
                     stage_boundaries=layout.stage_boundaries, stage_bytes=layout.stage_bytes)


async def load_model(sessionmaker: async_sessionmaker[AsyncSession], name: str
                     ) -> tuple[ModelSpec, str] | None:
    """A model registered elsewhere (the admin API): its spec and its name in the store."""
    async with transaction(sessionmaker) as session:
        row = await session.scalar(select(Model).where(Model.name == name))
        if row is None:
            return None
        layouts = await load_stage_layouts(session, model_ids=[row.id])
    return model_spec(row, layouts.get(row.id)), storage_name(row.storage_path)


def model_spec(row: Model, layout: StageLayout | None) -> ModelSpec:
    """The policy's spec of a model row and its partitions' layout (None: no partitions)."""
    return ModelSpec(name=row.name, size_bytes=row.size_bytes, num_layers=row.num_layers,
                     kv_cache_bytes=row.kv_cache_bytes, ttft_slo_s=row.ttft_slo_ms / 1000,
                     tpot_slo_s=row.tpot_slo_ms / 1000,
                     max_pipeline_degree=row.max_pipeline_degree, keep_alive_s=row.keep_alive_s,
                     stage_boundaries={} if layout is None else layout.stage_boundaries,
                     stage_bytes={} if layout is None else layout.stage_bytes)


async def load_stage_layouts(session: AsyncSession, *,
                             model_ids: list[int] | None = None) -> dict[int, StageLayout]:
    """Model id -> the stages of its `partitions` rows (the admin API writes them)."""
    statement = select(Partition.model_id, Partition.degree, Partition.stage,
                       Partition.start_layer, Partition.end_layer, Partition.num_bytes)
    if model_ids is not None:
        statement = statement.where(Partition.model_id.in_(model_ids))
    stages: dict[int, list[tuple[int, int, int, int, int]]] = {}
    for row in await session.execute(statement):
        stages.setdefault(row.model_id, []).append(
            (row.degree, row.stage, row.start_layer, row.end_layer, row.num_bytes))
    return {model_id: StageLayout.of(rows) for model_id, rows in stages.items()}


async def load_storage_names(sessionmaker: async_sessionmaker[AsyncSession]) -> dict[str, str]:
    """Model name -> its name in the store, for every registered model."""
    async with transaction(sessionmaker) as session:
        rows = await session.execute(select(Model.name, Model.storage_path))
        return {row.name: storage_name(row.storage_path) for row in rows}


def storage_name(storage_path: str) -> str:
    """The store's name of a model from its `storage_path` (`<store URL>/models/<name>`)."""
    return storage_path.rstrip("/").rsplit("/models/", 1)[-1]
