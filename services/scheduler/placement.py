"""Where a cold start's workers go: the part of the policy that differs between baselines.

A placer is a pure function `(nodes, model, now) -> plans | None`: one plan per pipeline
stage, or None to defer (the request stays queued and placement is retried on the next
event). `single_worker` is degree 1; the SLO-aware `hydraserve` placer (choose_degree over
each node's available bandwidth, one full-size worker, partial workers on other nodes) plugs
into the same `Policy` next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from services.scheduler.estimator import worker_gpu_bytes
from services.scheduler.state import ModelSpec, NodeState


@dataclass(frozen=True)
class WorkerPlan:
    node_id: str
    stage: int
    start_layer: int
    end_layer: int
    gpu_memory_bytes: int
    is_full_size: bool
    # bytes this worker fetches at placement, and the NIC share it is planned with
    fetch_bytes: int
    fetch_bandwidth_bytes_per_s: float


class Placer(Protocol):
    def __call__(self, nodes: Mapping[str, NodeState], model: ModelSpec,
                 now: float) -> tuple[WorkerPlan, ...] | None: ...


def place_single_worker(nodes: Mapping[str, NodeState], model: ModelSpec,
                        now: float) -> tuple[WorkerPlan, ...] | None:
    """One whole-model worker on the up node with the most free GPU memory that holds it.

    Ties go to the smallest node id; None when no node has room.
    """
    num_bytes = worker_gpu_bytes(size_bytes=model.size_bytes,
                                 kv_cache_bytes=model.kv_cache_bytes, degree=1,
                                 is_full_size=True)
    candidates = [n for n in nodes.values() if n.is_up and n.free_gpu_memory_bytes >= num_bytes]
    if not candidates:
        return None
    node = min(candidates, key=lambda n: (-n.free_gpu_memory_bytes, n.node_id))
    share = node.nic_bandwidth_bytes_per_s / (len(node.fetches) + 1)
    return (WorkerPlan(node_id=node.node_id, stage=0, start_layer=0, end_layer=model.num_layers,
                       gpu_memory_bytes=num_bytes, is_full_size=True,
                       fetch_bytes=model.size_bytes, fetch_bandwidth_bytes_per_s=share),)
