"""The tables of HydraServe's current state (the event stream holds the history).

Sizes are bytes (BIGINT), bandwidths bytes per second, SLOs milliseconds, times `timestamptz`.
Endpoint and worker ids are assigned by the scheduler's policy (it must name a worker in the
same pure decision that places it), so those keys have no sequence behind them.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from libs.common.db.enums import EndpointStatus, NodeStatus, WorkerStatus

MAX_PIPELINE_DEGREE = 4

# Deterministic constraint names, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _status(enum_type: type[enum.StrEnum], name: str) -> Enum:
    # VARCHAR + CHECK rather than a native ENUM: adding a state later is a plain migration.
    return Enum(enum_type, name=name, native_enum=False, create_constraint=True, length=16,
                values_callable=lambda members: [member.value for member in members])


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: dict[Any, Any] = {  # noqa: RUF012 (SQLAlchemy's declared hook)
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
    }


class Tenant(Base):
    """Who owns API keys and private models; its limits apply to all its keys together.

    A NULL limit means the gateway's default (`HYDRASERVE_GATEWAY__DEFAULT_*`).
    """

    __tablename__ = "tenants"
    __table_args__ = (
        CheckConstraint("max_requests_per_minute > 0", name="max_requests_per_minute_positive"),
        CheckConstraint("max_tokens_per_minute > 0", name="max_tokens_per_minute_positive"),
        CheckConstraint("max_concurrent_requests > 0", name="max_concurrent_requests_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = _created_at()
    # requests admitted in any 60 s window
    max_requests_per_minute: Mapped[int | None]
    # prompt (estimated at admission) + completion tokens in any 60 s window
    max_tokens_per_minute: Mapped[int | None]
    # requests in flight at once
    max_concurrent_requests: Mapped[int | None]


class ApiKey(Base):
    """An API key of a tenant. Only the SHA-256 of the key is stored, never the key itself."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("key_hash ~ '^[0-9a-f]{64}$'", name="key_hash_is_sha256"),)

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           index=True)
    # lowercase hex SHA-256 of the key; the lookup on every authenticated request
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None]


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint("num_layers > 0", name="num_layers_positive"),
        CheckConstraint("size_bytes > 0", name="size_bytes_positive"),
        CheckConstraint("kv_cache_bytes >= 0", name="kv_cache_bytes_not_negative"),
        CheckConstraint("ttft_slo_ms > 0 AND tpot_slo_ms > 0", name="slos_positive"),
        CheckConstraint(f"max_pipeline_degree BETWEEN 1 AND {MAX_PIPELINE_DEGREE}",
                        name="max_pipeline_degree_range"),
        CheckConstraint("keep_alive_s >= 0", name="keep_alive_s_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    # the HF `architectures[0]`, e.g. LlamaForCausalLM
    architecture: Mapped[str] = mapped_column(String(128))
    # llama | opt | falcon
    family: Mapped[str] = mapped_column(String(32))
    num_layers: Mapped[int]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # KV-cache memory a whole-model worker reserves next to the weights
    kv_cache_bytes: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # where the model store keeps the checkpoint (a path or URI the storage service resolves)
    storage_path: Mapped[str] = mapped_column(Text)
    ttft_slo_ms: Mapped[int]
    tpot_slo_ms: Mapped[int]
    max_pipeline_degree: Mapped[int] = mapped_column(server_default=str(MAX_PIPELINE_DEGREE))
    keep_alive_s: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = _created_at()
    # NULL: public; else private to this tenant (others are told it does not exist)
    owner_tenant_id: Mapped[int | None] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), index=True)


class Partition(Base):
    """Stage `stage` of the model cut into `degree` stages: layers [start_layer, end_layer)."""

    __tablename__ = "partitions"
    __table_args__ = (
        UniqueConstraint("model_id", "degree", "stage"),
        CheckConstraint(f"degree BETWEEN 1 AND {MAX_PIPELINE_DEGREE}", name="degree_range"),
        CheckConstraint("stage >= 0 AND stage < degree", name="stage_below_degree"),
        CheckConstraint("start_layer >= 0 AND end_layer > start_layer", name="layer_range"),
        CheckConstraint("num_bytes > 0", name="num_bytes_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    degree: Mapped[int]
    stage: Mapped[int]
    start_layer: Mapped[int]
    end_layer: Mapped[int]
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    # {"tensors": [{name, file, start, end, dtype, shape}, ...]} in load order
    manifest: Mapped[dict[str, Any]]


class Node(Base):
    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint("gpu_memory_bytes > 0", name="gpu_memory_bytes_positive"),
        CheckConstraint("nic_bandwidth_bytes_per_s > 0", name="nic_bandwidth_positive"),
    )

    # the node agent's name for itself (the Kubernetes node name in a cluster)
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    gpu_type: Mapped[str] = mapped_column(String(64))
    gpu_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    nic_bandwidth_bytes_per_s: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[NodeStatus] = mapped_column(_status(NodeStatus, "node_status"))
    last_heartbeat: Mapped[datetime]


class Endpoint(Base):
    __tablename__ = "endpoints"
    __table_args__ = (
        CheckConstraint(f"pipeline_degree BETWEEN 1 AND {MAX_PIPELINE_DEGREE}",
                        name="pipeline_degree_range"),
        Index(None, "model_id", "state"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"))
    state: Mapped[EndpointStatus] = mapped_column(_status(EndpointStatus, "endpoint_status"))
    pipeline_degree: Mapped[int]
    # last arrival or completion of a request of its model: the keep-alive clock
    last_request_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()


class Worker(Base):
    """One process serving layers [start_layer, end_layer) of an endpoint's model on a node."""

    __tablename__ = "workers"
    __table_args__ = (
        CheckConstraint("stage >= 0", name="stage_not_negative"),
        CheckConstraint("start_layer >= 0 AND end_layer > start_layer", name="layer_range"),
        CheckConstraint("gpu_memory_bytes > 0", name="gpu_memory_bytes_positive"),
        CheckConstraint("capacity > 0", name="capacity_positive"),
        Index(None, "node_id", "state"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    endpoint_id: Mapped[int] = mapped_column(ForeignKey("endpoints.id", ondelete="CASCADE"),
                                             index=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id", ondelete="RESTRICT"))
    stage: Mapped[int]
    start_layer: Mapped[int]
    end_layer: Mapped[int]
    gpu_memory_bytes: Mapped[int] = mapped_column(BigInteger)
    # sized for the whole model, so it can survive pipeline consolidation
    is_full_size: Mapped[bool]
    state: Mapped[WorkerStatus] = mapped_column(_status(WorkerStatus, "worker_status"))
    # set by the node agent once the process or pod exists
    pid: Mapped[int | None]
    pod_name: Mapped[str | None] = mapped_column(String(253))
    # the weight fetch started at placement: bytes, planned bandwidth, deadline (its TTFT SLO)
    fetch_bytes: Mapped[int | None] = mapped_column(BigInteger)
    fetch_bandwidth_bytes_per_s: Mapped[float | None] = mapped_column(Float)
    fetch_deadline: Mapped[datetime | None]
    created_at: Mapped[datetime] = _created_at()
    ready_at: Mapped[datetime | None]
    # requests it runs at once, as it reported when ready (scale-out counts its slots)
    capacity: Mapped[int | None]
    stopped_at: Mapped[datetime | None]
