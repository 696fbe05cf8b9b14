"""Small random Hugging Face models saved as real checkpoint folders."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.hf_reference import SavedModel


@pytest.fixture(scope="module")
def save_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SavedModel]:
    """Build a random HF causal LM from a config, save it (optionally in fp16/bf16), and return
    the folder with the float32 HF model of the *saved* (rounded) weights."""
    from transformers import AutoModelForCausalLM

    def save(config: object, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> SavedModel:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        folder = tmp_path_factory.mktemp(type(config).__name__)
        model.to(dtype).save_pretrained(folder)
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return folder, reference

    return save
