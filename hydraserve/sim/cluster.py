"""What the simulator simulates: servers, GPUs, storage, model size classes and serving times.

Sizes are bytes with GB = 1e9 (model sizes and GPU memory alike), bandwidths bytes/s with
Gbps = 1e9 / 8 bytes/s. Every constant below is an ASSUMPTION unless a source is named; the
calibration (`hydraserve.sim.calibration`) replaces them with measurements of real runs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

GB = 1e9
GBPS = 1e9 / 8


@dataclass(frozen=True)
class Server:
    """A GPU server: each of its GPUs is a node of the policy; all of them share its NIC."""

    name: str
    gpu_type: str
    num_gpus: int
    gpu_memory_bytes: int
    nic_bytes_per_s: float

    def node_ids(self) -> list[str]:
        # GPU index first, so that the policy's tie-break by node id spreads over servers
        return [f"{gpu}.{self.name}" for gpu in range(self.num_gpus)]


@dataclass(frozen=True)
class StorageNode:
    name: str
    egress_bytes_per_s: float


@dataclass(frozen=True)
class ServingTimes:
    """A whole-model worker's speed: prefill = base + per_token * prompt; tpot per token;
    `overhead_s` a fixed time on every first token beyond the prefill, which no factor
    scales (a client's HTTP and SSE overhead)."""

    tpot_s: float
    prefill_base_s: float = 0.0
    prefill_s_per_token: float = 0.0
    overhead_s: float = 0.0

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill_base_s + self.prefill_s_per_token * prompt_tokens


@dataclass(frozen=True)
class SizeClass:
    """A model size class: what a ModelSpec needs, and its speed per GPU type."""

    name: str
    size_bytes: int
    num_layers: int
    kv_cache_bytes: int
    # gpu type -> times; a GPU type without an entry gets the slowest listed one
    times: Mapping[str, ServingTimes] = field(default_factory=dict)

    def times_on(self, gpu_types: set[str]) -> ServingTimes:
        """The slowest of the GPUs an endpoint spans sets its pace."""
        listed = [self.times[g] for g in gpu_types if g in self.times] or list(self.times.values())
        return max(listed, key=lambda t: (t.tpot_s, t.prefill_s_per_token, t.prefill_base_s))


@dataclass(frozen=True)
class Cluster:
    servers: tuple[Server, ...]
    storage: tuple[StorageNode, ...]
    # a cold start's cost beyond its fetch: process spawn, imports, runtime and engine init
    startup_s: float = 2.0
    # host memory -> GPU; the non-overlapped worker loads every byte after its start-up, the
    # overlapped one only the last `load_tail_bytes` after the fetch ends
    load_bytes_per_s: float = float("inf")
    load_tail_bytes: int = 256 * 1024 * 1024
    # a fixed last step of every placement once the fetch, start-up and load are done (the
    # ready report; a live worker's measured tail, `Calibration.ready_tail_s`)
    ready_tail_s: float = 0.0
    # a partition restored from the node's host-memory cache comes at this speed, NIC unused
    host_cache_bytes_per_s: float = 10 * GB
    # one stage-to-stage activation transfer per decode step (CostModel's default)
    per_hop_s: float = 0.002

    def server_of(self) -> dict[str, Server]:
        return {node_id: s for s in self.servers for node_id in s.node_ids()}


# Speeds derived from the GPUs' datasheets (NVIDIA A10: 125 TFLOPS fp16 tensor, 600 GB/s;
# V100: 125 TFLOPS (SXM2) / 112 (PCIe), 900 GB/s): decode is memory bound, tpot = weights /
# (bandwidth x 0.7); prefill is compute bound, 2 x params FLOPs per token at 40 % of peak.
# Not measured: replace them with `calibrate` of real runs where there are some.
def _roofline(size_bytes: float, *, peak_flops: float, mem_bytes_per_s: float) -> ServingTimes:
    params = size_bytes / 2  # fp16
    return ServingTimes(tpot_s=size_bytes / (mem_bytes_per_s * 0.7), prefill_base_s=0.02,
                        prefill_s_per_token=2 * params / (peak_flops * 0.4))


A10 = {"peak_flops": 125e12, "mem_bytes_per_s": 600 * GB}
V100 = {"peak_flops": 112e12, "mem_bytes_per_s": 900 * GB}

# 7B- and 13B-class fp16 (Llama-2 7B / 13B: 32 / 40 layers); KV cache an assumption sized so
# that a whole 13B worker (26 + 4 GB) fits a 32 GB V100 and a whole 7B one a 24 GB A10.
SIZE_7B = SizeClass("7b", size_bytes=int(13.5 * GB), num_layers=32, kv_cache_bytes=int(2 * GB),
                    times={"A10": _roofline(13.5 * GB, **A10),
                           "V100": _roofline(13.5 * GB, **V100)})
SIZE_13B = SizeClass("13b", size_bytes=int(26 * GB), num_layers=40,
                     kv_cache_bytes=int(4 * GB),
                     times={"A10": _roofline(26 * GB, **A10),
                            "V100": _roofline(26 * GB, **V100)})
SIZE_CLASSES = {c.name: c for c in (SIZE_7B, SIZE_13B)}

# The published end-to-end testbed: 2 servers x 4 A10 (24 GB) at 64 Gbps and 4 servers x
# 4 V100 (32 GB) at 16 Gbps; storage at 32 Gbps (two storage nodes: an assumption).
PUBLISHED = Cluster(
    servers=(*(Server(f"a10-{i}", "A10", 4, int(24 * GB), 64 * GBPS) for i in range(2)),
             *(Server(f"v100-{i}", "V100", 4, int(32 * GB), 16 * GBPS) for i in range(4))),
    storage=tuple(StorageNode(f"storage-{i}", 32 * GBPS) for i in range(2)),
    startup_s=2.0, load_bytes_per_s=10 * GB)

# A small cluster for quick experiments: one server of 2 A10 and one of 2 V100 (a whole
# 13B-class worker fits only a V100), one storage node.
SMALL = Cluster(
    servers=(Server("a10-0", "A10", 2, int(24 * GB), 64 * GBPS),
             Server("v100-0", "V100", 2, int(32 * GB), 16 * GBPS)),
    storage=(StorageNode("storage-0", 32 * GBPS),), startup_s=2.0, load_bytes_per_s=10 * GB)

CLUSTERS = {"published": PUBLISHED, "small": SMALL}

_SIZE_IN_NAME = re.compile(r"(?<![0-9a-z])(\d+)b(?![a-z])", re.IGNORECASE)


def size_class_of(model: str, classes: Mapping[str, SizeClass] = SIZE_CLASSES) -> SizeClass:
    """A class named exactly like the model (a real model, measured); else the size class the
    name says (`chatbot-13b-07` -> 13b); 7b when it says none."""
    if model in classes:
        return classes[model]
    match = _SIZE_IN_NAME.search(model)
    name = f"{match.group(1)}b" if match else "7b"
    if name not in classes:
        raise ValueError(f"model {model!r}: no size class {name!r} (known: {sorted(classes)})")
    return classes[name]
