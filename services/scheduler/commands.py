"""Between the bus and the pure policy: bus events -> policy events, policy commands -> bus.

The policy numbers endpoints and workers with ints; on the bus they are their decimal strings.
An event about a worker the policy did not create (a hand-started worker, a non-numeric id)
maps to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from libs.common.messages import (
    Event,
    EventKind,
    Message,
    NodeInfo,
    PlaceWorkerCommand,
    StopWorkerCommand,
)
from libs.common.subjects import command_subject
from services.scheduler import events as policy

_REQUEST_DONE_KINDS = (EventKind.REQUEST_DONE, EventKind.REQUEST_EXPIRED)
_NODE_KINDS = (EventKind.NODE_REGISTERED, EventKind.NODE_HEARTBEAT)


@dataclass(frozen=True)
class Outgoing:
    """A command message for one subject of `HS_COMMANDS`, and the event recording it."""

    subject: str
    message: Message
    # also the JetStream message id: a command re-published after a crash is stored once
    command_id: str
    event: Event


def to_policy_event(event: Event) -> policy.Event | None:
    """The policy's view of a bus event; None for events the policy does not react to."""
    kind = event.kind
    if kind == EventKind.REQUEST_RECEIVED and event.request_id and event.model:
        return policy.RequestArrived(event.request_id, event.model)
    if kind in _REQUEST_DONE_KINDS and event.request_id:
        return policy.RequestDone(event.request_id)
    if kind in _NODE_KINDS:
        try:
            info = NodeInfo.model_validate(event.data)
        except ValidationError:
            return None
        return policy.NodeHeartbeat(info.node_id, info.gpu_type, info.gpu_memory_bytes,
                                    info.nic_bandwidth_bytes_per_s)
    worker_id = _policy_worker_id(event.worker_id)
    if worker_id is None:
        return None
    if kind == EventKind.REQUEST_FIRST_TOKEN and event.request_id:
        return policy.RequestStarted(event.request_id, worker_id)
    if kind == EventKind.WORKER_READY:
        return policy.WorkerReady(worker_id)
    if kind == EventKind.WORKER_STOPPED:
        return policy.WorkerStopped(worker_id)
    return None


def to_outgoing(command: policy.Command, *, storage_url: str,
                storage_model: str | None = None, epoch: str = "") -> Outgoing | None:
    """The command message and event for a policy command; None if it needs no message."""
    match command:
        case policy.PlaceWorker():
            message = PlaceWorkerCommand(
                command_id=f"place-w{command.worker_id}-{epoch}", worker_id=str(command.worker_id),
                endpoint_id=str(command.endpoint_id), node_id=command.node_id,
                model=command.model, degree=command.pipeline_degree, stage=command.stage,
                start_layer=command.start_layer, end_layer=command.end_layer,
                gpu_bytes=command.gpu_memory_bytes, storage_url=storage_url,
                storage_model=storage_model)
            event = Event(kind=EventKind.WORKER_PLACED, model=command.model,
                          endpoint_id=message.endpoint_id, worker_id=message.worker_id,
                          node_id=command.node_id,
                          data={"degree": message.degree, "stage": message.stage,
                                "start_layer": message.start_layer,
                                "end_layer": message.end_layer,
                                "gpu_bytes": message.gpu_bytes})
            return Outgoing(command_subject("node", command.node_id), message,
                            message.command_id, event)
        case policy.StopWorker():
            stop = StopWorkerCommand(command_id=f"stop-w{command.worker_id}-{epoch}",
                                     worker_id=str(command.worker_id), node_id=command.node_id)
            event = Event(kind=EventKind.WORKER_STOP_REQUESTED, worker_id=stop.worker_id,
                          node_id=command.node_id)
            return Outgoing(command_subject("node", command.node_id), stop, stop.command_id,
                            event)
        case _:
            return None


def _policy_worker_id(worker_id: str | None) -> int | None:
    if worker_id is None or not worker_id.isdecimal():
        return None
    return int(worker_id)
