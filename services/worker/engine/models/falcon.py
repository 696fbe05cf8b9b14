"""Falcon checkpoints (tiiuae/falcon-*): rotary, fused QKV, LayerNorm, GELU MLP.

Three layouts share the code: Falcon-7B (multi-query attention, attention and MLP in parallel
from one LayerNorm), Falcon-40B/180B (`new_decoder_architecture`: grouped KV heads, separate
LayerNorms for attention and MLP) and the plain sequential multi-head block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.engine.attention import ForwardBatch, cached_attention
from services.worker.engine.config import ModelConfig, StageSpec
from services.worker.engine.errors import ModelFormatError, UnsupportedModelError
from services.worker.engine.kv_cache import KVCacheShape
from services.worker.engine.models.base import (
    Embedding,
    LayerNorm,
    Linear,
    Rotary,
    StageInput,
    StageModel,
    hf_get,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, as HF's "gelu"
    "relu": F.relu,
}


@dataclass(frozen=True)
class FalconArgs:
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_norm_eps: float
    has_bias: bool
    # attention and MLP both read the layer input and their outputs are summed
    is_parallel: bool
    # separate LayerNorms before attention (ln_attn) and MLP (ln_mlp)
    has_two_norms: bool
    activation: str
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> FalconArgs:
        if hf_get(hf, "alibi", default=False):
            raise UnsupportedModelError("Falcon with alibi=True (ALiBi position biases) is not "
                                        "supported; only rotary Falcon checkpoints run")
        if hf_get(hf, "apply_residual_connection_post_layernorm", default=False):
            raise UnsupportedModelError("Falcon with apply_residual_connection_post_layernorm="
                                        "True is not supported")
        activation = str(hf_get(hf, "activation", default="gelu"))
        if activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"Falcon activation {activation!r} is not supported; "
                                        f"supported: {', '.join(ACTIVATIONS)}")
        # Custom-code configs ("RefinedWeb", "RefinedWebModel") use the old key names and have
        # no new_decoder_architecture flag: n_head_kv marks the Falcon-40B layout.
        hidden = int(hf_get(hf, "hidden_size", "n_embed"))
        num_heads = int(hf_get(hf, "num_attention_heads", "n_head"))
        is_new = bool(hf_get(hf, "new_decoder_architecture", default="n_head_kv" in hf))
        if is_new:
            num_kv_heads = int(hf_get(hf, "num_kv_heads", "n_head_kv", default=num_heads))
        elif hf_get(hf, "multi_query", default=True):
            num_kv_heads = 1
        else:
            num_kv_heads = num_heads
        if hidden % num_heads or num_heads % num_kv_heads:
            raise ModelFormatError(f"Falcon hidden_size {hidden}, {num_heads} heads and "
                                   f"{num_kv_heads} KV heads do not divide evenly")
        # The new architecture is always parallel (HF ignores parallel_attn there); only it
        # reads num_ln_in_parallel_attn, which defaults to 2 (Falcon2-11B sets 1).
        num_norms = int(hf_get(hf, "num_ln_in_parallel_attn", default=2 if is_new else 1))
        return cls(
            hidden_size=hidden,
            ffn_hidden_size=int(hf_get(hf, "ffn_hidden_size", default=4 * hidden)),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=hidden // num_heads,
            vocab_size=int(hf["vocab_size"]),
            layer_norm_eps=float(hf_get(hf, "layer_norm_epsilon", default=1e-5)),
            has_bias=bool(hf_get(hf, "bias", default=False)),
            is_parallel=is_new or bool(hf_get(hf, "parallel_attn", default=True)),
            has_two_norms=is_new and num_norms == 2,
            activation=activation,
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=True)),
        )


class FalconLinear(Linear):
    """Matmul, then bias as a separate op: Falcon was trained (in bfloat16) without the fused
    add, and HF keeps the extra rounding step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_packed(x):
            out = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        else:
            out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class FalconAttention(nn.Module):
    def __init__(self, args: FalconArgs, rotary: Rotary) -> None:
        super().__init__()
        self.args = args
        self.rotary = rotary
        h, d = args.hidden_size, args.head_dim
        qkv_size = (args.num_heads + 2 * args.num_kv_heads) * d
        self.query_key_value = FalconLinear(h, qkv_size, bias=args.has_bias)
        self.dense = FalconLinear(h, h, bias=args.has_bias)
        self.scale = d**-0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        args = self.args
        num_tokens, d = x.shape[0], args.head_dim
        group = args.num_heads // args.num_kv_heads
        # Every variant fuses QKV grouped by KV head: the group's query heads, then its key and
        # its value (multi-query: a single group; plain multi-head: one query head per group).
        qkv = self.query_key_value(x).view(num_tokens, args.num_kv_heads, group + 2, d)
        q = qkv[:, :, :group].reshape(num_tokens, args.num_heads, d)
        k = qkv[:, :, group]  # [num_tokens, num_kv_heads, head_dim]
        v = qkv[:, :, group + 1]
        q, k = self.rotary.apply(q, k, batch.positions)
        out = cached_attention(q, k, v, k_cache=k_cache, v_cache=v_cache, batch=batch,
                               scale=self.scale)  # [num_tokens, hidden]
        return self.dense(out)


