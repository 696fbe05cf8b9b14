"""The batched prefill attention (one kernel for fresh sequences) against the per-sequence one,
and decode attention in chunks against one chunk over the longest context."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine import attention
from services.worker.engine.attention import (
    DecodeChunk,
    ForwardBatch,
    _decode_attention,
    _fresh_prefill_attention,
    _prefill_attention,
    plan_decode_chunks,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("query_lens", [[5, 12, 2], [7, 7, 7]], ids=["ragged", "equal"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_fresh_prefill_equals_the_per_sequence_attention(query_lens: list[int],
                                                         kv_heads: int) -> None:
    generator = torch.Generator().manual_seed(0)
    heads, dim, slots, max_len = 4, 8, 5, 32
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, heads, dim, generator=generator)
    k = torch.randn(num_tokens, kv_heads, dim, generator=generator)
    v = torch.randn(num_tokens, kv_heads, dim, generator=generator)
    batch = ForwardBatch(is_prefill=True, slot_ids=[3, 0, 4], context_lens=[0, 0, 0],
                         query_lens=query_lens)
    assert batch.is_fresh
    caches = []
    outputs = []
    for attend in (_prefill_attention, _fresh_prefill_attention):
        k_cache = torch.full((slots, kv_heads, max_len, dim), float("nan"))
        v_cache = torch.full((slots, kv_heads, max_len, dim), float("nan"))
        outputs.append(attend(q, k, v, k_cache, v_cache, batch, 0.3))
        caches.append((k_cache, v_cache))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=1e-5)
    assert outputs[1].shape == (num_tokens, heads * dim)
    (k_loop, v_loop), (k_padded, v_padded) = caches
    for slot, n in zip(batch.slot_ids, query_lens, strict=True):
        assert torch.equal(k_padded[slot, :, :n], k_loop[slot, :, :n])
        assert torch.equal(v_padded[slot, :, :n], v_loop[slot, :, :n])
    # padding lands past each sequence's end as finite numbers, never in another slot
    longest = max(query_lens)
    for slot in batch.slot_ids:
        assert torch.isfinite(k_padded[slot, :, :longest]).all()
        assert torch.isfinite(v_padded[slot, :, :longest]).all()
    for untouched in (1, 2):
        assert torch.isnan(k_padded[untouched]).all() and torch.isnan(v_padded[untouched]).all()


def test_a_batch_that_continues_a_sequence_is_not_fresh() -> None:
    batch = ForwardBatch(is_prefill=True, slot_ids=[0, 1], context_lens=[0, 4],
                         query_lens=[3, 2])
    assert not batch.is_fresh
    assert batch.padded_index().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("kv_lens", "chunks"), [
    ([40, 40, 40], [(0, 3, 40)]),
    # the split saves 1800 - 1200 pairs, more than a chunk costs; neither half splits again
    ([300, 290, 280, 100, 90, 80], [(0, 3, 300), (3, 6, 100)]),
    ([100, 50], [(0, 2, 100)]),  # saves 50 pairs: not worth a chunk
    ([900, 880, 500, 480, 20, 10], [(0, 2, 900), (2, 4, 500), (4, 6, 20)]),
], ids=["equal", "two-runs", "too-small-to-split", "three-runs"])
def test_decode_chunks_split_where_padding_costs_more_than_a_chunk(
    kv_lens: list[int], chunks: list[tuple[int, int, int]],
) -> None:
    assert plan_decode_chunks(kv_lens) == [DecodeChunk(*chunk) for chunk in chunks]


def test_chunked_decode_attention_equals_one_chunk_over_the_longest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, dim, slots, max_len = 6, 2, 8, 4, 64
    context_lens = [50, 47, 9, 3]
    q = torch.randn(slots, heads, dim, generator=generator)
    k = torch.randn(slots, kv_heads, dim, generator=generator)
    v = torch.randn(slots, kv_heads, dim, generator=generator)
    k_cache = torch.randn(slots, kv_heads, max_len, dim, generator=generator)
    v_cache = torch.randn(slots, kv_heads, max_len, dim, generator=generator)
    outputs = []
    for cost in (0, 10**9):  # every saving splits / nothing does
        monkeypatch.setattr(attention, "CHUNK_COST_PAIRS", cost)
        batch = ForwardBatch(is_prefill=False, slot_ids=list(range(slots)),
                             context_lens=context_lens, query_lens=[1] * slots)
        outputs.append(_decode_attention(q, k, v, k_cache.clone(), v_cache.clone(), batch, 0.3))
        assert len(batch.decode_chunks) == (3 if cost == 0 else 1)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)
