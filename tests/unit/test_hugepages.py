"""The KV cache and packed weights land on 2 MB pages where the kernel offers them.

Each check runs in a fresh interpreter, as a worker does: in a long test process the allocator
hands out memory that earlier tests already faulted in on 4 KB pages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.worker.engine.hugepages import HUGE_PAGE_BYTES, advise_tensor

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="needs Linux with transparent huge pages not set to never")

MEASURE = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import torch
from services.worker.engine.hugepages import HUGE_PAGE_BYTES, collapse_packed
from services.worker.engine.kv_cache import KVCache, KVCacheBudget, KVCacheShape


def huge_bytes_in(start, end):
    # AnonHugePages of the mappings overlapping [start, end) (at least what lies in it)
    total, overlaps = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            overlaps = low < end and start < high
        elif overlaps and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def whole_pages(address, num_bytes):
    # the whole 2 MB pages inside a buffer (its ends share pages with other memory)
    return (-(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES,
            (address + num_bytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES)


shape = KVCacheShape(num_layers=1, num_kv_heads=4, head_dim=64, dtype=torch.float32)
cache = KVCache(shape, KVCacheBudget(num_slots=16, max_len=1024), torch.device("cpu"))
keys = cache.k[0]  # 16 MB: slots of 1 MB each
kv_first, kv_last = whole_pages(keys.data_ptr(), keys.nbytes)
kv_before = huge_bytes_in(kv_first, kv_last)
cache.make_readable(list(range(16)), [1] * 16, 1024)  # zeroes every slot

weight = torch.randn(2048, 768)
packed = torch.ops.mkldnn._reorder_linear_weight(weight, 16)
x = torch.randn(16, 768)
before = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
w_first, w_last = whole_pages(torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed))
moved = collapse_packed(packed)
after = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
print(json.dumps({{
    "kv_pages": kv_last - kv_first, "kv_huge_before": kv_before,
    "kv_huge": huge_bytes_in(kv_first, kv_last),
    "weight_pages": w_last - w_first, "moved": moved, "weight_huge": huge_bytes_in(w_first, w_last),
    "unchanged": torch.equal(before, after)}}))
"""


@pytest.fixture(scope="module")
def measured() -> dict[str, int]:
    result = subprocess.run([sys.executable, "-c", MEASURE.format(root=str(ROOT))],
                            capture_output=True, text=True, timeout=120, check=True)
    return json.loads(result.stdout)


@needs_thp
def test_a_kv_cache_faults_in_on_huge_pages_as_sequences_reach_it(
    measured: dict[str, int],
) -> None:
    assert measured["kv_pages"] >= 7 * HUGE_PAGE_BYTES  # 16 MB: 7 or 8 whole pages
    assert measured["kv_huge_before"] == 0  # nothing resident until a sequence reaches it
    assert measured["kv_huge"] >= measured["kv_pages"]


@needs_thp
def test_a_packed_weight_moves_onto_huge_pages_with_its_values_unchanged(
    measured: dict[str, int],
) -> None:
    assert measured["moved"] == measured["weight_pages"] >= 2 * HUGE_PAGE_BYTES  # 6.3 MB
    assert measured["weight_huge"] >= measured["moved"]
    assert measured["unchanged"]


def test_buffers_off_the_cpu_or_under_a_page_are_left_alone() -> None:
    assert advise_tensor(torch.empty(1000)) == 0  # no whole 2 MB page inside
    assert advise_tensor(torch.empty(2**22, device="meta")) == 0
