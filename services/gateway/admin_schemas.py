"""The admin API's request and response bodies."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from libs.common.db.models import MAX_PIPELINE_DEGREE

# the largest values the database's INTEGER and BIGINT columns hold (beyond: a 500)
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL (the insert would fail: a 500 instead of a 422)
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# a string the admin API stores
Text = Annotated[str, AfterValidator(_no_nul)]


class RegisterModel(BaseModel):
    """POST /admin/models"""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=120)
    # an HF checkpoint folder, as the storage service sees it
    path: Text = Field(min_length=1)
    ttft_slo_ms: int = Field(gt=0, le=INT32_MAX)
    tpot_slo_ms: int = Field(gt=0, le=INT32_MAX)
    max_pipeline_degree: int = Field(default=MAX_PIPELINE_DEGREE, ge=1, le=MAX_PIPELINE_DEGREE)
    keep_alive_s: float = Field(default=60.0, ge=0)
    # KV-cache memory a whole-model worker reserves next to the weights
    kv_cache_bytes: int = Field(default=0, ge=0, le=INT64_MAX)
    # the name of the tenant the model is private to; None: public
    owner_tenant: Text | None = Field(default=None, min_length=1, max_length=128)


class PartitionOut(BaseModel):
    degree: int
    stage: int
    start_layer: int
    end_layer: int
    num_bytes: int


class ModelOut(BaseModel):
    name: str
    architecture: str
    family: str
    num_layers: int
    size_bytes: int
    kv_cache_bytes: int
    # the model's URL in the storage service
    storage_path: str
    ttft_slo_ms: int
    tpot_slo_ms: int
    max_pipeline_degree: int
    keep_alive_s: float
    created_at: datetime
    # the tenant the model is private to; None: public
    owner_tenant: str | None = None
    partitions: list[PartitionOut] = Field(default_factory=list)


class TenantLimits(BaseModel):
    """A tenant's limits; null: the gateway's default (HYDRASERVE_GATEWAY__DEFAULT_*)."""

    model_config = ConfigDict(extra="forbid")

    # requests admitted in any 60 s window
    max_requests_per_minute: int | None = Field(default=None, gt=0, le=INT32_MAX)
    # prompt (estimated) + completion tokens in any 60 s window
    max_tokens_per_minute: int | None = Field(default=None, gt=0, le=INT32_MAX)
    # requests in flight at once
    max_concurrent_requests: int | None = Field(default=None, gt=0, le=INT32_MAX)


class CreateTenant(TenantLimits):
    """POST /admin/tenants"""

    name: Text = Field(min_length=1, max_length=128)


class UpdateTenant(TenantLimits):
    """PATCH /admin/tenants/{name}: only the fields given change (null: back to default)."""


class TenantOut(TenantLimits):
    id: int
    name: str
    created_at: datetime


class IssueTenantKey(BaseModel):
    """POST /admin/tenants/{name}/keys"""

    model_config = ConfigDict(extra="forbid")

    name: Text = Field(default="default", min_length=1, max_length=128)


class IssueKey(BaseModel):
    """POST /admin/keys: a key for `tenant` (created on first use)."""

    model_config = ConfigDict(extra="forbid")

    tenant: Text = Field(min_length=1, max_length=128)
    name: Text = Field(default="default", min_length=1, max_length=128)


class IssuedKey(BaseModel):
    id: int
    tenant: str
    tenant_id: int
    name: str
    # the plaintext key: shown here once, stored nowhere
    key: str


class NodeOut(BaseModel):
    id: str
    gpu_type: str
    gpu_memory_bytes: int
    nic_bandwidth_bytes_per_s: int
    state: str
    last_heartbeat: datetime


class EndpointOut(BaseModel):
    id: int
    model: str
    state: str
    pipeline_degree: int
    last_request_at: datetime | None
    created_at: datetime


class WorkerOut(BaseModel):
    id: int
    endpoint_id: int
    node_id: str
    stage: int
    start_layer: int
    end_layer: int
    gpu_memory_bytes: int
    is_full_size: bool
    state: str
    created_at: datetime
    ready_at: datetime | None
    stopped_at: datetime | None
