"""Loading a worker's stage from a partition file that the node agent is still filling.

The node agent starts the fetch and this process at the same time. Here: wait for the
partition's watermark side file and its first byte (by then the model folder next to it,
config, tokenizer and manifest.json, is complete), build the stage on `meta` for the layers
of the manifest, then assign each tensor as soon as the watermark passes its end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from libs.common.watermark import (
    FillState,
    SharedWatermark,
    partition_model_dir,
    watermark_path,
)

if TYPE_CHECKING:
    from services.worker.config import WorkerConfig
    from services.worker.engine.config import EngineConfig, ModelConfig
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.model_runner import ModelRunner

# the side file appears once the agent has the manifest; the bytes then flow at NIC speed
WATERMARK_TIMEOUT_S = 120.0
TENSOR_TIMEOUT_S = 300.0


def stage_layers(model_dir: Path) -> tuple[int, int]:
    """[start_layer, end_layer) of the partition, from the manifest the agent wrote."""
    manifest = json.loads((model_dir / "manifest.json").read_text())
    return int(manifest["start_layer"]), int(manifest["end_layer"])


def packing_mode(watermark: SharedWatermark, configured: str) -> str:
    """Weights still arriving are packed as each linear lands: the CPU would otherwise wait
    for bytes, and the stage is ready with packed weights. A complete file (the host cache,
    or a fetch finished before the worker started) keeps the configured mode."""
    _, _, state = watermark.read()
    return "as_loaded" if state == FillState.FILLING and configured != "off" else configured


def load_engine_from_partition(config: WorkerConfig, partition: Path) -> LLMEngine:
    """An engine over the stage in `partition`, loaded while its bytes arrive."""
    phases = config.phases
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.loader import SafetensorsReader

    phases["engine_imported_at"] = time.time()
    watermark = SharedWatermark.open(watermark_path(partition), timeout=WATERMARK_TIMEOUT_S)
    try:
        watermark.wait_for(1, WATERMARK_TIMEOUT_S)
        phases["partition_mapped_at"] = time.time()
        start_layer, end_layer = stage_layers(config.model_dir)
        configured = config.engine_options.get("weight_packing", EngineConfig.weight_packing)
        options = config.engine_options | {
            "weight_packing": packing_mode(watermark, str(configured))}
        engine = LLMEngine.from_model_dir(
            config.model_dir, stage_boundaries=[start_layer, end_layer],
            max_num_seqs=config.worker.capacity, **options)
        phases["load_started_at"] = time.time()
        (runner,) = engine.runners
        runner.load(SafetensorsReader(partition, watermark).stream(TENSOR_TIMEOUT_S))
        engine.on_loaded()
        phases["loaded_at"] = time.time()
        return engine
    finally:
        watermark.close()


def load_stage_runner(partition: Path, base: EngineConfig, model_config: ModelConfig | None,
                      *, phases: dict[str, float] | None = None) -> ModelRunner:
    """A runner for the layers of `partition` (from its manifest), with `base`'s engine
    settings, loaded while the partition's bytes arrive. `model_config` None: read it from
    `base.model_path` once the watermark says the model folder is there."""
    import dataclasses

    from services.worker.engine.config import ModelConfig
    from services.worker.engine.loader import SafetensorsReader
    from services.worker.engine.model_runner import ModelRunner

    phases = phases if phases is not None else {}
    watermark = SharedWatermark.open(watermark_path(partition), timeout=WATERMARK_TIMEOUT_S)
    try:
        watermark.wait_for(1, WATERMARK_TIMEOUT_S)
        phases["partition_mapped_at"] = time.time()
        start_layer, end_layer = stage_layers(partition_model_dir(partition))
        if model_config is None:  # the folder is complete by the first byte (module doc)
            model_config = ModelConfig.from_model_dir(base.model_path)
        runner = ModelRunner(dataclasses.replace(
            base, start_layer=start_layer, end_layer=end_layer,
            weight_packing=packing_mode(watermark, base.weight_packing)), model_config)
        phases["load_started_at"] = time.time()
        runner.load(SafetensorsReader(partition, watermark).stream(TENSOR_TIMEOUT_S))
        phases["loaded_at"] = time.time()
        return runner
    finally:
        watermark.close()


def load_worker_stage(config: WorkerConfig, partition: Path) -> ModelRunner:
    """The runner of a pipeline stage after the first (no engine, no tokenizer)."""
    from services.worker.engine.config import EngineConfig

    config.phases["engine_imported_at"] = time.time()
    base = EngineConfig(model_path=config.model_dir, max_num_seqs=config.worker.capacity,
                        **config.engine_options)
    # the model folder may not exist yet: the node agent writes it as the fetch starts
    return load_stage_runner(partition, base, None, phases=config.phases)
