"""Transparent huge pages for the engine's large CPU buffers: the KV cache and packed weights.

A decode step streams every packed weight and the KV cache it reads from memory; on 4 KB pages
that is a TLB miss every 4 KB. On Linux, `madvise(MADV_HUGEPAGE)` on a buffer not yet touched
makes its pages fault in as 2 MB pages (the KV cache: allocated empty, zeroed as sequences
reach it), and `MADV_COLLAPSE` (Linux 6.1+) moves a buffer already written (a packed weight)
onto 2 MB pages at once. Measured on the 125M Llama, AMD EPYC, 2 threads: decode steps 2-5%
faster at batch 1 and at batch 16 (docs/BENCHMARKS.md). Best effort: where the kernel
refuses (THP set to `never`, an older kernel, another OS) the buffer stays on 4 KB pages.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 * 2**20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25


def advise_tensor(tensor: torch.Tensor) -> int:
    """Ask for huge pages where `tensor`'s untouched CPU memory faults in; return the bytes
    advised (0 if refused or nothing to do)."""
    if tensor.device.type != "cpu":
        return 0
    return _advise(tensor.data_ptr(), tensor.untyped_storage().nbytes(), MADV_HUGEPAGE)


def collapse_packed(packed: torch.Tensor) -> int:
    """Move a packed (oneDNN) weight onto huge pages now; return the bytes moved."""
    return _advise(torch.ops.mkldnn.data_ptr(packed), torch.ops.mkldnn._nbytes(packed),
                   MADV_COLLAPSE)


def _advise(address: int, num_bytes: int, advice: int) -> int:
    madvise = _madvise()
    # only whole 2 MB pages inside the buffer: its ends share pages with other allocations
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + num_bytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if madvise is None or end <= start:
        return 0
    if madvise(start, end - start, advice) != 0:
        logger.debug("madvise(%d) of %d bytes refused: errno %d", advice, end - start,
                     ctypes.get_errno())
        return 0
    return end - start


@functools.cache
def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
