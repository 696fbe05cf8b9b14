"""Llama-2, Llama-3 and Llama-architecture checkpoints (Mistral): RMSNorm, rotary, GQA, SwiGLU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.engine.attention import ForwardBatch, cached_attention
from services.worker.engine.config import ModelConfig, StageSpec
from services.worker.engine.errors import UnsupportedModelError
from services.worker.engine.kv_cache import KVCacheShape
from services.worker.engine.models.base import (
    Embedding,
    FusedLinear,
    FusionGroup,
    Linear,
    RMSNorm,
    Rotary,
    StageInput,
    StageModel,
    hf_get,
)


@dataclass(frozen=True)
class LlamaArgs:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaArgs:
        if hf.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"Llama hidden_act {hf['hidden_act']!r} is not supported")
        hidden = int(hf["hidden_size"])
        num_heads = int(hf["num_attention_heads"])
        return cls(
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_heads=num_heads,
            num_kv_heads=int(hf_get(hf, "num_key_value_heads", default=num_heads)),
            head_dim=int(hf_get(hf, "head_dim", default=hidden // num_heads)),
            vocab_size=int(hf["vocab_size"]),
            rms_norm_eps=float(hf_get(hf, "rms_norm_eps", default=1e-6)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: Rotary) -> None:
        super().__init__()
        self.args = args
        self.rotary = rotary
        h, d = args.hidden_size, args.head_dim
        self.q_proj = Linear(h, args.num_heads * d, bias=args.attention_bias)
        self.k_proj = Linear(h, args.num_kv_heads * d, bias=args.attention_bias)
        self.v_proj = Linear(h, args.num_kv_heads * d, bias=args.attention_bias)
        self.o_proj = Linear(args.num_heads * d, h, bias=args.attention_bias)
        self.scale = d**-0.5
        self.qkv: FusedLinear | None = None

    def forward(self, x: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        num_tokens, d = x.shape[0], self.args.head_dim
        num_heads, num_kv_heads = self.args.num_heads, self.args.num_kv_heads
        if self.qkv is not None and self.qkv.serves(x):
            # q and k sit side by side in the fused output: rotate them as one tensor
            qkv = self.qkv.joined(x)  # [T, (H + 2 * Hkv) * D]
            qk = self.rotary.rotate(qkv[:, :(num_heads + num_kv_heads) * d]
                                    .view(num_tokens, num_heads + num_kv_heads, d),
                                    batch.positions)
            q, k = qk[:, :num_heads], qk[:, num_heads:]
            v = qkv[:, (num_heads + num_kv_heads) * d:].view(num_tokens, num_kv_heads, d)
        else:
            q = self.q_proj(x).view(num_tokens, num_heads, d)
            k = self.k_proj(x).view(num_tokens, num_kv_heads, d)
            v = self.v_proj(x).view(num_tokens, num_kv_heads, d)
            q, k = self.rotary.apply(q, k, batch.positions)
        out = cached_attention(q, k, v, k_cache=k_cache, v_cache=v_cache, batch=batch,
                               scale=self.scale)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        h, i = args.hidden_size, args.intermediate_size
        self.gate_proj = Linear(h, i, bias=args.mlp_bias)
        self.up_proj = Linear(h, i, bias=args.mlp_bias)
        self.down_proj = Linear(i, h, bias=args.mlp_bias)
        self.gate_up: FusedLinear | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and self.gate_up.serves(x):
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate).mul_(up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: Rotary) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, rotary)
        self.mlp = LlamaMLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, self.k_cache, self.v_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, args: LlamaArgs, stage: StageSpec, rotary: Rotary) -> None:
        super().__init__()
        self.embed_tokens = Embedding(args.vocab_size, args.hidden_size) if stage.is_first \
            else None
        # A ModuleDict keyed by the global layer index keeps the HF name model.layers.{i}.
        self.layers = nn.ModuleDict(
            {str(i): LlamaDecoderLayer(args, rotary) for i in stage.layers}
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if stage.is_last else None


class LlamaForCausalLM(StageModel):
    family = "llama"
    embedding_weight = "model.embed_tokens.weight"

    def __init__(self, config: ModelConfig, stage: StageSpec) -> None:
        super().__init__(config, stage)
        self.args = LlamaArgs.from_hf(config.hf_config)
        self.rotary = Rotary(config.hf_config, head_dim=self.args.head_dim)
        self.model = LlamaModel(self.args, stage, self.rotary)
        self.lm_head = Linear(self.args.hidden_size, self.args.vocab_size, bias=False) \
            if stage.is_last else None

    def fusion_groups(self) -> list[FusionGroup]:
        groups: list[FusionGroup] = []
        for layer in self.model.layers.values():
            attn, mlp = layer.self_attn, layer.mlp
            groups.append((attn, "qkv", [attn.q_proj, attn.k_proj, attn.v_proj]))
            groups.append((mlp, "gate_up", [mlp.gate_proj, mlp.up_proj]))
        return groups

    def kv_cache_shape(self, dtype: torch.dtype) -> KVCacheShape:
        return KVCacheShape(len(self.model.layers), self.args.num_kv_heads, self.args.head_dim,
                            dtype)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.layers.values())

    def forward(self, inputs: StageInput, batch: ForwardBatch) -> torch.Tensor:
        x = self.model.embed_tokens(inputs) if self.model.embed_tokens is not None else inputs
        for layer in self.model.layers.values():
            x = layer(x, batch)
        if self.model.norm is not None:
            x = self.model.norm(x)
        return x  # [num_tokens, hidden]
