"""Continuous batching, sampling, the KV budget and KV hand-over, on a small random Llama."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from services.worker.engine import attention
from services.worker.engine.engine import LLMEngine, generate
from services.worker.engine.errors import ContextLengthError, InvalidRequestError
from services.worker.engine.models.base import Linear, StageModel
from services.worker.engine.sequence import RequestOutput, SamplingParams
from tests.hf_reference import SavedModel, hf_greedy, make_engine

pytestmark = pytest.mark.unit

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=24,
                         ignore_eos=True)
PROMPTS: list[list[int]] = [[1, 9, 33, 4], [1, 200, 14, 14, 90, 2, 61], [1, 3], [1, 77, 8]]


@pytest.fixture(scope="module")
def saved(save_hf_model: Callable[..., SavedModel]) -> SavedModel:
    from transformers import LlamaConfig

    return save_hf_model(LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, max_position_embeddings=128,
    ))


def run_to_end(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def test_requests_joining_a_running_batch_get_the_same_tokens_as_alone(
    saved: SavedModel,
) -> None:
    folder, hf = saved
    engine = make_engine(folder, max_num_seqs=3)
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    tokens: dict[str, list[int]] = {}
    for step in range(40):
        if step == 5:
            engine.add_request("c", PROMPTS[2], GREEDY)
        if step == 9:
            engine.add_request("d", PROMPTS[3], GREEDY)  # waits: only 3 slots
            assert engine.num_waiting == 1
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    for request_id, more in run_to_end(engine).items():
        tokens.setdefault(request_id, []).extend(more)
    for request_id, prompt in zip("abcd", PROMPTS, strict=True):
        assert tokens[request_id] == hf_greedy(hf, prompt, 24), request_id


def test_a_prefill_gives_its_longest_prompts_the_first_slots(saved: SavedModel) -> None:
    folder, _ = saved
    engine = make_engine(folder)
    for request_id, prompt in zip("abcd", PROMPTS, strict=True):  # 4, 7, 2 and 3 tokens
        engine.add_request(request_id, prompt, GREEDY)
    engine.step()
    assert [seq.request_id for seq in engine.running_sequences()] == ["b", "a", "d", "c"]


def test_decode_attention_in_chunks_gives_hf_greedy_tokens(
    saved: SavedModel, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every saving splits the decode batch (the real threshold needs longer prompts)."""
    monkeypatch.setattr(attention, "CHUNK_COST_PAIRS", 0)
    folder, hf = saved
    prompts = [PROMPTS[1] * 6, PROMPTS[0], PROMPTS[2] * 9, PROMPTS[3]]
    completions = generate(make_engine(folder), list(prompts), GREEDY)
    for prompt, completion in zip(prompts, completions, strict=True):
        assert completion.token_ids == hf_greedy(hf, prompt, 24)


def test_a_seeded_sampled_request_repeats_exactly_and_differs_by_seed(saved: SavedModel) -> None:
    folder, _ = saved
    first = generate(make_engine(folder), [PROMPTS[0]], SAMPLED)[0].token_ids
    again = generate(make_engine(folder), [PROMPTS[0]], SAMPLED)[0].token_ids
    other_seed = SamplingParams(**{**SAMPLED.__dict__, "seed": 8})
    other = generate(make_engine(folder), [PROMPTS[0]], other_seed)[0].token_ids
    assert first == again
    assert first != other
    assert len(first) == 24


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_kv_handover_mid_decode_continues_with_identical_tokens(
    saved: SavedModel, params: SamplingParams
) -> None:
    folder, _ = saved
    expected = run_to_end(_with_requests(make_engine(folder), params))
    # A two-stage pipeline hands its sequences over to one whole-model engine mid-decode.
    pipeline = _with_requests(make_engine(folder, boundaries=[0, 2, 4]), params)
    produced: dict[str, list[int]] = {}
    for _ in range(10):
        for out in pipeline.step():
            produced.setdefault(out.request_id, []).extend(out.new_token_ids)
    consolidated = make_engine(folder)
    for request_id in ("r0", "r1", "r2"):
        snapshot = pipeline.export_sequence(request_id, remove=True)
        assert [(p.start_layer, p.end_layer) for p in snapshot.kv] == [(0, 2), (2, 4)]
        consolidated.import_sequence(snapshot)
    assert not pipeline.has_unfinished()
    for request_id, more in run_to_end(consolidated).items():
        produced[request_id].extend(more)
    assert produced == expected


def _with_requests(engine: LLMEngine, params: SamplingParams) -> LLMEngine:
    for i, prompt in enumerate(PROMPTS[:3]):
        engine.add_request(f"r{i}", prompt, params)
    return engine


