"""The engine on CUDA against transformers on CUDA, for every family and variant of the CPU
parity tests (skipped without a GPU).

Run on a GPU machine: `python -m pytest tests/gpu -q`. `HS_TEST_DEVICE=cpu` runs the same
checks on the CPU (slowly; a dry run of the tests themselves, not evidence for CUDA).

- float32 on CUDA (TF32 off, PyTorch's default for matrix products) is held to the CPU
  tests' bar: logits within 1e-4 of HF's, and the same 32 greedy tokens.
- bfloat16 and float16 are held to half-precision tolerances: the engine's logit error against
  a float32 reference may be at most twice HF's own error in that dtype (plus a little), and
  the 32 greedy tokens must equal HF's in that dtype up to the first step where HF's top two
  logits are within the rounding error (a near-tie either kernel may break either way); from
  there on, every token the engine picks must still be the float32 reference's best token
  within that error.
- Stage composition and KV hand-over run in bfloat16 and must match exactly: the same
  kernels see the same inputs.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.hf_reference import make_engine, make_runner, prefill_logits

DEVICE = os.environ.get("HS_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA device"),
]

PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 3, 3, 8, 91, 120, 64, 5, 11, 2, 77], [1, 5]]
STEPS = 32
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def variants() -> dict[str, Callable[[], torch.nn.Module]]:
    """Every variant of tests/unit/test_parity_*.py, as a function building the random model."""
    from transformers import AutoModelForCausalLM

    from tests.unit import test_parity_llama as llama
    from tests.unit import test_parity_opt_falcon as opt_falcon

    made: dict[str, Callable[[], torch.nn.Module]] = {}
    for name, config in llama.VARIANTS.items():
        made[name] = lambda config=config: AutoModelForCausalLM.from_config(config())
    for name, variant in opt_falcon.VARIANTS.items():
        made[name] = lambda variant=variant: opt_falcon.build_hf_model(variant)
    return made


VARIANT_NAMES = [
    "llama2", "llama3-gqa-rope-scaling", "mistral-mqa", "llama-tied-linear-rope",
    "opt-125m-style", "opt-350m-style", "opt-gelu-no-bias-no-norm-affine",
    "falcon-7b-style", "falcon-40b-style", "falcon2-11b-style", "falcon-sequential-multi-head",
]


@dataclass
class Saved:
    folder: Path
    num_layers: int
    reference: torch.nn.Module  # float32 on CUDA, of the saved weights

    def hf(self, dtype: torch.dtype) -> torch.nn.Module:
        """HF's model in `dtype` (a copy; the float32 reference stays)."""
        return copy.deepcopy(self.reference).to(dtype)


@pytest.fixture(scope="module", params=VARIANT_NAMES)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = variants()[request.param]().eval()
    folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", request.param))
    model.save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return Saved(folder, model.config.num_hidden_layers, reference.to(DEVICE).eval())


def _hf_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt], device=DEVICE)).logits[0].float()


