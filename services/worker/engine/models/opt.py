"""OPT checkpoints (facebook/opt-*): learned positions, LayerNorm, multi-head attention, ReLU MLP.

Two layouts share the code: pre-LN with a final LayerNorm (125m, 1.3b and up) and post-LN with
the word embeddings projected in and out of a narrower space (350m).
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
    StageInput,
    StageModel,
    hf_get,
)

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU, as HF's "gelu"
}
# OPT's learned position table starts at row 2 (a fairseq padding convention kept by HF).
POSITION_OFFSET = 2
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class OPTArgs:
    hidden_size: int
    ffn_dim: int
    num_heads: int
    head_dim: int
    vocab_size: int
    # width of the token embeddings and the LM head (350m: narrower than hidden_size)
    word_embed_proj_dim: int
    max_positions: int
    is_pre_norm: bool
    has_final_norm: bool
    has_bias: bool
    has_norm_affine: bool
    activation: str
    tie_word_embeddings: bool

    @property
    def has_projection(self) -> bool:
        return self.word_embed_proj_dim != self.hidden_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> OPTArgs:
        activation = str(hf_get(hf, "activation_function", default="relu"))
        if activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"OPT activation_function {activation!r} is not "
                                        f"supported; supported: {', '.join(ACTIVATIONS)}")
        hidden = int(hf["hidden_size"])
        num_heads = int(hf["num_attention_heads"])
        if hidden % num_heads:
            raise ModelFormatError(f"OPT hidden_size {hidden} is not divisible by "
                                   f"num_attention_heads {num_heads}")
        is_pre_norm = bool(hf_get(hf, "do_layer_norm_before", default=True))
        return cls(
            hidden_size=hidden,
            ffn_dim=int(hf["ffn_dim"]),
            num_heads=num_heads,
            head_dim=hidden // num_heads,
            vocab_size=int(hf["vocab_size"]),
            word_embed_proj_dim=int(hf_get(hf, "word_embed_proj_dim", default=hidden)),
            max_positions=int(hf_get(hf, "max_position_embeddings", default=2048)),
            is_pre_norm=is_pre_norm,
            # Checkpoints fine-tuned before transformers 4.20.1 set _remove_final_layer_norm.
            has_final_norm=is_pre_norm and not hf.get("_remove_final_layer_norm", False),
            has_bias=bool(hf_get(hf, "enable_bias", default=True)),
            has_norm_affine=bool(hf_get(hf, "layer_norm_elementwise_affine", default=True)),
            activation=activation,
            tie_word_embeddings=bool(hf_get(hf, "tie_word_embeddings", default=True)),
        )


def _layer_norm(args: OPTArgs) -> LayerNorm:
    return LayerNorm(args.hidden_size, eps=LAYER_NORM_EPS,
                        elementwise_affine=args.has_norm_affine)


class OPTAttention(nn.Module):
    def __init__(self, args: OPTArgs) -> None:
        super().__init__()
        self.args = args
        h = args.hidden_size
        self.q_proj = Linear(h, h, bias=args.has_bias)
        self.k_proj = Linear(h, h, bias=args.has_bias)
        self.v_proj = Linear(h, h, bias=args.has_bias)
        self.out_proj = Linear(h, h, bias=args.has_bias)
        self.scale = args.head_dim**-0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, k_cache: torch.Tensor,
                v_cache: torch.Tensor) -> torch.Tensor:
        num_tokens, num_heads, d = x.shape[0], self.args.num_heads, self.args.head_dim
        q = self.q_proj(x).view(num_tokens, num_heads, d)
        k = self.k_proj(x).view(num_tokens, num_heads, d)
        v = self.v_proj(x).view(num_tokens, num_heads, d)
        out = cached_attention(q, k, v, k_cache=k_cache, v_cache=v_cache, batch=batch,
                               scale=self.scale)  # [num_tokens, hidden]
        return self.out_proj(out)


class OPTDecoderLayer(nn.Module):
    # HF keeps fc1/fc2 on the layer itself (no MLP module), so this layer owns them too.
    def __init__(self, args: OPTArgs) -> None:
        super().__init__()
        self.is_pre_norm = args.is_pre_norm
        self.activation = ACTIVATIONS[args.activation]
        self.self_attn = OPTAttention(args)
        self.self_attn_layer_norm = _layer_norm(args)
        self.fc1 = Linear(args.hidden_size, args.ffn_dim, bias=args.has_bias)
        self.fc2 = Linear(args.ffn_dim, args.hidden_size, bias=args.has_bias)
        self.final_layer_norm = _layer_norm(args)
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        if self.is_pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), batch, self.k_cache,
                                   self.v_cache)
            return x + self.fc2(self.activation(self.fc1(self.final_layer_norm(x))))
        # opt-350m normalizes after each residual add instead
        x = self.self_attn_layer_norm(x + self.self_attn(x, batch, self.k_cache, self.v_cache))
        return self.final_layer_norm(x + self.fc2(self.activation(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, args: OPTArgs, stage: StageSpec) -> None:
        super().__init__()
        first, last = stage.is_first, stage.is_last
        self.embed_tokens = Embedding(args.vocab_size, args.word_embed_proj_dim) if first \
            else None
        self.embed_positions = Embedding(args.max_positions + POSITION_OFFSET,
                                            args.hidden_size) if first else None
        self.project_in = Linear(args.word_embed_proj_dim, args.hidden_size, bias=False) \
            if first and args.has_projection else None
        # A ModuleDict keyed by the global layer index keeps the HF name decoder.layers.{i}.
        self.layers = nn.ModuleDict({str(i): OPTDecoderLayer(args) for i in stage.layers})
        self.final_layer_norm = _layer_norm(args) if last and args.has_final_norm else None
        self.project_out = Linear(args.hidden_size, args.word_embed_proj_dim, bias=False) \
            if last and args.has_projection else None


class OPTModel(nn.Module):
    def __init__(self, args: OPTArgs, stage: StageSpec) -> None:
        super().__init__()
        self.decoder = OPTDecoder(args, stage)


class OPTForCausalLM(StageModel):
    family = "opt"
    embedding_weight = "model.decoder.embed_tokens.weight"

    def __init__(self, config: ModelConfig, stage: StageSpec) -> None:
        super().__init__(config, stage)
        self.args = OPTArgs.from_hf(config.hf_config)
        self.model = OPTModel(self.args, stage)
        self.lm_head = Linear(self.args.word_embed_proj_dim, self.args.vocab_size,
                                 bias=False) if stage.is_last else None

    def kv_cache_shape(self, dtype: torch.dtype) -> KVCacheShape:
        return KVCacheShape(len(self.model.decoder.layers), self.args.num_heads,
                            self.args.head_dim, dtype)

    def decoder_layers(self) -> list[nn.Module]:
        return list(self.model.decoder.layers.values())

    def forward(self, inputs: StageInput, batch: ForwardBatch) -> torch.Tensor:
        decoder = self.model.decoder
        if decoder.embed_tokens is not None:
            assert decoder.embed_positions is not None
            x = decoder.embed_tokens(inputs)  # [num_tokens, word_embed_proj_dim]
            if decoder.project_in is not None:
                x = decoder.project_in(x)
            x = x + decoder.embed_positions(batch.positions + POSITION_OFFSET)
        else:
            x = inputs  # [num_tokens, hidden]
        for layer in decoder.layers.values():
            x = layer(x, batch)
        if decoder.final_layer_norm is not None:
            x = decoder.final_layer_norm(x)
        if decoder.project_out is not None:
            x = decoder.project_out(x)  # [num_tokens, word_embed_proj_dim]
        return x  # [num_tokens, hidden]


    def checkpoint_name(self, name: str) -> str:
        # The facebook/opt-* checkpoints on the hub name their tensors without the "model." prefix.
        return f"model.{name}" if name.startswith("decoder.") else name
