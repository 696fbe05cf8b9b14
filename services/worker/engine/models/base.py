"""What every model family implements, and the layers they share.

A family module defines `XForCausalLM(StageModel)`, built for decoder layers
[stage.start_layer, stage.end_layer) on the `meta` device. Parameters keep the Hugging Face
names, so a checkpoint tensor loads into the parameter of the same name; the loader asks the
model which checkpoint tensors it owns (`weight_targets`) and assigns them (no second copy).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.engine.attention import ForwardBatch
from services.worker.engine.config import ModelConfig, StageSpec
from services.worker.engine.errors import ModelFormatError, UnsupportedModelError
from services.worker.engine.kv_cache import KVCache, KVCacheShape

# What flows between stages: the hidden states [num_tokens, hidden] (first stage: token ids).
StageInput = torch.Tensor


class StageModel(nn.Module):
    family: ClassVar[str]
    # checkpoint name of the token embedding (tied checkpoints reuse it as the LM head)
    embedding_weight: ClassVar[str]
    # the last stage's LM head; families with rotary embeddings set `rotary`
    lm_head: nn.Module | None
    rotary: Rotary | None = None
    # the family's parsed config (every family's has tie_word_embeddings)
    args: Any

    def __init__(self, config: ModelConfig, stage: StageSpec) -> None:
        super().__init__()
        self.config = config
        self.stage = stage

    # --- what a family provides -----------------------------------------------------------
    def kv_cache_shape(self, dtype: torch.dtype) -> KVCacheShape:
        raise NotImplementedError

    def forward(self, inputs: StageInput, batch: ForwardBatch) -> torch.Tensor:
        """First stage: token ids [T]; others: hidden [T, hidden]. Returns hidden [T, hidden]."""
        raise NotImplementedError

    def checkpoint_name(self, name: str) -> str:
        """The canonical name of a checkpoint tensor (families fix naming quirks here)."""
        return name

    def fusion_groups(self) -> list[FusionGroup]:
        """Linears sharing an input that CPU packing may fuse into one GEMM."""
        return []

    # --- shared by the families -------------------------------------------------------------
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage only: hidden [N, hidden] -> logits [N, vocab] in float32."""
        assert self.lm_head is not None, "only the last stage computes logits"
        return self.lm_head(hidden).float()

    def weight_targets(self) -> dict[str, list[str]]:
        """Checkpoint tensor name -> the parameters it fills (tied embeddings fill two)."""
        targets = {name: [name] for name, _ in self.named_parameters()}
        if self.lm_head is not None and self.args.tie_word_embeddings:
            # Tied checkpoints store only the embedding; the last stage uses it as its LM head.
            del targets["lm_head.weight"]
            targets.setdefault(self.embedding_weight, []).append("lm_head.weight")
        return targets

    def init_buffers(self, device: torch.device, max_positions: int) -> None:
        """Create the non-checkpoint buffers (rotary tables) on the real device."""
        if self.rotary is not None:
            dtype = next(p.dtype for p in self.parameters() if not p.is_meta)
            self.rotary.build(device, dtype, max_positions)

    # --- shared machinery -------------------------------------------------------------------
    def bind_kv_cache(self, cache: KVCache) -> None:
        for local, layer in enumerate(self.decoder_layers()):
            layer.k_cache = cache.k[local]
            layer.v_cache = cache.v[local]

    def decoder_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def set_weight(self, param_name: str, tensor: torch.Tensor) -> None:
        """Replace a (meta) parameter with a loaded tensor, checking its shape."""
        *path, leaf = param_name.split(".")
        module: nn.Module = self
        for part in path:
            module = getattr(module, part)
        current = getattr(module, leaf)
        if tuple(current.shape) != tuple(tensor.shape):
            raise ModelFormatError(
                f"checkpoint tensor for {param_name} has shape {tuple(tensor.shape)}, "
                f"the model config says {tuple(current.shape)}"
            )
        setattr(module, leaf, nn.Parameter(tensor, requires_grad=False))

    def meta_parameters(self) -> list[str]:
        return [name for name, p in self.named_parameters() if p.is_meta]


# Below this many rows the plain weight serves even when a packed one exists, unless packed
# weights serve single rows on this CPU (cpu_packing.packed_serves_one_row): on an
# AVX-512 Xeon MKL's GEMV streamed the weights ~12% faster than oneDNN's packed kernel at 1-2
# rows, on an AVX-512 AMD EPYC (where MKL takes a generic path) 1.7x slower; from 4 rows on the
# packed kernel wins everywhere measured (at 16 rows by ~1.4-2x).
PACKED_MIN_ROWS = 3


