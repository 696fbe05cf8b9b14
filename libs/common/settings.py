"""Settings from the environment (prefix `HYDRASERVE_`, groups joined by `__`).

Read once at a process's edge (`Settings()` in its `__main__`) and passed down; deeper code
takes the values it needs as arguments and never reads the environment. Examples:

    HYDRASERVE_NATS__URL=nats://nats:4222
    HYDRASERVE_GATEWAY__PORT=8000
    HYDRASERVE_GATEWAY__ADMIN_KEY=sk-admin-...
    HYDRASERVE_GATEWAY__API_KEYS='["sk-team-a", "sk-team-b"]'
    HYDRASERVE_GATEWAY__MODELS='["meta-llama/Llama-2-7b-chat-hf"]'
    HYDRASERVE_GATEWAY__STORAGE_URL=http://storage:8600
    HYDRASERVE_GATEWAY__DEFAULT_MAX_REQUESTS_PER_MINUTE=600
    HYDRASERVE_DATABASE__URL=postgresql+asyncpg://postgres:pw@postgres:5432/hydraserve
    HYDRASERVE_WORKER__ACK_WAIT_S=30
    HYDRASERVE_WORKER__DATA_PLANE=nats
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class NatsSettings(BaseModel):
    url: str = "nats://127.0.0.1:4222"
    connect_timeout_s: float = Field(default=5.0, gt=0)


class BusSettings(BaseModel):
    """Retention of the JetStream streams (applied by whoever creates them first)."""

    # queued requests older than this are dropped by the server (deadlines expire far sooner)
    requests_max_age_s: float = Field(default=3600.0, gt=0)
    events_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    events_max_bytes: int = Field(default=1 << 30, gt=0)
    # window in which a re-published message with the same Nats-Msg-Id is stored once
    duplicate_window_s: float = Field(default=120.0, gt=0)


class DatabaseSettings(BaseModel):
    url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/hydraserve"

    @property
    def is_configured(self) -> bool:
        """True when the URL was given (HYDRASERVE_DATABASE__URL), not just the default."""
        return "url" in self.model_fields_set


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # accepted on every route; None: only `api_keys` are accepted
    admin_key: SecretStr | None = None
    # further accepted keys until keys live in the database
    api_keys: list[SecretStr] = Field(default_factory=list)
    # the models served when no database is configured (with one, the `models` table)
    models: list[str] = Field(default_factory=list)
    # the storage service the admin API imports models into
    storage_url: str = "http://127.0.0.1:8600"
    # queue wait + cold start + prefill: no first token by then -> 503 with Retry-After
    first_token_timeout_s: float = Field(default=60.0, gt=0)
    # silence between two chunks of an answer that has started -> the request fails
    inter_token_timeout_s: float = Field(default=30.0, gt=0)
    # the Retry-After a 503 suggests
    retry_after_s: int = Field(default=5, ge=0)
    # limits of a tenant that has none of its own, and of each key in `api_keys`
    # (None: no limit); per gateway replica, see docs/TENANTS.md
    default_max_requests_per_minute: int | None = Field(default=None, gt=0)
    default_max_tokens_per_minute: int | None = Field(default=None, gt=0)
    default_max_concurrent_requests: int | None = Field(default=None, gt=0)


class WorkerSettings(BaseModel):
    # requests handled at once (unacknowledged messages held; the engine's batch size)
    capacity: int = Field(default=8, ge=1)
    # a worker silent this long loses its requests to another worker (redelivery). Well
    # under the gateway's inter_token_timeout_s, so a stream whose worker died resumes
    # (deduplicated by seq) before its client gives up; in-progress acks every ack_wait/3.
    ack_wait_s: float = Field(default=10.0, gt=0)
    # deliveries of one request before it is given up (a request that crashes every worker)
    max_deliver: int = Field(default=5, ge=1)
    # how long one pull waits for a request; also bounds how fast pulling stops on shutdown
    fetch_timeout_s: float = Field(default=1.0, gt=0)
    # on SIGTERM, time given to in-flight requests to finish before they are handed back
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # pipeline activations: "tcp" writes each frame on a direct socket to the receiving stage
    # (its address asked for over NATS; NATS carries the frames if it cannot be reached);
    # "nats" sends every frame through the NATS server
    data_plane: Literal["tcp", "nats"] = "tcp"
    # the host other stages reach this worker's data-plane socket at (default: this host's
    # name, resolved: the pod's or container's address)
    data_plane_host: str | None = None
    # pipeline workers keep their cores out of idle while frames flow (idle-priority spinner
    # processes; services/worker/keep_awake.py), from the pipeline's start to consolidation
    keep_awake: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HYDRASERVE_", env_nested_delimiter="__",
                                      extra="ignore")

    nats: NatsSettings = Field(default_factory=NatsSettings)
    bus: BusSettings = Field(default_factory=BusSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
