"""Repacking linear weights for the CPU GEMM kernel (oneDNN), after the stage is ready.

A plain fp32 matmul re-blocks the weight on every call; at the small row counts of decoding
(1-16 tokens) that costs as much as the multiply. oneDNN can keep the weight pre-blocked: a
batch-16 decode step then runs its GEMMs ~1.9x faster on a 2-core AVX2 machine
(docs/BENCHMARKS.md). At one row it depends on the CPU, so the packer measures which kernel
is faster there (`prefer_packed_at_one_row`). Packing a 125M model takes ~0.6 s, so by
default it runs in a background thread after the stage is ready: requests are served from the
loaded weights meanwhile, and each layer switches to its packed weight the moment it is done
(an atomic attribute swap).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from services.worker.engine.models.base import FusedLinear, Linear, StageModel

logger = logging.getLogger(__name__)

# row count the packed layout is tuned for (any count works)
BATCH_HINT = 16
# Weights timed when choosing the kernel for one row: more than a CPU's last-level cache, so
# they stream from memory as in a decode step (a model smaller than this is timed whole).
MEASURE_BYTES = 256 * 2**20
MEASURE_ROUNDS = 3


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: StageModel, stop: threading.Event | None = None) -> int:
    """Pack the model's linears (fusing its fusion groups); return how many were packed.
    Then let the packed weights serve single rows too where they measure faster there."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.packed is None]
    if not linears or not _kernel_agrees(linears[0]):
        return 0
    num_packed = 0
    fused: list[tuple[list[Linear], FusedLinear]] = []
    fused_ids: set[int] = set()
    for owner, attribute, group in model.fusion_groups():
        if stop is not None and stop.is_set():
            return num_packed
        kernel = _fuse(group)
        setattr(owner, attribute, kernel)
        fused.append((group, kernel))
        fused_ids.update(id(linear) for linear in group)
        num_packed += len(group)
    packed: list[Linear] = []
    for linear in linears:
        if stop is not None and stop.is_set():
            return num_packed
        if id(linear) not in fused_ids:
            linear.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(),
                                                                   BATCH_HINT)
            packed.append(linear)
            num_packed += 1
    if prefer_packed_at_one_row(_one_row_kernels(fused, packed), stop):
        for _, kernel in fused:
            kernel.min_rows = 1
        for linear in packed:
            linear.packed_min_rows = 1
    return num_packed


# (plain, packed) ways to multiply one row by the same weights, and their bytes
KernelPair = tuple[Callable[[], object], Callable[[], object], int]


def _one_row_kernels(fused: list[tuple[list[Linear], FusedLinear]],
                     packed: list[Linear]) -> list[KernelPair]:
    pairs: list[KernelPair] = []
    for group, kernel in fused:
        x = torch.randn(1, group[0].in_features)
        pairs.append((lambda x=x, group=group: [F.linear(x, m.weight, m.bias) for m in group],
                      lambda x=x, kernel=kernel: kernel.joined(x),
                      sum(m.weight.nbytes for m in group)))
    for linear in packed:
        x = torch.randn(1, linear.in_features)
        pairs.append((lambda x=x, m=linear: F.linear(x, m.weight, m.bias),
                      lambda x=x, m=linear: torch.ops.mkldnn._linear_pointwise(
                          x, m.packed, m.bias, "none", [], ""),
                      linear.weight.nbytes))
    return pairs


def prefer_packed_at_one_row(pairs: list[KernelPair],
                             stop: threading.Event | None = None) -> bool:
    """Whether the packed kernel multiplies one row faster than the plain GEMV, timed over
    the first MEASURE_BYTES of weights, plain and packed in turn, best of MEASURE_ROUNDS.

    Which wins depends on the CPU and its BLAS (MKL's GEMV is fast on Intel, slow on AMD), so
    it is measured here rather than assumed; the whole pass costs about two decode steps."""
    chosen, num_bytes = [], 0
    for pair in pairs:
        if num_bytes >= MEASURE_BYTES:
            break
        chosen.append(pair)
        num_bytes += pair[2]
    if not chosen:
        return False
    best_plain = best_packed = float("inf")
    with torch.inference_mode():
        for _ in range(MEASURE_ROUNDS):
            if stop is not None and stop.is_set():
                return False
            best_plain = min(best_plain, _timed_pass([plain for plain, _, _ in chosen]))
            best_packed = min(best_packed, _timed_pass([packed for _, packed, _ in chosen]))
    logger.info("one row through %.0f MB of weights: plain %.2f ms, packed %.2f ms; %s serves",
                num_bytes / 2**20, best_plain * 1e3, best_packed * 1e3,
                "packed" if best_packed < best_plain else "plain")
    return best_packed < best_plain


def _timed_pass(kernels: list[Callable[[], object]]) -> float:
    start = time.perf_counter()
    for kernel in kernels:
        kernel()
    return time.perf_counter() - start


def _fuse(group: list[Linear]) -> FusedLinear:
    weight = torch.cat([linear.weight.detach() for linear in group])
    biases = [linear.bias for linear in group]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) \
        else None
    assert bias is not None or all(b is None for b in biases), "a group mixes bias and no bias"
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
    return FusedLinear(packed, bias, [linear.out_features for linear in group])


def _kernel_agrees(linear: Linear) -> bool:
    """Check the packed kernel against F.linear once (a broken build must not serve)."""
    with torch.inference_mode():
        x = torch.randn(3, linear.in_features)
        expected = torch.nn.functional.linear(x, linear.weight)
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if not torch.allclose(got, expected, atol=tolerance, rtol=1e-4):
        logger.warning("oneDNN packed linear disagrees with F.linear; weights stay unpacked")
        return False
    return True


class BackgroundPacker:
    """Packs a model's linears in a daemon thread."""

    def __init__(self, model: StageModel) -> None:
        self._stop = threading.Event()
        self.num_packed = 0
        self._thread = threading.Thread(target=self._run, args=(model,), daemon=True,
                                        name="weight-packer")
        self._thread.start()
        # A daemon thread killed inside a oneDNN call aborts the interpreter at exit.
        atexit.register(self.stop)

    def _run(self, model: StageModel) -> None:
        try:
            self.num_packed = pack_linears(model, self._stop)
        except RuntimeError:
            logger.exception("packing weights failed; serving with unpacked weights")

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop after the layer being packed (the rest stay unpacked) and wait."""
        self._stop.set()
        self._thread.join()
        atexit.unregister(self.stop)
