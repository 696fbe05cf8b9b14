"""Write a small random Llama-family model in HF format, for demos and tests.

The folder has what a Hugging Face Llama checkpoint has, and nothing else: config.json,
model.safetensors (HF parameter names, random normal(0, 0.02) weights, RMSNorm weights 1),
a byte-level BPE tokenizer.json trained on the bundled corpus (special tokens <unk>=0, <s>=1,
</s>=2; the post-processor prepends <s>), tokenizer_config.json with a Llama-2 chat template,
and generation_config.json. Only torch, safetensors and tokenizers are used, and the same seed
gives the same bytes.

Sizes (vocab is what the BPE trainer reaches on the corpus, at most the target):
    tiny:  hidden 64, 2 layers, 4 heads (2 KV), MLP 172, vocab 1024  -> 222,016 parameters
    small: hidden 256, 4 layers, 8 heads (4 KV), MLP 688, vocab 4096 -> 4,999,424 parameters
    100m:  hidden 768, 12 layers, 12 heads (4 KV), MLP 2048; the corpus yields a vocab of 4697
           of the 32000 asked for -> 82,731,264 parameters (124.7 M at a 32000 vocab)

CLI: python -m services.worker.demo_model OUT_DIR [--size tiny|small|100m] [--seed N]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = Path(__file__).parent / "demo_data" / "corpus.txt"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BOS_ID, EOS_ID = 1, 2

# Llama-2's template: <s>[INST] ... [/INST] answer </s>, the system prompt inside the first turn.
CHAT_TEMPLATE = r"""{% if messages[0]['role'] == 'system' %}
    {% set system_message = '<<SYS>>\n' + messages[0]['content'] | trim + '\n<</SYS>>\n\n' %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set system_message = '' %}
    {% set loop_messages = messages %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/...') -}}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + (system_message if loop.first else '')
            + message['content'] | trim + ' [/INST]' -}}
    {% else %}
        {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
    {% endif %}
{% endfor %}
"""


@dataclass(frozen=True)
class DemoSize:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_vocab_size: int


SIZES: dict[str, DemoSize] = {
    "tiny": DemoSize(64, 2, 4, 2, 172, 1024),
    "small": DemoSize(256, 4, 8, 4, 688, 4096),
    "100m": DemoSize(768, 12, 12, 4, 2048, 32000),
}


def train_tokenizer(max_vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2/Llama-3 style) on the bundled corpus; deterministic."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max_vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    tokenizer.train_from_iterator(lines, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, BOS_ID, EOS_ID]
    return tokenizer


def random_weights(size: DemoSize, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """HF Llama parameter names, in a fixed order so the seed fixes every value."""
    generator = torch.Generator().manual_seed(seed)
    hidden, head_dim = size.hidden_size, size.hidden_size // size.num_heads
    kv_dim = size.num_kv_heads * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.02

    weights = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(size.num_layers):
        prefix = f"model.layers.{i}"
        weights |= {
            f"{prefix}.self_attn.q_proj.weight": normal(hidden, hidden),
            f"{prefix}.self_attn.k_proj.weight": normal(kv_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": normal(kv_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": normal(hidden, hidden),
            f"{prefix}.mlp.gate_proj.weight": normal(size.intermediate_size, hidden),
            f"{prefix}.mlp.up_proj.weight": normal(size.intermediate_size, hidden),
            f"{prefix}.mlp.down_proj.weight": normal(hidden, size.intermediate_size),
            f"{prefix}.input_layernorm.weight": torch.ones(hidden),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden),
        }
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(vocab_size, hidden)
    return weights


def model_config(size: DemoSize, vocab_size: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "float32",
        "vocab_size": vocab_size,
        "hidden_size": size.hidden_size,
        "intermediate_size": size.intermediate_size,
        "num_hidden_layers": size.num_layers,
        "num_attention_heads": size.num_heads,
        "num_key_value_heads": size.num_kv_heads,
        "head_dim": size.hidden_size // size.num_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
    }


def write_demo_model(out_dir: Path, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write the demo model folder at `out_dir` (created if missing) and return it."""
    if size not in SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose one of {sorted(SIZES)}")
    demo = SIZES[size]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(demo.max_vocab_size)
    vocab_size = tokenizer.get_vocab_size()
    tokenizer.save(str(out_dir / "tokenizer.json"))
    weights_path = out_dir / "model.safetensors"
    save_file(random_weights(demo, vocab_size, seed), str(weights_path), metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors creates the file 0600; other users read the store
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "unk_token": SPECIAL_TOKENS[0],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    files = {
        "config.json": model_config(demo, vocab_size),
        "tokenizer_config.json": tokenizer_config,
        "generation_config.json": {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID},
    }
    for name, content in files.items():
        text = json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir


def count_parameters(size: str, vocab_size: int) -> int:
    demo = SIZES[size]
    kv_dim = demo.num_kv_heads * (demo.hidden_size // demo.num_heads)
    attention = 2 * demo.hidden_size * (demo.hidden_size + kv_dim)
    per_layer = attention + 3 * demo.hidden_size * demo.intermediate_size + 2 * demo.hidden_size
    return demo.num_layers * per_layer + (2 * vocab_size + 1) * demo.hidden_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.worker.demo_model",
        description="Write a random Llama-family model folder in Hugging Face format.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_demo_model(args.out_dir, seed=args.seed, size=args.size)
    vocab_size = json.loads((path / "config.json").read_text(encoding="utf-8"))["vocab_size"]
    print(f"wrote {args.size} demo model to {path}: "
          f"{count_parameters(args.size, vocab_size):,} parameters, vocab size {vocab_size}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
