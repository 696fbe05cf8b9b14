"""The KV cache of one engine (one stage): a fixed number of sequence slots per layer.

Every running sequence owns one slot; slot s of layer l holds its keys and values for positions
[0, max_len). Keys and values share one layout, [slots, kv_heads, max_len, head_dim], so the
L positions a decode step reads of one (slot, head) are one contiguous block (see
docs/ENGINE.md: keys stored [.., head_dim, max_len] read L floats out of every row and ran
slower from DRAM). The scheduler keeps the running sequences in slots 0..n-1 (it moves the
last sequence into a freed slot), so a decode step reads `k[:n, :, :L]` and `v[:n, :, :L]`,
views, never a gather.
On the CPU the tensors come from `torch.empty`, so untouched slots cost no resident memory
(beyond the 2 MB page a touched slot's block shares with its neighbour; engine/hugepages.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.engine.errors import ContextLengthError
from services.worker.engine.hugepages import advise_tensor

# make_readable zeroes ahead to a multiple of this many positions
READABLE_CHUNK = 64


@dataclass(frozen=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element_size = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size


@dataclass(frozen=True)
class KVCacheBudget:
    num_slots: int
    max_len: int


def plan_kv_cache(
    shape: KVCacheShape, *, max_num_seqs: int, max_model_len: int, kv_cache_bytes: int | None
) -> KVCacheBudget:
    """How many sequences of how many tokens fit in `kv_cache_bytes` (None: no limit)."""
    if kv_cache_bytes is None:
        return KVCacheBudget(num_slots=max_num_seqs, max_len=max_model_len)
    budget_tokens = kv_cache_bytes // shape.bytes_per_token
    if budget_tokens < 2:
        raise ContextLengthError(
            f"a KV cache budget of {kv_cache_bytes} bytes holds {budget_tokens} tokens "
            f"at {shape.bytes_per_token} bytes per token; at least 2 are needed"
        )
    if budget_tokens < max_model_len:
        return KVCacheBudget(num_slots=1, max_len=budget_tokens)
    return KVCacheBudget(num_slots=min(max_num_seqs, budget_tokens // max_model_len),
                         max_len=max_model_len)


class KVCache:
    """Per layer: keys and values, each [num_slots, num_kv_heads, max_len, head_dim]."""

    def __init__(self, shape: KVCacheShape, budget: KVCacheBudget, device: torch.device) -> None:
        self.shape = shape
        self.num_slots = budget.num_slots
        self.max_len = budget.max_len
        dims = (budget.num_slots, shape.num_kv_heads, budget.max_len, shape.head_dim)
        self.k = [torch.empty(dims, dtype=shape.dtype, device=device)
                  for _ in range(shape.num_layers)]
        self.v = [torch.empty(dims, dtype=shape.dtype, device=device)
                  for _ in range(shape.num_layers)]
        for tensor in self._tensors():
            advise_tensor(tensor)  # CPU: fault in as 2 MB pages (engine/hugepages.py)
        # slot -> positions [0, n) of its values that hold finite numbers
        self._readable = [0] * budget.num_slots

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        """Every layer's keys, then every layer's values (all the same layout)."""
        return (*self.k, *self.v)

    def make_readable(self, slot_ids: list[int], written: list[int], length: int) -> None:
        """Make positions [0, length) of the slots safe to read in a decode step.

        A decode step reads up to the batch's longest sequence, so a shorter one reads positions
        past the `written` ones; their attention weight is 0, but 0 * NaN is NaN, and `empty`
        memory may hold NaN. So each slot's keys and values are zeroed once, past what its
        sequence wrote, up to the furthest position a step has read (keys too: decode adds
        a -inf mask to the scores, and NaN + -inf is NaN). Positions [0, readable) stay
        finite from then on.

        The zeroing runs ahead to a multiple of READABLE_CHUNK positions: a batch's longest
        sequence grows by one each step, and zeroing one position per shorter slot per layer
        per step was hundreds of tiny ops a step.
        """
        chunked = min(self.max_len, -(-length // READABLE_CHUNK) * READABLE_CHUNK)
        for slot, num_written in zip(slot_ids, written, strict=True):
            if self._readable[slot] >= length:
                continue
            start = max(self._readable[slot], num_written)
            if start < chunked:
                for tensor in self._tensors():
                    tensor[slot, :, start:chunked].zero_()
            self._readable[slot] = max(self._readable[slot], chunked)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot `src` into slot `dst` in every layer."""
        for tensor in self._tensors():
            tensor[dst, :, :length].copy_(tensor[src, :, :length])

    def export_slot(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of a slot's keys and values, each [num_layers, kv_heads, length, head_dim]."""
        keys = torch.stack([k[slot, :, :length] for k in self.k]).cpu()
        values = torch.stack([v[slot, :, :length] for v in self.v]).cpu()
        return keys, values

    def import_slot(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write exported keys and values ([num_layers, kv_heads, length, head_dim]) into a slot."""
        expected = (self.shape.num_layers, self.shape.num_kv_heads)
        if tuple(keys.shape[:2]) != expected or keys.shape != values.shape:
            raise ValueError(
                f"KV of shape {tuple(keys.shape)} does not fit a cache of "
                f"{expected[0]} layers x {expected[1]} KV heads"
            )
        length = keys.shape[2]
        if length > self.max_len:
            raise ContextLengthError(
                f"imported sequence holds {length} tokens; slots hold {self.max_len}"
            )
        for tensor, imported in zip(self._tensors(), (*keys, *values), strict=True):
            tensor[slot, :, :length].copy_(imported)
