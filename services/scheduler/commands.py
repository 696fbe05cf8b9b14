"""Between the bus and the pure policy: bus events -> policy events, policy commands -> bus.

The policy numbers endpoints and workers with ints; on the bus they are their decimal strings.
An event about a worker the policy did not create (a hand-started worker, a non-numeric id)
maps to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from libs.common.messages import (
    ConsolidateCommand,
    Event,
    EventKind,
    Message,
    NodeInfo,
    PipelineStage,
    PlaceWorkerCommand,
    StopWorkerCommand,
)
from libs.common.subjects import command_subject
from services.scheduler import events as policy
from services.scheduler.state import ModelSpec

_NODE_KINDS = (EventKind.NODE_REGISTERED, EventKind.NODE_HEARTBEAT)


@dataclass(frozen=True)
class Outgoing:
    """A command message for one subject of `HS_COMMANDS` (or none), and the event recording
    it (or saying it all: `endpoint.pipeline_ready` is an event only)."""

    event: Event
    subject: str | None = None
    message: Message | None = None
    # also the JetStream message id: a command re-published after a crash is stored once
    command_id: str | None = None


def to_policy_event(event: Event) -> policy.Event | None:
    """The policy's view of a bus event; None for events the policy does not react to."""
    kind = event.kind
    if kind == EventKind.REQUEST_RECEIVED and event.request_id and event.model:
        return policy.RequestArrived(event.request_id, event.model)
    if kind == EventKind.REQUEST_DONE and event.request_id:
        prefill_s, tpot_s = _request_times(event.data)
        return policy.RequestDone(event.request_id, prefill_s=prefill_s, tpot_s=tpot_s)
    if kind == EventKind.REQUEST_EXPIRED and event.request_id:
        return policy.RequestDone(event.request_id)
    if kind in _NODE_KINDS:
        try:
            info = NodeInfo.model_validate(event.data)
        except ValidationError:
            return None
        return policy.NodeHeartbeat(info.node_id, info.gpu_type, info.gpu_memory_bytes,
                                    info.nic_bandwidth_bytes_per_s,
                                    cached=frozenset(info.cached))
    worker_id = _policy_worker_id(event.worker_id)
    if worker_id is None:
        return None
    if kind == EventKind.REQUEST_FIRST_TOKEN and event.request_id:
        return policy.RequestStarted(event.request_id, worker_id)
    if kind == EventKind.WORKER_READY:
        return policy.WorkerReady(worker_id, startup_s=_startup_s(event.data),
                                  capacity=_capacity(event.data))
    if kind == EventKind.WORKER_CONSOLIDATED:
        return policy.WorkerConsolidated(worker_id)
    if kind == EventKind.WORKER_STOPPED:
        return policy.WorkerStopped(worker_id)
    return None


def to_outgoing(command: policy.Command, *, storage_url: str,
                storage_model: str | None = None, epoch: str = "") -> Outgoing | None:
    """The command message and event for a policy command; None if it needs no message."""
    match command:
        case policy.PlaceWorker():
            message = PlaceWorkerCommand(
                is_full_size=command.is_full_size, overlap=command.overlap,
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
                                "gpu_bytes": message.gpu_bytes,
                                "scale_out": command.is_scale_out})
            return Outgoing(event, command_subject("node", command.node_id), message,
                            message.command_id)
        case policy.StopWorker():
            stop = StopWorkerCommand(command_id=f"stop-w{command.worker_id}-{epoch}",
                                     worker_id=str(command.worker_id), node_id=command.node_id)
            event = Event(kind=EventKind.WORKER_STOP_REQUESTED, worker_id=stop.worker_id,
                          node_id=command.node_id)
            return Outgoing(event, command_subject("node", command.node_id), stop,
                            stop.command_id)
        case policy.AnnouncePipeline():
            stages = [PipelineStage(worker_id=str(s.worker_id), node_id=s.node_id,
                                    stage=s.stage, start_layer=s.start_layer,
                                    end_layer=s.end_layer).model_dump()
                      for s in command.stages]
            return Outgoing(Event(kind=EventKind.ENDPOINT_PIPELINE_READY, model=command.model,
                                  endpoint_id=str(command.endpoint_id),
                                  data={"degree": command.degree, "stages": stages}))
        case policy.Consolidate():
            consolidate = ConsolidateCommand(
                command_id=f"consolidate-w{command.worker_id}-{epoch}",
                worker_id=str(command.worker_id), endpoint_id=str(command.endpoint_id),
                node_id=command.node_id, model=command.model, degree=command.degree,
                stages=list(command.stages),
                partial_worker_ids=[str(w) for w in command.partial_worker_ids],
                storage_url=storage_url, storage_model=storage_model)
            event = Event(kind=EventKind.ENDPOINT_CONSOLIDATE, model=command.model,
                          endpoint_id=consolidate.endpoint_id, worker_id=consolidate.worker_id,
                          node_id=command.node_id,
                          data=consolidate.model_dump(mode="json", exclude={"type"}))
            return Outgoing(event, command_subject("node", command.node_id), consolidate,
                            consolidate.command_id)
        case _:
            return None


