"""The scheduler's view of the cluster: immutable values the pure policy maps to new values.

Times are seconds on the caller's clock (`now` of `decide`), sizes bytes, bandwidths bytes/s.
The mappings are plain dicts for speed; treat them as read-only: `decide` never mutates the
state it is given and shares unchanged mappings between the old and the new state.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


@dataclass(frozen=True)
class Request:
    request_id: str
    model: str
    arrived_at: float
    # the worker serving it; None while it waits in the model's queue
    worker_id: int | None = None


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
