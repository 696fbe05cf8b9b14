"""The worker process's configuration, and the engine it serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.common.settings import BusSettings, NatsSettings, WorkerSettings
from services.worker.engine_loop import Engine


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker process needs, resolved from its flags and settings."""

    model: str
    model_dir: Path
    worker_id: str
    nats: NatsSettings
    bus: BusSettings
    worker: WorkerSettings
    node_id: str | None = None
    endpoint_id: str | None = None
    # EngineConfig fields (device, dtype, max_model_len, ...)
    engine_options: dict[str, Any] = field(default_factory=dict)


def load_engine(config: WorkerConfig) -> Engine:
    """Build and load the engine (runs in a thread, alongside the NATS set-up)."""
    from services.worker.engine.engine import LLMEngine

    engine = LLMEngine.from_model_dir(config.model_dir, max_num_seqs=config.worker.capacity,
                                      **config.engine_options)
    engine.load()
    return engine