def test_stage_snapshots_merge_into_one_importable_sequence(saved: SavedModel) -> None:
    folder, _ = saved
    expected = run_to_end(_with_requests(make_engine(folder), GREEDY))["r1"]
    # Two stage engines cannot run alone; run a pipeline engine and export per stage instead.
    pipeline = _with_requests(make_engine(folder, boundaries=[0, 1, 4]), GREEDY)
    produced: list[int] = []
    for _ in range(6):
        produced += [t for o in pipeline.step() if o.request_id == "r1" for t in o.new_token_ids]
    whole = pipeline.export_sequence("r1")
    first, second = (
        type(whole)(**{**whole.__dict__, "kv": [part]}) for part in whole.kv
    )
    merged = second.merge(first)
    engine = make_engine(folder)
    engine.import_sequence(merged)
    assert produced + run_to_end(engine)["r1"] == expected


def test_a_request_longer_than_the_kv_budget_is_refused_with_the_numbers(
    saved: SavedModel,
) -> None:
    folder, _ = saved
    # 4 layers x 2 KV heads x 16 dims x 2 (K, V) x 4 bytes = 1024 bytes per token
    engine = make_engine(folder, kv_cache_bytes=1024 * 50)
    assert engine.max_model_len == 50
    with pytest.raises(ContextLengthError, match=r"maximum context length is 50 tokens.*"
                                                 r"needs 54 \(4 in the prompt, 50 for"):
        engine.add_request("big", PROMPTS[0], SamplingParams(max_tokens=50))
    engine.add_request("fits", PROMPTS[0], SamplingParams(max_tokens=46, ignore_eos=True))
    assert len(run_to_end(engine)["fits"]) == 46


def test_requests_beyond_the_slots_wait_instead_of_failing(saved: SavedModel) -> None:
    folder, hf = saved
    engine = make_engine(folder, max_num_seqs=1)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, GREEDY)
    engine.step()
    assert (engine.num_running, engine.num_waiting) == (1, 3)
    tokens = run_to_end(engine)
    assert tokens["r3"] == hf_greedy(hf, PROMPTS[3], 24)


def test_abort_frees_the_slot_and_reports_abort(saved: SavedModel) -> None:
    folder, _ = saved
    engine = make_engine(folder, max_num_seqs=2)
    engine.add_request("a", PROMPTS[0], GREEDY)
    engine.add_request("b", PROMPTS[1], GREEDY)
    engine.step()
    out = engine.abort("a")
    assert out == RequestOutput(request_id="a", new_token_ids=[], text="", finished=True,
                                finish_reason="abort", prompt_tokens=4, completion_tokens=1)
    assert engine.num_running == 1
    assert engine.abort("a") is None


def test_stop_token_ids_end_a_request_with_reason_stop(saved: SavedModel) -> None:
    folder, hf = saved
    greedy = hf_greedy(hf, PROMPTS[0], 24)
    stop_at = greedy[5]
    params = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_at])
    result = generate(make_engine(folder), [PROMPTS[0]], params)[0]
    assert result.token_ids == greedy[:greedy.index(stop_at) + 1]
    assert result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "the prompt is empty"),
        ([1, 999], SamplingParams(), "token id 999 is outside the vocabulary"),
        ("text", SamplingParams(), "a text prompt needs the model's tokenizer"),
    ],
)
def test_bad_requests_are_refused_with_a_named_reason(
    saved: SavedModel, prompt: list[int] | str, params: SamplingParams, message: str
) -> None:
    engine = make_engine(saved[0])
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("x", prompt, params)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_tokens", 0)],
)
def test_out_of_range_sampling_parameters_name_the_parameter(field: str, value: float) -> None:
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field


def test_the_engine_rejects_stages_that_do_not_cover_the_model(saved: SavedModel) -> None:
    with pytest.raises(ValueError, match="must start at layer 0"):
        LLMEngine.from_model_dir(saved[0], stage_boundaries=[1, 4], with_tokenizer=False)


def test_unsupported_architectures_and_missing_files_are_named(tmp_path: Path) -> None:
    from services.worker.engine.config import ModelConfig
    from services.worker.engine.errors import ModelFormatError, UnsupportedModelError

    with pytest.raises(ModelFormatError, match=r"has no config\.json"):
        ModelConfig.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(UnsupportedModelError, match="architecture GPT2LMHeadModel is not"):
        ModelConfig.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    with pytest.raises(ModelFormatError, match="no valid layer count"):
        ModelConfig.from_model_dir(tmp_path)


