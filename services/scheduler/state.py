"""The scheduler's view of the cluster: immutable values the pure policy maps to new values.

Times are seconds on the caller's clock (`now` of `decide`), sizes bytes, bandwidths bytes/s.
The mappings are plain dicts for speed; treat them as read-only: `decide` never mutates the
state it is given and shares unchanged mappings between the old and the new state.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from libs.common.db.enums import LIVE_ENDPOINT_STATUSES, EndpointStatus, NodeStatus, WorkerStatus


@dataclass(frozen=True)
class ModelSpec:
    name: str
    size_bytes: int
    num_layers: int
    # KV-cache memory a whole-model worker reserves next to the weights
    kv_cache_bytes: int
    ttft_slo_s: float
    tpot_slo_s: float
    max_pipeline_degree: int
    keep_alive_s: float
    # degree -> the partitioner's layer cuts (0, ..., num_layers), p + 1 of them; a degree
    # > 1 without an entry is no candidate for a pipeline (degree 1 is always (0, num_layers))
    stage_boundaries: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    # degree -> bytes of each stage's partition, where the store said; else size / p a stage
    stage_bytes: Mapping[int, tuple[int, ...]] = field(default_factory=dict)

    def layer_ranges(self, degree: int) -> list[tuple[int, int]] | None:
        """[start, end) of every stage of a degree-`degree` pipeline; None if not known."""
        bounds = (0, self.num_layers) if degree == 1 else self.stage_boundaries.get(degree)
        if bounds is None or len(bounds) != degree + 1:
            return None
        return list(itertools.pairwise(bounds))

    def fetch_bytes(self, degree: int, stage: int) -> int:
        """Bytes stage `stage` of a degree-`degree` pipeline fetches at placement."""
        known = self.stage_bytes.get(degree)
        if degree == 1:
            return self.size_bytes
        if known is not None and len(known) == degree:
            return known[stage]
        return -(-self.size_bytes // degree)


@dataclass(frozen=True)
class StageLayout:
    """The partitioner's stages of one model, for `ModelSpec.stage_boundaries/stage_bytes`."""

    stage_boundaries: Mapping[int, tuple[int, ...]]
    stage_bytes: Mapping[int, tuple[int, ...]]

    @classmethod
    def of(cls, stages: Iterable[tuple[int, int, int, int, int]]) -> StageLayout:
        """From (degree, stage, start_layer, end_layer, num_bytes) of every partition; a
        degree whose stages are not 0..p-1 back to back is left out."""
        by_degree: dict[int, list[tuple[int, int, int, int, int]]] = {}
        for row in stages:
            by_degree.setdefault(row[0], []).append(row)
        boundaries: dict[int, tuple[int, ...]] = {}
        sizes: dict[int, tuple[int, ...]] = {}
        for degree, rows in sorted(by_degree.items()):
            rows.sort(key=lambda r: r[1])
            is_whole = [r[1] for r in rows] == list(range(degree)) and rows[0][2] == 0 and all(
                a[3] == b[2] for a, b in itertools.pairwise(rows))
            if is_whole:
                boundaries[degree] = (0, *(r[3] for r in rows))
                sizes[degree] = tuple(r[4] for r in rows)
        return cls(boundaries, sizes)


@dataclass(frozen=True)
class Fetch:
    """A worker's weights being pulled over its node's NIC since placement."""

    worker_id: int
    num_bytes: int
    # the share of the NIC the fetch was planned with
    bandwidth_bytes_per_s: float
    started_at: float
    # when the bytes must be in for the model's TTFT SLO to hold
    deadline: float

    def remaining_bytes(self, now: float) -> float:
        """Bytes still to come, assuming the fetch has run at its planned bandwidth."""
        return max(0.0, self.num_bytes - self.bandwidth_bytes_per_s * (now - self.started_at))


@dataclass(frozen=True)
class NodeState:
    node_id: str
    gpu_type: str
    gpu_memory_bytes: int
    # gpu_memory_bytes minus what the node's workers (starting, ready or stopping) hold
    free_gpu_memory_bytes: int
    nic_bandwidth_bytes_per_s: int
    state: NodeStatus
    last_heartbeat: float
    # fetches in flight, by worker id order
    fetches: tuple[Fetch, ...] = ()
    # partitions in the node's host-memory cache (`<model>/<degree>/<stage>`, heartbeats)
    cached: frozenset[str] = frozenset()
    # the NIC it shares with other nodes; "": a NIC of its own (`nic_key`)
    nic_id: str = ""

    @property
    def nic_key(self) -> str:
        """Nodes with the same key fetch through one NIC."""
        return self.nic_id or self.node_id

    def holds_model(self, model: str) -> bool:
        """The whole model is in this node's host-memory cache (degree 1, stage 0)."""
        return f"{model}/1/0" in self.cached

    @property
    def is_up(self) -> bool:
        return self.state is NodeStatus.UP


@dataclass(frozen=True)
class EndpointState:
    endpoint_id: int
    model: str
    state: EndpointStatus
    pipeline_degree: int
    created_at: float
    # last arrival or completion of a request of its model: the keep-alive clock
    last_request_at: float

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_ENDPOINT_STATUSES


@dataclass(frozen=True)
class WorkerState:
    worker_id: int
    endpoint_id: int
    node_id: str
    model: str
    stage: int
    start_layer: int
    end_layer: int
    gpu_memory_bytes: int
    # sized for the whole model, so it can survive pipeline consolidation
    is_full_size: bool
    state: WorkerStatus
    created_at: float
    ready_at: float | None = None
    # requests it runs at once, as its WorkerReady reported; None: not known (yet)
    capacity: int | None = None


@dataclass(frozen=True)
class Request:
    request_id: str
    model: str
    arrived_at: float
    # the worker serving it; None while it waits in the model's queue
    worker_id: int | None = None


@dataclass(frozen=True)
class ModelTimings:
    """Measured per-model times of a whole-model worker (moving averages); None: not yet."""

    prefill_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class Calibration:
    """What the cluster has measured so far, to replace the cost model's assumptions.

    Not persisted: a restarted scheduler starts again from the cost model's defaults.
    """

    # the start-up constant: seconds a cold start costs beyond its weight fetch
    startup_s: float | None = None
    models: Mapping[str, ModelTimings] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterState:
    models: Mapping[str, ModelSpec] = field(default_factory=dict)
    nodes: Mapping[str, NodeState] = field(default_factory=dict)
    endpoints: Mapping[int, EndpointState] = field(default_factory=dict)
    workers: Mapping[int, WorkerState] = field(default_factory=dict)
    # requests the scheduler knows of and not done: queued or in flight
    requests: Mapping[str, Request] = field(default_factory=dict)
    # ids the policy gives the next endpoint and worker it creates
    next_endpoint_id: int = 1
    next_worker_id: int = 1
    calibration: Calibration = field(default_factory=Calibration)

    def workers_of(self, endpoint_id: int) -> Iterator[WorkerState]:
        return (w for w in self.workers.values() if w.endpoint_id == endpoint_id)

    def workers_on(self, node_id: str) -> Iterator[WorkerState]:
        return (w for w in self.workers.values() if w.node_id == node_id)

    def requests_of(self, model: str) -> Iterator[Request]:
        return (r for r in self.requests.values() if r.model == model)

    def queued_requests(self, model: str) -> list[Request]:
        """The model's requests no worker has taken, oldest first."""
        queued = (r for r in self.requests_of(model) if r.worker_id is None)
        return sorted(queued, key=lambda r: (r.arrived_at, r.request_id))