class Linear(nn.Linear):
    """nn.Linear whose weight may also be held pre-blocked for the CPU GEMM kernel
    (see engine/cpu_packing.py); the HF parameter name stays `weight`."""

    packed: torch.Tensor | None = None
    # fewest rows of input the packed weight serves
    packed_min_rows: int = PACKED_MIN_ROWS

    def reset_parameters(self) -> None:
        """No random init: weights come from the checkpoint (see `Embedding`)."""

    def uses_packed(self, x: torch.Tensor) -> bool:
        return self.packed is not None and x.shape[0] >= self.packed_min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_packed(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding without random init. Initialising a `meta` tensor runs torch's Python
    reference ops, whose first use imports torch._dynamo: seconds of a cold start for nothing."""

    def reset_parameters(self) -> None:
        pass


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm without init (see `Embedding`)."""

    def reset_parameters(self) -> None:
        pass


class FusedLinear:
    """Linears over the same input run as one packed GEMM (set by engine/cpu_packing.py):
    at decode's few rows one wide GEMM streams the weights better than several narrow ones."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None,
                 split_sizes: list[int]) -> None:
        self.packed = packed
        self.bias = bias
        self.split_sizes = split_sizes
        # fewest rows of input it serves (fewer: the separate linears' plain weights)
        self.min_rows = PACKED_MIN_ROWS

    def serves(self, x: torch.Tensor) -> bool:
        return x.shape[0] >= self.min_rows

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.split_sizes, dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side, [num_tokens, sum(split_sizes)]."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


# (module that owns the fused attribute, attribute name, the linears it replaces)
FusionGroup = tuple[nn.Module, str, list[Linear]]


def hf_get(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of `keys` present in an HF config (names changed across versions)."""
    for key in keys:
        if key in hf and hf[key] is not None:
            return hf[key]
    return default


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # HF's products, (x * rsqrt(mean(x * x) + eps)) * weight, in five ops and two
        # temporaries: F.rms_norm on the CPU is a composite of ~10 ops with two copies of x
        # (28 us against 13 us at [16, 768]), bit for bit the same result
        return (x * (x * x).mean(-1, keepdim=True).add_(eps).rsqrt_()).mul_(weight)
    # HF computes the norm in float32 and scales in the input dtype.
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return weight * normed


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rotary:
    """Rotary position embedding tables (rotate-half layout, as HF checkpoints use)."""

    def __init__(self, hf: dict[str, Any], *, head_dim: int) -> None:
        rope = hf.get("rope_parameters") or {}
        scaling = hf.get("rope_scaling") or rope
        self.theta = float(hf_get(rope, "rope_theta", default=hf.get("rope_theta", 10000.0)))
        self.rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
        if self.rope_type not in ("default", "linear", "llama3"):
            raise UnsupportedModelError(f"rope scaling type {self.rope_type!r} is not supported")
        self.scaling = scaling
        self.head_dim = head_dim
        self.cos = torch.empty(0)
        self.sin = torch.empty(0)
        # sin with its first half negated: rotate_half(x) * sin == swap_halves(x) * signed_sin
        self.signed_sin = torch.empty(0)
        # the last forward's positions and their [T, 1, D] rows of cos and signed_sin: every
        # layer of a forward rotates at the same positions
        self._positions: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, torch.Tensor] = (self.cos, self.sin)

    def inv_freq(self) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponents)
        if self.rope_type == "linear":
            return inv_freq / float(self.scaling["factor"])
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, self.scaling)
        return inv_freq

    def build(self, device: torch.device, dtype: torch.dtype, max_positions: int) -> None:
        """Tables for positions [0, max_positions) — the engine's sequence length, not the
        model's maximum (a Llama-3 table for 131072 positions would be 64 MB per table)."""
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        half = self.head_dim // 2
        self.signed_sin = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)
        self._positions = None

    def rows(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin at `positions` [T], each [T, 1, D]; gathered once per forward."""
        if positions is not self._positions:
            self._rows = (self.cos[positions][:, None, :], self.signed_sin[positions][:, None, :])
            self._positions = positions
        return self._rows

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] (any heads: q and k side by side work too) rotated at `positions`.

        x * cos + rotate_half(x) * sin, as HF computes it, in four ops:
        rotate_half(x) * sin = swap_halves(x) * signed_sin, the same products (negation is
        exact)."""
        cos, signed_sin = self.rows(positions)
        num_tokens, num_heads, head_dim = x.shape
        swapped = x.view(num_tokens, num_heads, 2, head_dim // 2).flip(-2).view(x.shape)
        swapped.mul_(signed_sin)
        return (x * cos).add_(swapped)

    def apply(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D] rotated at `positions` [T]."""
        return self.rotate(q, positions), self.rotate(k, positions)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
