"""Model families by name; each module is imported only when its family is used."""

from __future__ import annotations

import importlib

import torch

from services.worker.engine.config import ModelConfig, StageSpec
from services.worker.engine.models.base import StageModel

_FAMILIES: dict[str, tuple[str, str]] = {
    "llama": ("services.worker.engine.models.llama", "LlamaForCausalLM"),
    "opt": ("services.worker.engine.models.opt", "OPTForCausalLM"),
    "falcon": ("services.worker.engine.models.falcon", "FalconForCausalLM"),
}


def model_class(family: str) -> type[StageModel]:
    module_name, class_name = _FAMILIES[family]
    cls: type[StageModel] = getattr(importlib.import_module(module_name), class_name)
    return cls


def build_stage_model(config: ModelConfig, stage: StageSpec) -> StageModel:
    """The model for one stage, on the meta device: no memory until weights are assigned."""
    with torch.device("meta"):
        return model_class(config.family)(config, stage)
