"""OPT and Falcon stage models against Hugging Face transformers on tiny random checkpoints.

Each variant is a few-layer model with every weight randomized (norm weights and biases too),
saved with `save_pretrained` once per module and loaded by the engine from that folder.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)

from services.worker.engine.config import EngineConfig
from services.worker.engine.errors import UnsupportedModelError
from services.worker.engine.model_runner import ModelRunner

pytestmark = [pytest.mark.unit, pytest.mark.parity]

VOCAB_SIZE = 300
PROMPT_LENS = (5, 9, 3)
NUM_DECODE_STEPS = 32
LOGITS_ATOL = 1e-4
STAGE_ATOL = 1e-5
WEIGHT_STD = 0.2


@dataclass(frozen=True)
class Variant:
    name: str
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    config: dict[str, Any]
    # the first stage's token embedding (only the first stage may own it)
    embedding: str


def _opt(name: str, **config: Any) -> Variant:
    base = {"hidden_size": 64, "ffn_dim": 128, "num_attention_heads": 4,
            "num_hidden_layers": 3, "max_position_embeddings": 128}
    return Variant(name, OPTConfig, OPTForCausalLM, base | config,
                   "model.decoder.embed_tokens.weight")


def _falcon(name: str, **config: Any) -> Variant:
    base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
            "max_position_embeddings": 128}
    return Variant(name, FalconConfig, FalconForCausalLM, base | config,
                   "transformer.word_embeddings.weight")


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    _opt("opt-125m-style"),
    _opt("opt-350m-style", word_embed_proj_dim=32, do_layer_norm_before=False),
    _opt("opt-gelu-no-bias-no-norm-affine", activation_function="gelu", enable_bias=False,
         layer_norm_elementwise_affine=False),
    _falcon("falcon-7b-style", multi_query=True, parallel_attn=True,
            new_decoder_architecture=False),
    _falcon("falcon-40b-style", new_decoder_architecture=True, num_attention_heads=8,
            num_kv_heads=2),
    _falcon("falcon2-11b-style", new_decoder_architecture=True, num_kv_heads=2,
            num_ln_in_parallel_attn=1),
    _falcon("falcon-sequential-multi-head", multi_query=False, parallel_attn=False, bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
]}
OPT_VARIANTS = [name for name in VARIANTS if name.startswith("opt")]


@dataclass
class Checkpoint:
    variant: Variant
    path: Path
    hf: PreTrainedModel

    @property
    def num_layers(self) -> int:
        return int(self.variant.config["num_hidden_layers"])


def build_hf_model(variant: Variant, seed: int = 0) -> PreTrainedModel:
    config = variant.config_class(vocab_size=VOCAB_SIZE, **variant.config)
    torch.manual_seed(seed)
    hf = variant.model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # HF initializes norms to 1 and biases to 0; random values make them count.
        for name, param in hf.named_parameters():
            is_norm = re.search(r"(norm|ln_\w+)\.weight$", name) is not None
            noise = torch.randn(param.shape, generator=generator) * WEIGHT_STD
            param.copy_(noise + 1.0 if is_norm else noise)
    return hf


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Checkpoint]:
    """Each variant's model, built and saved on first use and kept for the module."""
    made: dict[str, Checkpoint] = {}

    def get(name: str) -> Checkpoint:
        if name not in made:
            variant = VARIANTS[name]
            hf = build_hf_model(variant)
            path = tmp_path_factory.mktemp(name)
            hf.save_pretrained(path)
            made[name] = Checkpoint(variant, path, hf)
        return made[name]

    return get


@pytest.fixture
def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB_SIZE, (n,), generator=generator) for n in PROMPT_LENS]


def load_runner(path: Path, **engine: Any) -> ModelRunner:
    runner = ModelRunner(EngineConfig(model_path=path, dtype="float32", max_num_seqs=4,
                                      weight_packing="sync",
                                      max_model_len=128, **engine))
    runner.load()
    assert runner.kv_cache is not None
    # The cache comes from torch.empty: make never-written entries NaN so that any read of
    # one shows up in the logits instead of passing by luck.
    for cache in runner.kv_cache.k + runner.kv_cache.v:
        cache.fill_(float("nan"))
    return runner


def prefill_logits(runner: ModelRunner, prompts: list[torch.Tensor]) -> torch.Tensor:
    """Logits [num_prompt_tokens, vocab] of one packed prefill of all prompts."""
    batch = runner.new_batch(is_prefill=True, slot_ids=list(range(len(prompts))),
                             context_lens=[0] * len(prompts),
                             query_lens=[len(p) for p in prompts])
    return runner.logits(runner.forward(torch.cat(prompts), batch), batch, all_tokens=True)


@torch.inference_mode()
def hf_logits(hf: PreTrainedModel, prompts: list[torch.Tensor]) -> torch.Tensor:
    """HF logits of each prompt run alone, concatenated like a packed prefill."""
    return torch.cat([hf(prompt[None]).logits[0] for prompt in prompts])