def _hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    for _ in range(STEPS):
        ids.append(int(_hf_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def _engine_greedy(folder: Path, dtype: str) -> list[list[int]]:
    from services.worker.engine.engine import generate
    from services.worker.engine.sequence import SamplingParams

    engine = make_engine(folder, dtype=dtype, device=DEVICE)
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    results = generate(engine, list(PROMPTS), params)
    assert all(r.finish_reason == "length" for r in results)
    return [r.token_ids for r in results]


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_float32_logits_on_cuda_match_transformers(saved: Saved) -> None:
    logits = prefill_logits(make_runner(saved.folder, dtype="float32", device=DEVICE), PROMPTS)
    assert logits.device.type == torch.device(DEVICE).type
    offset = 0
    for prompt in PROMPTS:
        expected = _hf_logits(saved.reference, prompt)
        got = logits[offset:offset + len(prompt)]
        assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()
        offset += len(prompt)


def test_float32_greedy_tokens_on_cuda_equal_transformers(saved: Saved) -> None:
    got = _engine_greedy(saved.folder, "float32")
    assert got == [_hf_greedy(saved.reference, prompt) for prompt in PROMPTS]


@pytest.mark.parametrize("dtype", list(HALF))
def test_half_precision_logits_on_cuda_are_as_close_as_transformers(
    saved: Saved, dtype: str
) -> None:
    hf = saved.hf(HALF[dtype])
    logits = prefill_logits(make_runner(saved.folder, dtype=dtype, device=DEVICE), PROMPTS)
    offset = 0
    for prompt in PROMPTS:
        reference = _hf_logits(saved.reference, prompt)
        ours = _relative_error(logits[offset:offset + len(prompt)].float(), reference)
        theirs = _relative_error(_hf_logits(hf, prompt), reference)
        assert ours <= 2 * theirs + 2e-3, (ours, theirs)
        offset += len(prompt)


def test_bfloat16_greedy_tokens_on_cuda_equal_transformers_up_to_near_ties(
    saved: Saved,
) -> None:
    hf = saved.hf(torch.bfloat16)
    got = _engine_greedy(saved.folder, "bfloat16")
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        expected = _hf_greedy(hf, prompt)
        # the rounding error of this dtype, in logits: how far HF bf16 is from float32 here
        reference_all = _hf_logits(saved.reference, prompt + tokens)
        tolerance = 2 * float((_hf_logits(hf, prompt + tokens) - reference_all).abs().max())
        steps = reference_all[len(prompt) - 1:-1]
        for step, (ours, theirs) in enumerate(zip(tokens, expected, strict=True)):
            if ours == theirs:
                continue
            hf_top2 = _hf_logits(hf, prompt + expected[:step])[-1].topk(2).values
            assert float(hf_top2[0] - hf_top2[1]) <= tolerance, (step, ours, theirs)
            break
        # every token the engine chose is the float32 reference's best, within the rounding
        margins = steps.max(dim=-1).values - steps.gather(1, torch.tensor(tokens, device=DEVICE)
                                                          .unsqueeze(1)).squeeze(1)
        assert float(margins.max()) <= tolerance, (margins, tolerance)


def test_two_stages_on_cuda_compose_to_the_whole_model(saved: Saved) -> None:
    whole = prefill_logits(make_runner(saved.folder, dtype="bfloat16", device=DEVICE), PROMPTS)
    first = make_runner(saved.folder, dtype="bfloat16", device=DEVICE, start_layer=0,
                        end_layer=1)
    second = make_runner(saved.folder, dtype="bfloat16", device=DEVICE, start_layer=1,
                         end_layer=saved.num_layers)
    batch = first.new_batch(is_prefill=True, slot_ids=[0, 1, 2], context_lens=[0, 0, 0],
                            query_lens=[len(p) for p in PROMPTS])
    hidden = first.forward(torch.tensor([t for p in PROMPTS for t in p]), batch)
    assert hidden.device.type == torch.device(DEVICE).type and hidden.dtype == torch.bfloat16
    staged = second.logits(second.forward(hidden, batch), batch, all_tokens=True)
    assert torch.equal(staged, whole)


def test_kv_handed_over_on_cuda_continues_with_the_same_tokens(saved: Saved) -> None:
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.sequence import SamplingParams

    params = SamplingParams(temperature=0.7, top_k=40, seed=5, max_tokens=STEPS, ignore_eos=True)

    def engine(boundaries: list[int]) -> LLMEngine:
        return make_engine(saved.folder, boundaries=boundaries, dtype="bfloat16", device=DEVICE)

    def drain(made: LLMEngine) -> list[int]:
        return [t for _ in iter(made.has_unfinished, False) for o in made.step()
                for t in o.new_token_ids]

    whole = engine([0, saved.num_layers])
    whole.add_request("r", PROMPTS[1], params)
    expected = drain(whole)
    pipeline = engine([0, 1, saved.num_layers])
    pipeline.add_request("r", PROMPTS[1], params)
    produced = [t for _ in range(10) for o in pipeline.step() for t in o.new_token_ids]
    handed = pipeline.export_sequence("r", remove=True)
    consolidated = engine([0, saved.num_layers])
    consolidated.import_sequence(handed)
    assert len(produced) == 10
    assert produced + drain(consolidated) == expected