def model_registered_event(spec: ModelSpec, *, now: float) -> Event:
    """The event recording that the policy was fed `ModelRegistered(spec)` at `now`."""
    data = {"size_bytes": spec.size_bytes, "num_layers": spec.num_layers,
            "kv_cache_bytes": spec.kv_cache_bytes, "ttft_slo_s": spec.ttft_slo_s,
            "tpot_slo_s": spec.tpot_slo_s, "max_pipeline_degree": spec.max_pipeline_degree,
            "keep_alive_s": spec.keep_alive_s,
            # JSON keys are strings: degree -> layer cuts / stage bytes
            "stage_boundaries": {str(d): list(b) for d, b in spec.stage_boundaries.items()},
            "stage_bytes": {str(d): list(b) for d, b in spec.stage_bytes.items()}}
    return Event(kind=EventKind.MODEL_REGISTERED, time=now, model=spec.name, data=data)


def model_spec_of(event: Event) -> ModelSpec | None:
    """The spec a `model.registered` event recorded; None if it is not one or malformed."""
    data = event.data
    if event.kind != EventKind.MODEL_REGISTERED or event.model is None:
        return None
    try:
        return ModelSpec(
            name=event.model, size_bytes=int(data["size_bytes"]),
            num_layers=int(data["num_layers"]), kv_cache_bytes=int(data["kv_cache_bytes"]),
            ttft_slo_s=float(data["ttft_slo_s"]), tpot_slo_s=float(data["tpot_slo_s"]),
            max_pipeline_degree=int(data["max_pipeline_degree"]),
            keep_alive_s=float(data["keep_alive_s"]),
            stage_boundaries={int(d): tuple(int(x) for x in b)
                              for d, b in data.get("stage_boundaries", {}).items()},
            stage_bytes={int(d): tuple(int(x) for x in b)
                         for d, b in data.get("stage_bytes", {}).items()})
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _capacity(data: dict[str, Any]) -> int | None:
    """The requests the worker runs at once, as it reported them; None if it did not."""
    capacity = data.get("capacity")
    return capacity if isinstance(capacity, int) and capacity >= 1 else None


def _startup_s(data: dict[str, Any]) -> float | None:
    """The worker's process start to ready, from its `phases` (see `policy`'s calibration)."""
    phases = data.get("phases")
    if not isinstance(phases, dict):
        return None
    started, ready = phases.get("process_started_at"), phases.get("ready_at")
    if not isinstance(started, int | float) or not isinstance(ready, int | float):
        return None
    return max(0.0, float(ready) - float(started))


def _request_times(data: dict[str, Any]) -> tuple[float | None, float | None]:
    """(prefill_s, tpot_s) of a request.done, from the worker's timings and usage.

    Timings count from the gateway's acceptance (`RequestProgress.timings`): prefill is the
    pull to the first token (ttft_s - queue_s); TPOT the rest spread over the tokens after
    the first.
    """
    queue_s, ttft_s, e2e_s = (data.get(k) for k in ("queue_s", "ttft_s", "e2e_s"))
    if not isinstance(queue_s, int | float) or not isinstance(ttft_s, int | float):
        return None, None
    prefill_s = max(0.0, float(ttft_s) - float(queue_s))
    usage = data.get("usage")
    completion_tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    tpot_s = None
    if (isinstance(e2e_s, int | float) and isinstance(completion_tokens, int)
            and completion_tokens > 1):
        tpot_s = max(0.0, float(e2e_s) - float(ttft_s)) / (completion_tokens - 1)
    return prefill_s, tpot_s


def _policy_worker_id(worker_id: str | None) -> int | None:
    if worker_id is None or not worker_id.isdecimal():
        return None
    return int(worker_id)
