"""The storage service's settings, read once at start-up (HS_STORAGE_* environment)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class StorageSettings(BaseSettings):
    """Defaults from HS_STORAGE_* environment variables; command-line flags override them."""

    model_config = SettingsConfigDict(env_prefix="HS_STORAGE_")

    # store folder (models/, staging/)
    root: Path | None = None
    host: str = "127.0.0.1"
    port: int = 8600
    # emulated NIC of the store in megabits per second, shared by all responses; None = unpaced
    egress_mbps: float | None = None
    # Prometheus metrics port (0: off)
    metrics_port: int = 0

    @property
    def egress_bytes_per_s(self) -> float | None:
        return None if self.egress_mbps is None else self.egress_mbps * 1e6 / 8
