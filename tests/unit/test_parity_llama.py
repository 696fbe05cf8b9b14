"""The Llama family (Llama-2, Llama-3, Mistral) against Hugging Face transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.hf_reference import (
    SavedModel,
    hf_greedy,
    hf_logits,
    make_engine,
    make_runner,
    prefill_logits,
)

pytestmark = [pytest.mark.unit, pytest.mark.parity]

PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 3, 3, 8, 91, 120, 64, 5, 11, 2, 77], [1, 5]]
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, vocab_size=300,
             max_position_embeddings=256)


def _llama2() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **SMALL)


def _llama3() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(
        num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, **SMALL,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )


def _mistral() -> object:
    from transformers import MistralConfig

    return MistralConfig(num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                         **SMALL)


def _llama_tied() -> object:
    from transformers import LlamaConfig

    return LlamaConfig(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       rope_scaling={"rope_type": "linear", "factor": 2.0}, **SMALL)


VARIANTS: dict[str, Callable[[], object]] = {
    "llama2": _llama2, "llama3-gqa-rope-scaling": _llama3, "mistral-mqa": _mistral,
    "llama-tied-linear-rope": _llama_tied,
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def saved(request: pytest.FixtureRequest, save_hf_model: Callable[..., SavedModel]) -> SavedModel:
    return save_hf_model(VARIANTS[request.param]())


def test_prefill_logits_of_a_packed_batch_match_transformers(saved: SavedModel) -> None:
    folder, hf = saved
    logits = prefill_logits(make_runner(folder), PROMPTS)
    offset = 0
    for prompt in PROMPTS:
        expected = hf_logits(hf, prompt)
        got = logits[offset:offset + len(prompt)]
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
        offset += len(prompt)


def test_greedy_tokens_for_32_steps_equal_transformers(saved: SavedModel) -> None:
    folder, hf = saved
    engine = make_engine(folder)
    from services.worker.engine.engine import generate
    from services.worker.engine.sequence import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    results = generate(engine, list(PROMPTS), params)
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert result.token_ids == hf_greedy(hf, prompt, 32)
        assert result.finish_reason == "length"


def test_two_stages_compose_to_the_whole_model(saved: SavedModel) -> None:
    folder, _ = saved
    whole = prefill_logits(make_runner(folder), PROMPTS)
    first = make_runner(folder, start_layer=0, end_layer=1)
    second = make_runner(folder, start_layer=1, end_layer=4)
    batch = first.new_batch(is_prefill=True, slot_ids=[0, 1, 2], context_lens=[0, 0, 0],
                            query_lens=[len(p) for p in PROMPTS])
    hidden = first.forward(torch.tensor([t for p in PROMPTS for t in p]), batch)
    staged = second.logits(second.forward(hidden, batch), batch, all_tokens=True)
    assert torch.allclose(staged, whole, atol=1e-5, rtol=0)
    assert first.model.lm_head is None and first.model.model.norm is None
    assert second.model.model.embed_tokens is None
    assert sorted(first.model.model.layers) == ["0"]
    assert sorted(second.model.model.layers) == ["1", "2", "3"]
    assert first.model.meta_parameters() == [] and second.model.meta_parameters() == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_and_match(
    dtype: torch.dtype, save_hf_model: Callable[..., SavedModel]
) -> None:
    folder, hf = save_hf_model(_llama3(), dtype=dtype)
    logits = prefill_logits(make_runner(folder, dtype="float32"), PROMPTS[:1])
    assert torch.allclose(logits, hf_logits(hf, PROMPTS[0]), atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads_through_its_index(
    save_hf_model: Callable[..., SavedModel], tmp_path: Path
) -> None:
    _folder, hf = save_hf_model(_llama2())
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    logits = prefill_logits(make_runner(tmp_path), PROMPTS[:1])
    assert torch.allclose(logits, hf_logits(hf, PROMPTS[0]), atol=1e-4, rtol=0)


def test_a_mistral_sliding_window_caps_the_sequence_length(
    save_hf_model: Callable[..., SavedModel],
) -> None:
    from transformers import MistralConfig

    folder, _ = save_hf_model(MistralConfig(num_attention_heads=4, num_key_value_heads=1,
                                            sliding_window=64, **SMALL))
    assert make_engine(folder).max_model_len == 64
