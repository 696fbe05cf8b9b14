"""What the policy reacts to (events) and what it asks the cluster to do (commands).

These are the policy's own values; the service maps bus messages (Pydantic, in `libs/common`)
to events and commands back to messages, so live runs, replay and the simulator share them.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.state import ModelSpec

# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRegistered:
    """A model was registered or its SLOs / keep-alive changed."""

    model: ModelSpec


@dataclass(frozen=True)
class RequestArrived:
    request_id: str
    model: str


@dataclass(frozen=True)
class RequestStarted:
    """A worker took the request from its model's queue."""

    request_id: str
    worker_id: int


@dataclass(frozen=True)
class RequestDone:
    request_id: str
    # measured by the worker that served it (None: not measured, e.g. expired or one token):
    # pull to first token, and seconds per output token after the first
    prefill_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class WorkerReady:
    worker_id: int
    # seconds from the worker's process start to ready (its own phases); None: not reported
    startup_s: float | None = None
    # requests it runs at once (its `capacity`); None: not reported
    capacity: int | None = None


@dataclass(frozen=True)
class WorkerConsolidated:
    """The full-size worker serves the whole model alone; the partial stages can go."""

    worker_id: int


@dataclass(frozen=True)
class WorkerStopped:
    """The node agent reports the worker's process gone (asked to or not)."""

    worker_id: int


@dataclass(frozen=True)
class NodeHeartbeat:
    """A node agent is alive; its first heartbeat registers the node."""

    node_id: str
    gpu_type: str
    gpu_memory_bytes: int
    nic_bandwidth_bytes_per_s: int
    # partitions in the node's host-memory cache, `<model>/<degree>/<stage>`
    cached: frozenset[str] = frozenset()
    # the NIC it shares with other nodes (the GPUs of one server); "": a NIC of its own
    nic_id: str = ""


@dataclass(frozen=True)
class NodeDown:
    """The node is known to be gone (e.g. removed from the cluster), without waiting."""

    node_id: str


@dataclass(frozen=True)
class Tick:
    """Time passed: the moment to expire nodes, scale idle endpoints to zero, retry placements."""


Event = (ModelRegistered | RequestArrived | RequestStarted | RequestDone | WorkerReady
         | WorkerConsolidated | WorkerStopped | NodeHeartbeat | NodeDown | Tick)


# --- commands --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlaceWorker:
    """Start fetching a stage of a model on a node and launch a worker for it."""

    worker_id: int
    endpoint_id: int
    node_id: str
    model: str
    pipeline_degree: int
    stage: int
    start_layer: int
    end_layer: int
    gpu_memory_bytes: int
    is_full_size: bool
    # True: the worker launches at once and loads behind the fetch's watermark; False
    # (`serverless_vllm`): fetch the whole partition, then launch
    overlap: bool = True
    # extra capacity for a model that has an endpoint already (`Policy.scale_out`)
    is_scale_out: bool = False


@dataclass(frozen=True)
class PipelineStage:
    worker_id: int
    node_id: str
    stage: int
    start_layer: int
    end_layer: int


@dataclass(frozen=True)
class AnnouncePipeline:
    """Every stage of a degree > 1 endpoint is ready: the stage-0 worker starts serving."""

    endpoint_id: int
    model: str
    degree: int
    stages: tuple[PipelineStage, ...]


@dataclass(frozen=True)
class Consolidate:
    """Have the full-size (stage-0) worker fetch the other stages and take over the model."""

    endpoint_id: int
    worker_id: int
    node_id: str
    model: str
    degree: int
    # the stages (of the degree-`degree` partitioning) the worker lacks: 1 .. degree - 1
    stages: tuple[int, ...]
    # the workers of those stages, stopped once the worker reports consolidated
    partial_worker_ids: tuple[int, ...]


@dataclass(frozen=True)
class StopWorker:
    worker_id: int
    node_id: str


@dataclass(frozen=True)
class MarkNodeDown:
    node_id: str


@dataclass(frozen=True)
class RequeueRequests:
    """Put the requests a dead worker held back on their model's queue."""

    worker_id: int
    request_ids: tuple[str, ...]


Command = (PlaceWorker | AnnouncePipeline | Consolidate | StopWorker | MarkNodeDown
           | RequeueRequests)