class FalconMLP(nn.Module):
    def __init__(self, args: FalconArgs) -> None:
        super().__init__()
        self.dense_h_to_4h = FalconLinear(args.hidden_size, args.ffn_hidden_size,
                                          bias=args.has_bias)
        self.dense_4h_to_h = FalconLinear(args.ffn_hidden_size, args.hidden_size,
                                          bias=args.has_bias)
        self.activation = ACTIVATIONS[args.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.activation(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, args: FalconArgs, rotary: Rotary) -> None:
        super().__init__()
        self.is_parallel = args.is_parallel
        self.self_attention = FalconAttention(args, rotary)
        self.mlp = FalconMLP(args)
        h, eps = args.hidden_size, args.layer_norm_eps
        self.ln_attn = LayerNorm(h, eps=eps) if args.has_two_norms else None
        self.ln_mlp = LayerNorm(h, eps=eps) if args.has_two_norms else None
        self.input_layernorm = None if args.has_two_norms else LayerNorm(h, eps=eps)
        self.post_attention_layernorm = None if args.is_parallel else LayerNorm(h, eps=eps)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.ln_attn is not None and self.ln_mlp is not None:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            assert self.input_layernorm is not None
            attn_in = mlp_in = self.input_layernorm(x)
        attn_out = self.self_attention(attn_in, batch, self.k_cache, self.v_cache)
        if self.is_parallel:
            return x + (self.mlp(mlp_in) + attn_out)
        assert self.post_attention_layernorm is not None
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x))


class FalconModel(nn.Module):
    def __init__(self, args: FalconArgs, stage: StageSpec, rotary: Rotary) -> None:
        super().__init__()
        self.word_embeddings = Embedding(args.vocab_size, args.hidden_size) \
            if stage.is_first else None
        # A ModuleDict keyed by the global layer index keeps the HF name transformer.h.{i}.
        self.h = nn.ModuleDict({str(i): FalconDecoderLayer(args, rotary) for i in stage.layers})
        self.ln_f = LayerNorm(args.hidden_size, eps=args.layer_norm_eps) \
            if stage.is_last else None


class FalconForCausalLM(StageModel):
    family = "falcon"
    embedding_weight = "transformer.word_embeddings.weight"

    def __init__(self, config: ModelConfig, stage: StageSpec) -> None:
        super().__init__(config, stage)
        self.args = FalconArgs.from_hf(config.hf_config)
        self.rotary = Rotary(config.hf_config, head_dim=self.args.head_dim)
        self.transformer = FalconModel(self.args, stage, self.rotary)
        self.lm_head = Linear(self.args.hidden_size, self.args.vocab_size, bias=False) \
            if stage.is_last else None

    def kv_cache_shape(self, dtype: torch.dtype) -> KVCacheShape:
        return KVCacheShape(len(self.transformer.h), self.args.num_kv_heads, self.args.head_dim,
                            dtype)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.transformer.h.values())

    def forward(self, inputs: StageInput, batch: ForwardBatch) -> torch.Tensor:
        embeddings = self.transformer.word_embeddings
        x = embeddings(inputs) if embeddings is not None else inputs
        for layer in self.transformer.h.values():
            x = layer(x, batch)
        if self.transformer.ln_f is not None:
            x = self.transformer.ln_f(x)
        return x  # [num_tokens, hidden]
