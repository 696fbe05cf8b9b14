"""The KV cache and packed weights land on 2 MB pages where the kernel offers them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from services.worker.engine.hugepages import HUGE_PAGE_BYTES, advise_tensor, collapse_packed
from services.worker.engine.kv_cache import KVCache, KVCacheBudget, KVCacheShape

pytestmark = pytest.mark.unit

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages not set to never")


def huge_bytes_at(address: int) -> int:
    """AnonHugePages of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_a_kv_cache_faults_in_on_huge_pages_as_sequences_reach_it() -> None:
    shape = KVCacheShape(num_layers=1, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    cache = KVCache(shape, KVCacheBudget(num_slots=16, max_len=1024), torch.device("cpu"))
    keys = cache.k[0]  # 16 MB: slots of 1 MB each
    # the whole 2 MB pages inside the buffer (its ends share pages with other memory); the
    # advice makes them a mapping of their own
    first = -(-keys.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    last = (keys.data_ptr() + keys.nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    cache.make_readable(list(range(16)), [1] * 16, 1024)  # zeroes every slot
    assert huge_bytes_at(first) >= last - first >= 7 * HUGE_PAGE_BYTES


@needs_thp
def test_a_packed_weight_moves_onto_huge_pages_with_its_values_unchanged() -> None:
    weight = torch.randn(2048, 768)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
    x = torch.randn(16, 768)
    before = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    moved = collapse_packed(packed)
    assert moved >= 2 * HUGE_PAGE_BYTES  # 6.3 MB of weight: at least two whole pages
    start = -(-torch.ops.mkldnn.data_ptr(packed) // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    assert huge_bytes_at(start) >= moved
    after = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    assert torch.equal(before, after)


def test_buffers_off_the_cpu_or_under_a_page_are_left_alone() -> None:
    assert advise_tensor(torch.empty(1000)) == 0  # no whole 2 MB page inside
    meta = torch.empty(2**22, device="meta")
    assert advise_tensor(meta) == 0
