"""Repacking linear weights for the CPU GEMM kernel (oneDNN), after the stage is ready.

A plain fp32 matmul re-blocks the weight on every call; at the small row counts of decoding
(1-16 tokens) that costs as much as the multiply. oneDNN can keep the weight pre-blocked: a
batch-16 decode step then runs its GEMMs ~1.9x faster on a 2-core AVX2 machine
(docs/BENCHMARKS.md). Packing a 125M model takes ~0.6 s, so by default it runs in a background
thread after the stage is ready: requests are served from the loaded weights meanwhile, and
each layer switches to its packed weight the moment it is done (an atomic attribute swap).
"""

from __future__ import annotations

import atexit
import logging
import threading

import torch

from services.worker.engine.models.base import FusedLinear, Linear, StageModel

logger = logging.getLogger(__name__)

# row count the packed layout is tuned for (any count works)
BATCH_HINT = 16


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linears(model: StageModel, stop: threading.Event | None = None) -> int:
    """Pack the model's linears (fusing its fusion groups); return how many were packed."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.packed is None]
    if not linears or not _kernel_agrees(linears[0]):
        return 0
    num_packed = 0
    fused: set[int] = set()
    for owner, attribute, group in model.fusion_groups():
        if stop is not None and stop.is_set():
            return num_packed
        setattr(owner, attribute, _fuse(group))
        fused.update(id(linear) for linear in group)
        num_packed += len(group)
    for linear in linears:
        if stop is not None and stop.is_set():
            break
        if id(linear) not in fused:
            linear.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(),
                                                                   BATCH_HINT)
            num_packed += 1
    return num_packed


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