def runner_greedy(runner: ModelRunner, prompts: list[torch.Tensor], num_steps: int
                  ) -> list[list[int]]:
    slots = list(range(len(prompts)))
    lens = [len(p) for p in prompts]
    batch = runner.new_batch(is_prefill=True, slot_ids=slots, context_lens=[0] * len(prompts),
                             query_lens=lens)
    tokens = runner.logits(runner.forward(torch.cat(prompts), batch), batch).argmax(-1)
    generated = [[token] for token in tokens.tolist()]
    for _ in range(num_steps - 1):
        batch = runner.new_batch(is_prefill=False, slot_ids=slots, context_lens=lens,
                                 query_lens=[1] * len(prompts))
        tokens = runner.logits(runner.forward(tokens, batch), batch).argmax(-1)
        lens = [n + 1 for n in lens]
        for seq, token in zip(generated, tokens.tolist(), strict=True):
            seq.append(token)
    return generated


@torch.inference_mode()
def hf_greedy(hf: PreTrainedModel, prompt: torch.Tensor, num_steps: int) -> list[int]:
    # A manual argmax loop over the whole sequence: generate() would stop at an EOS token.
    ids = prompt
    for _ in range(num_steps):
        next_token = hf(ids[None]).logits[0, -1].argmax()
        ids = torch.cat([ids, next_token[None]])
    return ids[len(prompt):].tolist()


def layer_indices(parameter_names: set[str]) -> set[int]:
    return {int(m.group(1)) for name in parameter_names
            if (m := re.search(r"\.(?:layers|h)\.(\d+)\.", name))}


def parameter_names(runner: ModelRunner) -> set[str]:
    return {name for name, _ in runner.model.named_parameters()}


