"""Engine and model configuration.

`ModelConfig` is what the engine needs to know about an HF checkpoint folder, read once from
its `config.json`; the family-specific fields stay in `hf_config` and each model class reads
its own. `EngineConfig` is the small validated dataclass the engine is built from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.worker.engine.errors import ModelFormatError, UnsupportedModelError

# architecture name in config.json -> model family implemented in engine/models/
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "OPTForCausalLM": "opt",
    "FalconForCausalLM": "falcon",
    "RWForCausalLM": "falcon",
}
# model_type -> family, for configs whose `architectures` list is missing
MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "mistral": "llama",
    "opt": "opt",
    "falcon": "falcon",
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
}

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

WEIGHT_PACKING_MODES = ("background", "sync", "as_loaded", "off")
# The layer-count key differs by family and by config vintage (Falcon-7B uses n_layer).
_NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class ModelConfig:
    """The family-independent facts about a checkpoint folder."""

    path: Path
    family: str
    architecture: str
    num_layers: int
    # dtype the weights are stored in (config.json's torch_dtype / dtype)
    checkpoint_dtype: torch.dtype
    max_position_embeddings: int | None
    hf_config: dict[str, Any] = field(repr=False)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        config_file = path / "config.json"
        if not path.is_dir():
            raise ModelFormatError(f"model folder {str(path)!r} does not exist")
        if not config_file.is_file():
            raise ModelFormatError(f"model folder {str(path)!r} has no config.json")
        try:
            hf_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelFormatError(f"{config_file} is not valid JSON: {exc}") from exc
        if not isinstance(hf_config, dict):
            raise ModelFormatError(f"{config_file} must hold a JSON object")
        return cls.from_hf_config(path, hf_config)

    @classmethod
    def from_hf_config(cls, path: Path, hf_config: dict[str, Any]) -> ModelConfig:
        architectures = hf_config.get("architectures") or []
        model_type = hf_config.get("model_type")
        family = None
        architecture = None
        for name in architectures:
            if name in ARCHITECTURES:
                family, architecture = ARCHITECTURES[name], name
                break
        if family is None and not architectures and model_type in MODEL_TYPES:
            family, architecture = MODEL_TYPES[model_type], str(model_type)
        if family is None:
            named = architectures or [model_type]
            raise UnsupportedModelError(
                f"architecture {', '.join(map(str, named))} is not supported; "
                f"supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        num_layers = next((hf_config[k] for k in _NUM_LAYER_KEYS if k in hf_config), None)
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ModelFormatError(f"config.json of {str(path)!r} has no valid layer count")
        dtype_name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        if dtype_name not in DTYPES:
            raise UnsupportedModelError(f"weight dtype {dtype_name!r} is not supported")
        return cls(
            path=path,
            family=family,
            architecture=str(architecture),
            num_layers=num_layers,
            checkpoint_dtype=DTYPES[dtype_name],
            max_position_embeddings=hf_config.get("max_position_embeddings"),
            hf_config=hf_config,
        )


@dataclass(frozen=True)
class StageSpec:
    """Decoder layers [start_layer, end_layer) of a model with `num_layers` layers."""

    start_layer: int
    end_layer: int
    num_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer <= self.num_layers:
            raise ValueError(
                f"stage [{self.start_layer}, {self.end_layer}) is not a non-empty layer range "
                f"of a {self.num_layers}-layer model"
            )

    @classmethod
    def whole(cls, num_layers: int) -> StageSpec:
        return cls(0, num_layers, num_layers)

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.num_layers

    @property
    def layers(self) -> range:
        return range(self.start_layer, self.end_layer)


@dataclass
class EngineConfig:
    """How to run one engine instance (a whole model or one stage of it)."""

    model_path: Path
    # "auto": the checkpoint's dtype on CUDA, float32 on CPU (CPU half-precision kernels are slow)
    dtype: str = "auto"
    device: str = "cpu"
    # decoder layers this engine runs; None = the whole model
    start_layer: int | None = None
    end_layer: int | None = None
    # most sequences decoded together in one batch
    max_num_seqs: int = 16
    # longest sequence (prompt + output) in tokens; None = the model's max_position_embeddings
    max_model_len: int | None = None
    # bytes of KV cache; None = enough for max_num_seqs sequences of max_model_len
    kv_cache_bytes: int | None = None
    # most prompt tokens prefilled in one step (several prompts are packed up to this)
    max_prefill_tokens: int = 4096
    seed: int = 0
    # CPU fp32 only: pre-block linear weights for oneDNN — "background" (after ready),
    # "sync" (before ready), "as_loaded" (each linear as soon as its weights are in: for a
    # load whose bytes are still arriving, packing then fills the waits) or "off"
    weight_packing: str = "background"

    def __post_init__(self) -> None:
        self.model_path = Path(self.model_path)
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, {', '.join(DTYPES)}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.weight_packing not in WEIGHT_PACKING_MODES:
            raise ValueError(f"weight_packing {self.weight_packing!r} is not one of "
                             f"{', '.join(WEIGHT_PACKING_MODES)}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")

    def torch_dtype(self, model: ModelConfig) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        return model.checkpoint_dtype if self.device.startswith("cuda") else torch.float32

    def stage(self, model: ModelConfig) -> StageSpec:
        start = 0 if self.start_layer is None else self.start_layer
        end = model.num_layers if self.end_layer is None else self.end_layer
        return StageSpec(start, end, model.num_layers)