def test_never_written_cache_memory_cannot_leak_into_outputs(saved: SavedModel) -> None:
    folder, hf = saved
    engine = make_engine(folder)
    for runner in engine.runners:
        assert runner.kv_cache is not None
        for tensor in (*runner.kv_cache.k, *runner.kv_cache.v):
            tensor.fill_(float("nan"))  # what `torch.empty` may hand out
    for i, prompt in enumerate(PROMPTS):  # different lengths: short ones read past their end
        engine.add_request(f"r{i}", prompt, GREEDY)
    tokens = run_to_end(engine)
    for i, prompt in enumerate(PROMPTS):
        assert tokens[f"r{i}"] == hf_greedy(hf, prompt, 24)


def is_packed(model: StageModel) -> bool:
    """Every linear of `model` packed, or fused into a packed group (and some are fused)."""
    fused = {id(linear) for owner, name, group in model.fusion_groups() for linear in group
             if getattr(owner, name) is not None}
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    return bool(fused) and all(m.packed is not None or id(m) in fused for m in linears)


def test_packed_cpu_weights_give_the_same_tokens_as_plain_ones(saved: SavedModel) -> None:
    folder, hf = saved
    plain = make_engine(folder, weight_packing="off")
    packed = make_engine(folder, weight_packing="sync")
    assert is_packed(packed.runners[0].model)
    assert all(m.packed is None for m in plain.runners[0].model.modules()
               if isinstance(m, Linear))
    for engine in (plain, packed):
        assert generate(engine, [PROMPTS[1]], GREEDY)[0].token_ids == hf_greedy(hf, PROMPTS[1],
                                                                                 24)


@pytest.mark.parametrize("min_rows", [1, 3])
def test_single_rows_give_hf_tokens_through_either_kernel(saved: SavedModel,
                                                          min_rows: int) -> None:
    """Batch-1 decode runs on the packed kernel or the plain GEMV, by the CPU's vendor."""
    from services.worker.engine.cpu_packing import packed_serves_one_row
    from services.worker.engine.models.base import FusedLinear
    folder, hf = saved
    engine = make_engine(folder, weight_packing="sync")
    model = engine.runners[0].model
    fused = [getattr(owner, name) for owner, name, _ in model.fusion_groups()]
    packed = [m for m in model.modules() if isinstance(m, Linear) and m.packed is not None]
    chosen = 1 if packed_serves_one_row() else 3
    assert {kernel.min_rows for kernel in fused} | {m.packed_min_rows for m in packed} == {
        chosen}
    for kernel in fused:
        assert isinstance(kernel, FusedLinear)
        kernel.min_rows = min_rows
    for linear in packed:
        linear.packed_min_rows = min_rows
    assert generate(engine, [PROMPTS[1]], GREEDY)[0].token_ids == hf_greedy(hf, PROMPTS[1], 24)


def test_packed_weights_serve_single_rows_except_on_intel_cpus() -> None:
    from services.worker.engine.cpu_packing import packed_serves_one_row

    assert packed_serves_one_row("GenuineIntel") is False  # MKL's GEMV is faster there
    assert packed_serves_one_row("AuthenticAMD") is True
    assert packed_serves_one_row("unknown") is True


def test_background_packing_swaps_weights_while_requests_run(saved: SavedModel) -> None:
    from services.worker.engine.cpu_packing import BackgroundPacker
    folder, hf = saved
    engine = make_engine(folder, weight_packing="off")
    engine.add_request("r", PROMPTS[0], GREEDY)
    engine.step()
    packer = BackgroundPacker(engine.runners[0].model)
    tokens = run_to_end(engine)["r"]
    assert packer.wait(30)
    model = engine.runners[0].model
    assert packer.num_packed == len([m for m in model.modules() if isinstance(m, Linear)])
    assert is_packed(model)
    assert len(tokens) == 23  # the first token came from the step before the packer started
    assert generate(engine, [PROMPTS[0]], GREEDY)[0].token_ids == hf_greedy(hf, PROMPTS[0], 24)


def test_a_runner_loaded_with_packing_off_packs_when_asked(saved: SavedModel) -> None:
    """What a consolidating worker does for layers that loaded unpacked."""
    folder, hf = saved
    engine = make_engine(folder, weight_packing="off")
    model = engine.runners[0].model
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
    engine.runners[0].pack_weights()
    assert is_packed(model)
    assert generate(engine, [PROMPTS[2]], GREEDY)[0].token_ids == hf_greedy(hf, PROMPTS[2], 24)
