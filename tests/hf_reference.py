"""Reference decoding with Hugging Face transformers, and engine builders for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from services.worker.engine.config import EngineConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.model_runner import ModelRunner

SavedModel = tuple[Path, torch.nn.Module]


def hf_greedy(model: torch.nn.Module, prompt: list[int], num_steps: int) -> list[int]:
    """Greedy continuation by the HF model (full recompute each step: the plainest reference)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(num_steps):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def hf_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def make_engine(folder: Path, *, boundaries: list[int] | None = None, **config: object
                ) -> LLMEngine:
    """An engine without tokenizer. Weights are packed before ready (the serving kernels,
    without a mid-test switch from the background packer)."""
    config.setdefault("weight_packing", "sync")
    engine = LLMEngine.from_model_dir(folder, stage_boundaries=boundaries, with_tokenizer=False,
                                      **config)
    engine.load()
    return engine


def make_runner(folder: Path, **config: object) -> ModelRunner:
    config.setdefault("weight_packing", "sync")
    runner = ModelRunner(EngineConfig(model_path=folder, **config))  # type: ignore[arg-type]
    runner.load()
    return runner


def prefill_logits(runner: ModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of every token of every prompt, prefilled together as one packed batch."""
    batch = runner.new_batch(is_prefill=True, slot_ids=list(range(len(prompts))),
                             context_lens=[0] * len(prompts),
                             query_lens=[len(p) for p in prompts])
    hidden = runner.forward(torch.tensor([t for p in prompts for t in p]), batch)
    return runner.logits(hidden, batch, all_tokens=True)
