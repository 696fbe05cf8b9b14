"""The worker process's configuration, and the engine it serves."""

from __future__ import annotations

import time
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
    # a partition file the node agent is filling (watermark next to it); None: load the
    # model folder's own safetensors
    partition: Path | None = None
    # this worker's stage of a degree-`degree` pipeline (0 of 1: the whole model). Stage 0
    # of a pipeline drives it; the others serve activations on the data plane.
    stage: int = 0
    degree: int = 1
    # start-up phase -> unix time (s) it was reached, reported in worker.started / ready
    phases: dict[str, float] = field(default_factory=dict)


def load_engine(config: WorkerConfig) -> Engine:
    """Build and load the engine (runs in a thread, alongside the NATS set-up)."""
    if config.partition is not None:
        from services.worker.partition import load_engine_from_partition

        return load_engine_from_partition(config, config.partition)
    from services.worker.engine.engine import LLMEngine

    config.phases["engine_imported_at"] = time.time()
    config.phases["load_started_at"] = time.time()

    engine = LLMEngine.from_model_dir(config.model_dir, max_num_seqs=config.worker.capacity,
                                      **config.engine_options)
    engine.load()
    config.phases["loaded_at"] = time.time()
    return engine
