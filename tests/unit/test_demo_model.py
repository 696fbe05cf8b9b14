"""The demo model writer: a complete, deterministic HF Llama folder without transformers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.worker.demo_model import (
    count_parameters,
    main,
    train_tokenizer,
    write_demo_model,
)
from services.worker.engine.tokenizer import Tokenizer

pytestmark = pytest.mark.unit

transformers = pytest.importorskip("transformers")

LAYER_PARAMS = [
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "tiny", seed=0)


def _json(path: Path) -> dict[str, object]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_folder_holds_exactly_the_hf_model_files(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]


def test_tiny_config_has_the_documented_llama_sizes(tiny: Path) -> None:
    config = _json(tiny / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["model_type"], config["torch_dtype"]) == ("llama", "float32")
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (64, 2, 4, 2, 172)
    assert config["vocab_size"] == Tokenizer.from_model_dir(tiny).vocab_size == 1024
    assert _json(tiny / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": 2}


def test_weights_carry_exactly_the_hf_llama_names_and_shapes(tiny: Path) -> None:
    weights = load_file(tiny / "model.safetensors")
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} | {
        f"model.layers.{i}.{name}" for i in range(2) for name in LAYER_PARAMS}
    assert set(weights) == expected
    assert weights["model.embed_tokens.weight"].shape == (1024, 64)
    assert weights["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    assert weights["model.layers.0.mlp.down_proj.weight"].shape == (64, 172)
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_norm_weights_are_one_and_the_rest_are_normal_with_std_002(tiny: Path) -> None:
    weights = load_file(tiny / "model.safetensors")
    norms = [w for name, w in weights.items() if "norm" in name]
    assert len(norms) == 5
    assert all(torch.equal(w, torch.ones(64)) for w in norms)
    others = torch.cat([w.flatten() for name, w in weights.items() if "norm" not in name])
    assert abs(others.std().item() - 0.02) < 0.001
    assert abs(others.mean().item()) < 0.001


def test_parameter_count_is_the_sum_of_the_tensors(tiny: Path) -> None:
    weights = load_file(tiny / "model.safetensors")
    assert count_parameters("tiny", 1024) == sum(w.numel() for w in weights.values()) == 222_016


def test_same_seed_writes_identical_bytes_and_another_seed_other_weights(
        tiny: Path, tmp_path: Path) -> None:
    again = write_demo_model(tmp_path / "again", seed=0)
    other = write_demo_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_transformers_loads_the_model_with_no_missing_or_unexpected_keys(tiny: Path) -> None:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tiny, output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {k: sorted(v) for k, v in info.items()} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    weights = load_file(tiny / "model.safetensors")
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])
    assert model.config.rope_parameters["rope_theta"] == 10000.0


def test_transformers_loads_the_tokenizer_and_agrees_with_ours(tiny: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(tiny)
    ours = Tokenizer.from_model_dir(tiny)
    text = "The keeper's logbook: 03:10, café naïve 東京 🐈"
    assert hf(text)["input_ids"] == ours.encode(text)
    assert ours.encode(text)[0] == 1
    assert ours.decode(ours.encode(text)) == text
    assert (hf.bos_token, hf.eos_token, hf.unk_token) == ("<s>", "</s>", "<unk>")


def test_chat_template_is_llama2_style_with_the_bos_token(tiny: Path) -> None:
    ours = Tokenizer.from_model_dir(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert ours.apply_chat_template(messages) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] Bye [/INST]")


def test_tokenizer_training_for_tiny_takes_under_five_seconds() -> None:
    start = time.perf_counter()
    tokenizer = train_tokenizer(1024)
    assert time.perf_counter() - start < 5.0
    assert tokenizer.get_vocab_size() == 1024


def test_unknown_size_is_rejected_with_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown demo model size 'huge'; choose one of"):
        write_demo_model(tmp_path, size="huge")


def test_cli_prints_path_parameter_count_and_vocab_size(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli"), "--seed", "3"]) == 0
    assert capsys.readouterr().out == (
        f"wrote tiny demo model to {tmp_path / 'cli'}: 222,016 parameters, vocab size 1024\n")
