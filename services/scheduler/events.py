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


@dataclass(frozen=True)
class WorkerReady:
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


@dataclass(frozen=True)
class NodeDown:
    """The node is known to be gone (e.g. removed from the cluster), without waiting."""

    node_id: str


@dataclass(frozen=True)
class Tick:
    """Time passed: the moment to expire nodes, scale idle endpoints to zero, retry placements."""


Event = (ModelRegistered | RequestArrived | RequestStarted | RequestDone | WorkerReady
         | WorkerStopped | NodeHeartbeat | NodeDown | Tick)


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


Command = PlaceWorker | StopWorker | MarkNodeDown | RequeueRequests
