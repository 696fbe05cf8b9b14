"""Repacking linear weights for the CPU GEMM kernel (oneDNN), as they load or after ready.

A plain fp32 matmul re-blocks the weight on every call; at the small row counts of decoding
(1-16 tokens) that costs as much as the multiply. oneDNN can keep the weight pre-blocked: a
batch-16 decode step then runs its GEMMs ~1.9x faster on a 2-core AVX2 machine
(docs/BENCHMARKS.md); at one row it depends on the CPU (`packed_serves_one_row`). Packing a
125M model takes ~0.2-0.6 s, so by default it runs in a background thread after the stage is
ready: requests are served from the loaded weights meanwhile, and each layer switches to its
packed weight the moment it is done (an atomic attribute swap). A load whose bytes are still
arriving packs each linear as it lands instead (`weight_packing="as_loaded"`).
"""

from __future__ import annotations

import atexit
import functools
import logging
import threading

import torch

from services.worker.engine.hugepages import collapse_packed
from services.worker.engine.models.base import FusedLinear, Linear, StageModel

logger = logging.getLogger(__name__)

# row count the packed layout is tuned for (any count works)
BATCH_HINT = 16


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: StageModel, stop: threading.Event | None = None) -> int:
    """Pack every linear, and fuse every fusion group, whose weights are all loaded and that
    is not packed yet; return how many linears were packed. Called after each tensor of a
    load whose bytes are still arriving, it packs while the loader waits for them."""
    num_packed = 0
    grouped: set[int] = set()
    for owner, attribute, group in model.fusion_groups():
        grouped.update(id(linear) for linear in group)
        if getattr(owner, attribute) is not None or not all(map(_is_loaded, group)):
            continue
        if _is_stopped(stop) or not _kernel_agrees():
            return num_packed
        setattr(owner, attribute, _fuse(group))
        num_packed += len(group)
    for linear in model.modules():
        if (not isinstance(linear, Linear) or id(linear) in grouped
                or linear.packed is not None or not _is_loaded(linear)):
            continue
        if _is_stopped(stop) or not _kernel_agrees():
            return num_packed
        if packed_serves_one_row():
            linear.packed_min_rows = 1
        linear.packed = _packed(linear.weight.detach())
        num_packed += 1
    return num_packed


def _is_stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def _is_loaded(linear: Linear) -> bool:
    return not linear.weight.is_meta and (linear.bias is None or not linear.bias.is_meta)


@functools.cache
def packed_serves_one_row(cpu_vendor: str | None = None) -> bool:
    """Whether packed weights serve single rows too (decode at batch 1), by the CPU's vendor.

    MKL's GEMV streamed the weights ~12% faster than oneDNN's packed kernel on an AVX-512
    Intel Xeon; on an AVX-512 AMD EPYC, where MKL takes a generic path, the packed kernel was
    1.7x faster (docs/BENCHMARKS.md). A rule rather than a timing: every process on a machine
    multiplies alike, so a pipeline stage and the worker that consolidates it produce the same
    tokens."""
    return (cpu_vendor or _cpu_vendor()) != "GenuineIntel"


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.partition(":")[2].strip()
    except OSError:
        logger.info("no /proc/cpuinfo; packed weights serve single rows too")
    return "unknown"


def _fuse(group: list[Linear]) -> FusedLinear:
    weight = torch.cat([linear.weight.detach() for linear in group])
    biases = [linear.bias for linear in group]
    bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) \
        else None
    assert bias is not None or all(b is None for b in biases), "a group mixes bias and no bias"
    fused = FusedLinear(_packed(weight), bias, [linear.out_features for linear in group])
    if packed_serves_one_row():
        fused.min_rows = 1
    return fused


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """`weight` pre-blocked for oneDNN, on huge pages where the kernel allows it."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
    collapse_packed(packed)
    return packed


@functools.cache
def _kernel_agrees() -> bool:
    """Check the packed kernel against F.linear once a process (a broken build must not
    serve)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(80, 96, generator=generator)
    x = torch.randn(3, 96, generator=generator)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, weight)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, BATCH_HINT)
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