@pytest.mark.parametrize("name", VARIANTS)
def test_packed_prefill_logits_match_hugging_face_at_every_position(
    name: str, checkpoints: Callable[[str], Checkpoint], prompts: list[torch.Tensor]
) -> None:
    checkpoint = checkpoints(name)
    runner = load_runner(checkpoint.path)

    logits = prefill_logits(runner, prompts)

    torch.testing.assert_close(logits, hf_logits(checkpoint.hf, prompts), rtol=0,
                               atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_decoding_emits_the_same_tokens_as_hugging_face(
    name: str, checkpoints: Callable[[str], Checkpoint], prompts: list[torch.Tensor]
) -> None:
    checkpoint = checkpoints(name)
    runner = load_runner(checkpoint.path)

    generated = runner_greedy(runner, prompts, NUM_DECODE_STEPS)

    assert generated == [hf_greedy(checkpoint.hf, p, NUM_DECODE_STEPS) for p in prompts]


@pytest.mark.parametrize("name", VARIANTS)
def test_two_stages_in_sequence_give_the_whole_models_logits(
    name: str, checkpoints: Callable[[str], Checkpoint], prompts: list[torch.Tensor]
) -> None:
    checkpoint = checkpoints(name)
    split = checkpoint.num_layers // 2
    whole = load_runner(checkpoint.path)
    first = load_runner(checkpoint.path, end_layer=split)
    last = load_runner(checkpoint.path, start_layer=split)
    slots, lens = list(range(len(prompts))), [len(p) for p in prompts]
    next_tokens = torch.tensor([7, 8, 9])
    # a packed prefill, then one decode step on top of it
    steps: list[tuple[torch.Tensor, dict[str, Any]]] = [
        (torch.cat(prompts), {"is_prefill": True, "context_lens": [0] * len(prompts),
                              "query_lens": lens}),
        (next_tokens, {"is_prefill": False, "context_lens": lens,
                       "query_lens": [1] * len(prompts)}),
    ]

    for inputs, batch_args in steps:
        batch = whole.new_batch(slot_ids=slots, **batch_args)
        expected = whole.logits(whole.forward(inputs, batch), batch, all_tokens=True)
        hidden = first.forward(inputs, batch)  # [num_tokens, hidden]
        staged = last.logits(last.forward(hidden, batch), batch, all_tokens=True)

        torch.testing.assert_close(staged, expected, rtol=0, atol=STAGE_ATOL)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_stage_holds_exactly_its_own_weights(
    name: str, checkpoints: Callable[[str], Checkpoint]
) -> None:
    checkpoint = checkpoints(name)
    split = checkpoint.num_layers // 2
    whole = load_runner(checkpoint.path)
    first = load_runner(checkpoint.path, end_layer=split)
    last = load_runner(checkpoint.path, start_layer=split)
    first_names, last_names = parameter_names(first), parameter_names(last)

    assert first.model.meta_parameters() == []
    assert last.model.meta_parameters() == []
    assert layer_indices(first_names) == set(range(split))
    assert layer_indices(last_names) == set(range(split, checkpoint.num_layers))
    assert checkpoint.variant.embedding in first_names - last_names
    assert "lm_head.weight" in last_names - first_names
    assert first_names.isdisjoint(last_names)
    assert first_names | last_names == parameter_names(whole)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", VARIANTS)
def test_half_precision_checkpoint_runs_in_float32_like_hugging_face(
    name: str, dtype: torch.dtype, checkpoints: Callable[[str], Checkpoint],
    prompts: list[torch.Tensor], tmp_path: Path
) -> None:
    checkpoint = checkpoints(name)
    copy.deepcopy(checkpoint.hf).to(dtype).save_pretrained(tmp_path)
    # HF itself loads the rounded weights in float32 (casting the float32 model back would also
    # round its rotary table, a buffer and not a weight).
    reference = checkpoint.variant.model_class.from_pretrained(tmp_path, dtype=torch.float32)
    runner = load_runner(tmp_path)

    logits = prefill_logits(runner, prompts)

    assert runner.model_config.checkpoint_dtype == dtype
    torch.testing.assert_close(logits, hf_logits(reference.eval(), prompts), rtol=0,
                               atol=LOGITS_ATOL)


@pytest.mark.parametrize("name", OPT_VARIANTS)
def test_opt_checkpoint_named_without_model_prefix_loads(
    name: str, checkpoints: Callable[[str], Checkpoint], prompts: list[torch.Tensor],
    tmp_path: Path
) -> None:
    checkpoint = checkpoints(name)
    tensors = load_file(checkpoint.path / "model.safetensors")
    # The facebook/opt-* checkpoints on the hub name their tensors "decoder.layers.0...".
    save_file({key.removeprefix("model."): t for key, t in tensors.items()},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(checkpoint.path / "config.json", tmp_path / "config.json")
    runner = load_runner(tmp_path)

    logits = prefill_logits(runner, prompts)

    assert any(key.startswith("decoder.") for key in load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(logits, hf_logits(checkpoint.hf, prompts), rtol=0,
                               atol=LOGITS_ATOL)


def _custom_code_config(config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """A converted Falcon config.json as the original custom-code ("RW") checkpoints wrote it."""
    is_new = config["new_decoder_architecture"]
    renames = {"num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
               "num_kv_heads": "n_head_kv" if is_new else None,
               "new_decoder_architecture": None, "num_ln_in_parallel_attn": None}
    for key, value in config.items():
        if key not in renames:
            yield key, value
        elif renames[key] is not None:
            yield renames[key], value
    yield "model_type", "RefinedWeb" if is_new else "RefinedWebModel"
    yield "architectures", ["RWForCausalLM"]


@pytest.mark.parametrize("name", ["falcon-7b-style", "falcon-40b-style"])
def test_falcon_custom_code_config_keys_are_understood(
    name: str, checkpoints: Callable[[str], Checkpoint], prompts: list[torch.Tensor],
    tmp_path: Path
) -> None:
    checkpoint = checkpoints(name)
    config = json.loads((checkpoint.path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(_custom_code_config(config))))
    shutil.copy(checkpoint.path / "model.safetensors", tmp_path / "model.safetensors")
    runner = load_runner(tmp_path)

    logits = prefill_logits(runner, prompts)

    torch.testing.assert_close(logits, hf_logits(checkpoint.hf, prompts), rtol=0,
                               atol=LOGITS_ATOL)


def test_falcon_with_alibi_is_rejected_naming_alibi(tmp_path: Path) -> None:
    variant = VARIANTS["falcon-7b-style"]
    config = FalconConfig(vocab_size=VOCAB_SIZE, alibi=True, **variant.config)
    config.save_pretrained(tmp_path)

    with pytest.raises(UnsupportedModelError, match="alibi"):
        ModelRunner(EngineConfig(model_path=tmp_path))


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_handed_over_from_a_two_stage_pipeline_continues_with_the_same_tokens(
    name: str, checkpoints: Callable[[str], Checkpoint], prompts: list[torch.Tensor]
) -> None:
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.sequence import SamplingParams

    checkpoint = checkpoints(name)
    prompt = prompts[1].tolist()
    params = SamplingParams(temperature=0.7, top_k=40, seed=5, max_tokens=NUM_DECODE_STEPS,
                            ignore_eos=True)

    def engine(boundaries: list[int]) -> LLMEngine:
        made = LLMEngine.from_model_dir(checkpoint.path, stage_boundaries=boundaries,
                                        with_tokenizer=False, weight_packing="sync")
        made.load()
        return made

    def drain(made: LLMEngine) -> list[int]:
        return [t for _ in iter(made.has_unfinished, False) for o in made.step()
                for t in o.new_token_ids]

    whole = engine([0, checkpoint.num_layers])
    whole.add_request("r", prompt, params)
    expected = drain(whole)
    pipeline = engine([0, 1, checkpoint.num_layers])
    pipeline.add_request("r", prompt, params)
    produced = [t for _ in range(10) for o in pipeline.step() for t in o.new_token_ids]
    consolidated = engine([0, checkpoint.num_layers])
    consolidated.import_sequence(pipeline.export_sequence("r", remove=True))
    assert produced + drain(consolidated) == expected
