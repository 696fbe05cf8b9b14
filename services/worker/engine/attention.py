"""Attention over the slot KV cache, shared by every model family.

A forward pass packs the tokens of all its sequences into one [num_tokens, ...] tensor.
`ForwardBatch` says which sequence each run of tokens belongs to, which cache slot it owns
and how many of its tokens are already cached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DecodeChunk:
    """Sequences [start, end) of a decode batch, attended together over keys [0, kv_len)."""

    start: int
    end: int
    kv_len: int


# What a chunk of its own costs, in (sequence, key) pairs read: a decode attention reads every
# sequence of a chunk up to the chunk's longest, at ~0.17 us a pair (16 sequences x 4 KV heads
# x 64 dims, AMD EPYC), and each chunk adds three ops (~45 us) a layer.
CHUNK_COST_PAIRS = 256


def plan_decode_chunks(kv_lens: list[int], max_chunks: int = 3) -> list[DecodeChunk]:
    """Split a decode batch into runs of neighbouring sequences, each attended over its own
    longest context instead of the batch's, where that saves more than a chunk costs.

    One batch-wide bmm reads every sequence up to the longest one: with contexts of 32-384
    tokens over a third of it is padding. The scheduler gives a prefill's sequences their
    slots longest first, so neighbours are alike; the split points are found greedily (the
    best two-way split, then the best split of the costlier part)."""
    chunks = [(0, len(kv_lens))]
    while len(chunks) < max_chunks:
        costs = [(end - start) * max(kv_lens[start:end]) for start, end in chunks]
        index = max(range(len(chunks)), key=costs.__getitem__)
        start, end = chunks[index]
        split = _best_split(kv_lens, start, end)
        if split is None:
            break
        chunks[index:index + 1] = [(start, split), (split, end)]
    return [DecodeChunk(start, end, max(kv_lens[start:end])) for start, end in chunks]


def _best_split(kv_lens: list[int], start: int, end: int) -> int | None:
    """The split of [start, end) into two runs that reads the fewest pairs, if it saves more
    than a chunk costs."""
    prefix_max, longest = [], 0
    for n in kv_lens[start:end]:
        longest = max(longest, n)
        prefix_max.append(longest)
    best_cost, best_split = (end - start) * longest - CHUNK_COST_PAIRS, None
    suffix_max = 0
    for split in range(end - 1, start, -1):
        suffix_max = max(suffix_max, kv_lens[split])
        cost = (split - start) * prefix_max[split - start - 1] + (end - split) * suffix_max
        if cost < best_cost:
            best_cost, best_split = cost, split
    return best_split


@dataclass
class ForwardBatch:
    is_prefill: bool
    # cache slot of each sequence
    slot_ids: list[int]
    # tokens of each sequence already in the cache before this forward
    context_lens: list[int]
    # tokens of each sequence in this forward (decode: all 1)
    query_lens: list[int]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # [num_tokens] position of every token
    positions: torch.Tensor = field(init=False)
    # decode only: [num_seqs] slots and cached lengths, [num_seqs, 1, 1, max_len] valid keys
    slot_tensor: torch.Tensor = field(init=False)
    context_tensor: torch.Tensor = field(init=False)
    decode_mask: torch.Tensor | None = field(init=False, default=None)
    # decode only: (chunk, kv_heads, group, dtype) -> the chunk's [seqs * kv_heads, group,
    # kv_len] additive mask (0 or -inf), built once per step for every layer
    _score_masks: dict[tuple[DecodeChunk, int, int, torch.dtype], torch.Tensor] = field(
        init=False, default_factory=dict)
    # decode only: slots are exactly 0..num_seqs-1, so the cache can be read as a view
    is_contiguous: bool = field(init=False, default=False)
    # decode only: runs of sequences attended together, each over its own longest context
    decode_chunks: list[DecodeChunk] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        assert len(self.slot_ids) == len(self.context_lens) == len(self.query_lens)
        self.slot_tensor = torch.tensor(self.slot_ids, dtype=torch.long, device=self.device)
        self.context_tensor = torch.tensor(self.context_lens, dtype=torch.long, device=self.device)
        if self.is_prefill:
            self.positions = torch.cat([
                torch.arange(ctx, ctx + n, dtype=torch.long)
                for ctx, n in zip(self.context_lens, self.query_lens, strict=True)
            ]).to(self.device)
        else:
            # a decode token sits right after its sequence's cached tokens
            self.positions = self.context_tensor
            assert all(n == 1 for n in self.query_lens)
            self.is_contiguous = self.slot_ids == list(range(len(self.slot_ids)))
            kv_len = max(self.context_lens) + 1
            keys = torch.arange(kv_len, device=self.device)
            # [num_seqs, 1, 1, kv_len]: key j is visible to sequence i if j <= its position
            self.decode_mask = (keys[None, :] <= self.context_tensor[:, None])[:, None, None, :]
            kv_lens = [n + 1 for n in self.context_lens]
            # chunks trade padding for ops: on a GPU, whose decode is bound by launches, not
            # by reading the cache, every op costs more than the padding it would save
            self.decode_chunks = (
                plan_decode_chunks(kv_lens) if self.is_contiguous and self.device.type == "cpu"
                else [DecodeChunk(0, len(kv_lens), kv_len)])

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_fresh(self) -> bool:
        """Every sequence starts at position 0 (nothing of it cached yet)."""
        return not any(self.context_lens)

    def padded_index(self) -> torch.Tensor | None:
        """Prefill: where each packed token sits when every sequence is padded to the longest
        ([num_seqs * longest] rows); None when all are equally long (no padding)."""
        longest = max(self.query_lens)
        if all(n == longest for n in self.query_lens):
            return None
        return torch.cat([torch.arange(i * longest, i * longest + n)
                          for i, n in enumerate(self.query_lens)]).to(self.device)

    def score_mask(self, chunk: DecodeChunk, num_kv_heads: int, group: int,
                   dtype: torch.dtype) -> torch.Tensor:
        """Decode: [chunk seqs * kv_heads, group, chunk.kv_len], 0 where a key is visible,
        else -inf."""
        key = (chunk, num_kv_heads, group, dtype)
        mask = self._score_masks.get(key)
        if mask is None:
            assert self.decode_mask is not None
            visible = self.decode_mask[chunk.start:chunk.end, ..., :chunk.kv_len]
            num_seqs = chunk.end - chunk.start
            mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
            mask.masked_fill_(~visible, float("-inf"))
            mask = mask.expand(num_seqs, num_kv_heads, group, chunk.kv_len).reshape(
                num_seqs * num_kv_heads, group, chunk.kv_len)
            self._score_masks[key] = mask
        return mask

    def last_token_indices(self) -> torch.Tensor:
        """Index of each sequence's last token in the packed tensor."""
        ends = torch.tensor(self.query_lens, dtype=torch.long).cumsum(0) - 1
        return ends.to(self.device)


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Store k, v in the cache and attend. q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]."""
    if batch.is_prefill:
        if batch.is_fresh and (q.device.type != "cpu" or len(set(batch.query_lens)) == 1):
            return _fresh_prefill_attention(q, k, v, k_cache, v_cache, batch, scale)
        return _prefill_attention(q, k, v, k_cache, v_cache, batch, scale)
    return _decode_attention(q, k, v, k_cache, v_cache, batch, scale)


def _fresh_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    """Sequences that all start at position 0, as one causal attention over [num_seqs, heads,
    longest, head_dim]. Each sequence is padded at its end, so causal masking keeps the padding
    out of every real token's view; the padded rows are dropped. One kernel per layer, where
    the per-sequence loop launched dozens (on a GPU, launches were most of a prefill's time);
    on the CPU it runs only when no padding is needed (padding is wasted arithmetic there).
    Padded keys and values land in the cache past each sequence's end: finite numbers that
    decode masks out and overwrites."""
    num_seqs, longest = len(batch.query_lens), max(batch.query_lens)
    index = batch.padded_index()

    def padded(x: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [num_seqs, H, longest, D]
        if index is not None:
            x = x.new_zeros(num_seqs * longest, *x.shape[1:]).index_copy_(0, index, x)
        return x.view(num_seqs, longest, *x.shape[1:]).transpose(1, 2)

    pq, pk, pv = padded(q), padded(k), padded(v)
    k_cache[batch.slot_tensor, :, :longest] = pk
    v_cache[batch.slot_tensor, :, :longest] = pv
    out = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, scale=scale,
                                         enable_gqa=pq.shape[1] != pk.shape[1])
    out = out.transpose(1, 2).reshape(num_seqs * longest, -1)
    return out if index is None else out.index_select(0, index)


def _prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    outputs = []
    start = 0
    for slot, ctx, n in zip(batch.slot_ids, batch.context_lens, batch.query_lens, strict=True):
        # [Hkv, n, D] for this sequence
        seq_k = k[start:start + n].transpose(0, 1)
        seq_v = v[start:start + n].transpose(0, 1)
        k_cache[slot, :, ctx:ctx + n] = seq_k
        v_cache[slot, :, ctx:ctx + n] = seq_v
        seq_q = q[start:start + n].transpose(0, 1)  # [H, n, D]
        if ctx == 0:
            out = F.scaled_dot_product_attention(
                seq_q, seq_k, seq_v, is_causal=True, scale=scale,
                enable_gqa=num_heads != num_kv_heads,
            )
        else:
            # continuing a sequence: the new tokens see the whole cached prefix
            keys = k_cache[slot, :, :ctx + n]
            values = v_cache[slot, :, :ctx + n]
            mask = torch.ones(n, ctx + n, dtype=torch.bool, device=q.device).tril(ctx)
            out = F.scaled_dot_product_attention(
                seq_q, keys, values, attn_mask=mask, scale=scale,
                enable_gqa=num_heads != num_kv_heads,
            )
        outputs.append(out.transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


def _decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: ForwardBatch,
    scale: float,
) -> torch.Tensor:
    # A handful of ops per layer and chunk; the masks are built once per step (ForwardBatch).
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = v_cache.shape[1]
    slots, positions = batch.slot_tensor, batch.context_tensor
    k_cache[slots, :, positions] = k
    v_cache[slots, :, positions] = v
    group = num_heads // num_kv_heads
    # Grouped-query attention as a batched matmul over [seq * kv_head, group]: no KV repeat.
    grouped_q = q.reshape(num_seqs * num_kv_heads, group, head_dim)
    outputs = []
    for chunk in batch.decode_chunks:
        mask = batch.score_mask(chunk, num_kv_heads, group, q.dtype)
        kv_len, count = chunk.kv_len, chunk.end - chunk.start
        if batch.is_contiguous:
            keys = k_cache[chunk.start:chunk.end, :, :kv_len]
            values = v_cache[chunk.start:chunk.end, :, :kv_len]
        else:
            keys, values = k_cache[slots, :, :kv_len], v_cache[slots, :, :kv_len]
        # [seqs, kv_heads, ...] merges its first two dims as a view (slot stride = kv_heads *
        # head stride), so neither matmul copies the cache. Keys as a transposed view
        # [B * Hkv, D, kv_len]: each (slot, head) block of L positions is contiguous in memory,
        # which reads faster from DRAM than a [D, max_len] layout.
        keys = keys.reshape(count * num_kv_heads, kv_len, head_dim).transpose(1, 2)
        values = values.reshape(count * num_kv_heads, kv_len, head_dim)
        # scale * q.k + mask in one op. The mask adds -inf, so a key read must be finite
        # (NaN + -inf = NaN): KVCache.make_readable zeroes never-written keys as well as values.
        chunk_q = grouped_q[chunk.start * num_kv_heads:chunk.end * num_kv_heads]
        scores = torch.baddbmm(mask, chunk_q, keys, alpha=scale)
        # half-precision caches: softmax in float32, as transformers does
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        outputs.append(torch.bmm(probs, values))  # [B * Hkv, G, D]
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return out.view(num_seqs, num_heads * head_dim)
