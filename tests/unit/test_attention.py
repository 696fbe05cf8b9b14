"""The batched prefill attention (one kernel for fresh sequences) against the per-sequence one."""

from __future__ import annotations

import pytest
import torch

from services.worker.engine.attention import (
    ForwardBatch,
    _fresh_prefill_attention,
    _prefill_attention,
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
