"""Where a cold start's workers go: the part of the policy that differs between baselines.

A placer is a pure function `(nodes, model, now, inputs) -> plans | None`: one plan per
pipeline stage, or None to defer (the request stays queued and placement is retried on the
next event). `place_single_worker` is degree 1 (`single_worker`, `serverless_vllm`);
`place_pipeline` is HydraServe's SLO-aware choice of the degree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from services.scheduler.estimator import (
    NUM_FULL_SIZE_WORKERS,
    ColdStartInputs,
    available_bandwidth,
    estimate_tpot,
    estimate_ttft,
    worker_gpu_bytes,
)
from services.scheduler.state import Fetch, ModelSpec, NodeState


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
    def __call__(self, nodes: Mapping[str, NodeState], model: ModelSpec, now: float,
                 inputs: ColdStartInputs) -> tuple[WorkerPlan, ...] | None: ...


def place_single_worker(nodes: Mapping[str, NodeState], model: ModelSpec, now: float,
                        inputs: ColdStartInputs) -> tuple[WorkerPlan, ...] | None:
    """One whole-model worker on the up node with the most free GPU memory that holds it.

    Ties go to the smallest node id; None when no node has room.
    """
    num_bytes = worker_gpu_bytes(size_bytes=model.size_bytes,
                                 kv_cache_bytes=model.kv_cache_bytes, degree=1,
                                 is_full_size=True)
    candidates = [n for n in nodes.values() if n.is_up and n.free_gpu_memory_bytes >= num_bytes]
    if not candidates:
        return None
    # a node holding the model in its host-memory cache starts it without a fetch
    node = min(candidates, key=lambda n: (not n.holds_model(model.name),
                                          -n.free_gpu_memory_bytes, n.node_id))
    if node.holds_model(model.name):
        return (_cached_plan(node, model, num_bytes),)
    share = node.nic_bandwidth_bytes_per_s / (len(nic_fetches(nodes)[node.nic_key]) + 1)
    return (WorkerPlan(node_id=node.node_id, stage=0, start_layer=0, end_layer=model.num_layers,
                       gpu_memory_bytes=num_bytes, is_full_size=True,
                       fetch_bytes=model.size_bytes, fetch_bandwidth_bytes_per_s=share),)


# HydraServe's cap on the pipeline degree (DESIGN.md: p <= 4)
MAX_DEGREE = 4


@dataclass(frozen=True)
class _Pipelines:
    """The nodes a pipeline of a model can use now, fastest first, and how its stages fit."""

    model: ModelSpec
    # model + KV cache: the full-size stage-0 worker
    full_bytes: int
    # up node -> the NIC share a new fetch gets there (0: it would break a deadline)
    bandwidths: Mapping[str, float]
    # nodes with bandwidth to give: fastest first, then the most free memory, then the
    # smallest id, so ties are deterministic
    ranked: list[NodeState]
    # where stage 0 goes: the fastest node that holds a whole copy (None: defer)
    head: NodeState | None

    @classmethod
    def of(cls, nodes: Mapping[str, NodeState], model: ModelSpec, now: float) -> _Pipelines:
        full_bytes = worker_gpu_bytes(size_bytes=model.size_bytes,
                                      kv_cache_bytes=model.kv_cache_bytes, degree=1,
                                      is_full_size=True)
        on_nic = nic_fetches(nodes)
        bandwidths = {n.node_id: available_bandwidth(
            nic_bandwidth_bytes_per_s=n.nic_bandwidth_bytes_per_s, fetches=on_nic[n.nic_key],
            now=now)
            for n in nodes.values() if n.is_up}
        ranked = sorted((n for n in nodes.values() if bandwidths.get(n.node_id, 0.0) > 0),
                        key=lambda n: (-bandwidths[n.node_id], -n.free_gpu_memory_bytes,
                                       n.node_id))
        head = next((n for n in ranked if n.free_gpu_memory_bytes >= full_bytes), None)
        return cls(model, full_bytes, bandwidths, ranked, head)

    def nodes_for(self, degree: int) -> list[NodeState] | None:
        """The head and the fastest other nodes that hold a partial worker of `degree`, or
        None if there are too few (or no head)."""
        if self.head is None:
            return None
        # one stage per NIC: stages behind one NIC would share it, not add to it
        chosen, nics = [self.head], {self.head.nic_key}
        for node in self.ranked:
            if len(chosen) == degree:
                break
            if (node.nic_key not in nics
                    and node.free_gpu_memory_bytes >= self.partial_bytes(degree)):
                chosen.append(node)
                nics.add(node.nic_key)
        return chosen if len(chosen) == degree else None

    def partial_bytes(self, degree: int) -> int:
        return worker_gpu_bytes(size_bytes=self.model.size_bytes,
                                kv_cache_bytes=self.model.kv_cache_bytes, degree=degree,
                                is_full_size=False)

    def plans(self, chosen: list[NodeState], ranges: list[tuple[int, int]]
              ) -> tuple[WorkerPlan, ...]:
        degree = len(chosen)
        partial_bytes = self.partial_bytes(degree)
        return tuple(
            WorkerPlan(node_id=node.node_id, stage=stage, start_layer=start, end_layer=end,
                       gpu_memory_bytes=self.full_bytes if stage == 0 else partial_bytes,
                       is_full_size=stage == 0,
                       fetch_bytes=self.model.fetch_bytes(degree, stage),
                       fetch_bandwidth_bytes_per_s=self.bandwidths[node.node_id])
            for stage, (node, (start, end)) in enumerate(zip(chosen, ranges, strict=True)))

    def single(self) -> tuple[WorkerPlan, ...]:
        """One whole-model worker on the head."""
        assert self.head is not None
        return self.plans([self.head], [(0, self.model.num_layers)])


def place_pipeline(nodes: Mapping[str, NodeState], model: ModelSpec, now: float,
                   inputs: ColdStartInputs) -> tuple[WorkerPlan, ...] | None:
    """The smallest pipeline degree whose TTFT and TPOT estimates meet the model's SLOs.

    Degree p puts its stages on p different up nodes with bandwidth to give
    (`available_bandwidth`), fastest first: stage 0 is the full-size worker (it survives
    consolidation) on the fastest node that holds the whole model, stages 1.. are partial
    workers on the fastest other nodes that hold ceil(total / p). The slowest chosen node
    bounds the fetch. A degree whose layer boundaries the store did not give is skipped. When
    no degree meets the SLOs the cold start falls back to one whole-model worker; None
    (defer) when no node with bandwidth to give holds a whole copy.
    """
    pipelines = _Pipelines.of(nodes, model, now)
    cached = [n for n in nodes.values() if n.is_up and n.holds_model(model.name)
              and n.free_gpu_memory_bytes >= pipelines.full_bytes]
    if cached:
        # from host memory no pipeline fetches faster: one worker, no NIC used
        node = min(cached, key=lambda n: (-n.free_gpu_memory_bytes, n.node_id))
        return (_cached_plan(node, model, pipelines.full_bytes),)
    if pipelines.head is None:
        return None
    for degree in range(1, min(model.max_pipeline_degree, MAX_DEGREE) + 1):
        ranges = model.layer_ranges(degree)
        if ranges is None:
            continue
        chosen = pipelines.nodes_for(degree)
        if chosen is None:
            break
        band = min(pipelines.bandwidths[n.node_id] for n in chosen)
        num_full_size = min(NUM_FULL_SIZE_WORKERS, degree)
        ttft = estimate_ttft(size_bytes=model.size_bytes, degree=degree,
                             bandwidth_bytes_per_s=band, num_full_size=num_full_size,
                             prefill_s=inputs.prefill_s, startup_s=inputs.startup_s,
                             queue_wait_s=inputs.queue_wait_s)
        tpot = estimate_tpot(degree=degree, num_full_size=num_full_size, tpot_s=inputs.tpot_s,
                             per_hop_s=inputs.per_hop_s)
        if ttft <= model.ttft_slo_s and tpot <= model.tpot_slo_s:
            return pipelines.plans(chosen, ranges)
    # No degree meets the SLOs: spend no more than one worker on a cold start that is late
    # anyway.
    return pipelines.single()


def nic_fetches(nodes: Mapping[str, NodeState]) -> dict[str, list[Fetch]]:
    """NIC (`NodeState.nic_key`) -> the fetches in flight through it, on all its nodes."""
    on_nic: dict[str, list[Fetch]] = {n.nic_key: [] for n in nodes.values()}
    for node in nodes.values():
        on_nic[node.nic_key].extend(node.fetches)
    return on_nic


def _cached_plan(node: NodeState, model: ModelSpec, num_bytes: int) -> WorkerPlan:
    """One whole-model worker on a node that has the model in its host-memory cache."""
    return WorkerPlan(node_id=node.node_id, stage=0, start_layer=0, end_layer=model.num_layers,
                      gpu_memory_bytes=num_bytes, is_full_size=True, fetch_bytes=0,
                      fetch_bandwidth_bytes_per_s=float(node.nic_bandwidth_bytes_per_s))


def place_fixed_degree(nodes: Mapping[str, NodeState], model: ModelSpec, now: float,
                       inputs: ColdStartInputs, *, degree: int) -> tuple[WorkerPlan, ...] | None:
    """`degree` stages whatever the SLOs say (capped by the model's maximum, its known layer
    boundaries and the nodes with room): for experiments and benchmarks that compare degrees.
    Nodes are picked as `place_pipeline` picks them."""
    pipelines = _Pipelines.of(nodes, model, now)
    if pipelines.head is None:
        return None
    for p in range(min(degree, model.max_pipeline_degree, MAX_DEGREE), 1, -1):
        ranges = model.layer_ranges(p)
        chosen = pipelines.nodes_for(p)
        if ranges is not None and chosen is not None:
            return pipelines.plans(chosen, ranges)
    return pipelines.single()
