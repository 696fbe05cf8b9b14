"""The life cycle of endpoints, workers and nodes in the policy's draft: what a placement,
a pipeline announcement, a consolidation, a stop or a lost node does to the state.

Pure functions of the draft (`services.scheduler.draft`), used by `Policy.decide`; each
appends the commands its change needs.
"""

from __future__ import annotations

import math
from dataclasses import replace

from libs.common.db.enums import EndpointStatus, NodeStatus, WorkerStatus
from services.scheduler.draft import Draft
from services.scheduler.events import (
    AnnouncePipeline,
    Consolidate,
    MarkNodeDown,
    NodeHeartbeat,
    PipelineStage,
    PlaceWorker,
    RequeueRequests,
    StopWorker,
    WorkerConsolidated,
    WorkerStopped,
)
from services.scheduler.placement import WorkerPlan
from services.scheduler.state import (
    EndpointState,
    Fetch,
    ModelSpec,
    NodeState,
    WorkerState,
)


def announce_pipeline(draft: Draft, endpoint: EndpointState, workers: list[WorkerState], *,
                      consolidate: bool) -> None:
    """Every stage is ready: the pipeline serves; its full-size worker starts consolidating."""
    workers = sorted(workers, key=lambda w: w.stage)
    draft.commands.append(AnnouncePipeline(
        endpoint_id=endpoint.endpoint_id, model=endpoint.model, degree=endpoint.pipeline_degree,
        stages=tuple(PipelineStage(worker_id=w.worker_id, node_id=w.node_id, stage=w.stage,
                                   start_layer=w.start_layer, end_layer=w.end_layer)
                     for w in workers)))
    head = workers[0]
    if consolidate and head.is_full_size:
        partials = workers[1:]
        draft.commands.append(Consolidate(
            endpoint_id=endpoint.endpoint_id, worker_id=head.worker_id, node_id=head.node_id,
            model=endpoint.model, degree=endpoint.pipeline_degree,
            stages=tuple(w.stage for w in partials),
            partial_worker_ids=tuple(w.worker_id for w in partials)))


def on_worker_consolidated(draft: Draft, event: WorkerConsolidated) -> None:
    """The full-size worker serves the whole model: the endpoint is one worker again."""
    worker = draft.workers.get(event.worker_id)
    if (worker is None or not worker.is_full_size or worker.state is not WorkerStatus.READY
            or not draft.endpoints[worker.endpoint_id].is_live):
        return
    endpoint = draft.endpoints[worker.endpoint_id]
    if endpoint.pipeline_degree == 1:
        return  # a repeated report
    draft.workers[worker.worker_id] = replace(
        worker, start_layer=0, end_layer=draft.models[worker.model].num_layers)
    draft.endpoints[endpoint.endpoint_id] = replace(endpoint, pipeline_degree=1)
    for partial in draft.workers_of(endpoint.endpoint_id):
        if partial.worker_id != worker.worker_id:
            requeue(draft, partial.worker_id)
            stop_worker(draft, partial)


def on_worker_stopped(draft: Draft, event: WorkerStopped) -> None:
    worker = draft.workers.get(event.worker_id)
    if worker is None:
        return
    draft.remove_worker(worker.worker_id)
    if worker.state is WorkerStatus.STOPPING:
        retire_if_empty(draft, worker.endpoint_id)
    else:
        # it died on its own: the endpoint cannot serve without it
        break_endpoint(draft, worker.endpoint_id, lost_worker_ids=[worker.worker_id])


def on_node_heartbeat(draft: Draft, event: NodeHeartbeat, now: float) -> None:
    node = draft.nodes.get(event.node_id)
    used = 0 if node is None else node.gpu_memory_bytes - node.free_gpu_memory_bytes
    fetches = () if node is None else node.fetches
    draft.nodes[event.node_id] = NodeState(
        node_id=event.node_id, gpu_type=event.gpu_type, gpu_memory_bytes=event.gpu_memory_bytes,
        free_gpu_memory_bytes=event.gpu_memory_bytes - used,
        nic_bandwidth_bytes_per_s=event.nic_bandwidth_bytes_per_s, state=NodeStatus.UP,
        last_heartbeat=now, fetches=fetches, cached=event.cached, nic_id=event.nic_id)


def take_node_down(draft: Draft, node_id: str) -> None:
    """Mark the node down; its workers are gone, their endpoints broken."""
    node = draft.nodes.get(node_id)
    if node is None or not node.is_up:
        return
    draft.commands.append(MarkNodeDown(node_id))
    lost = sorted((w for w in draft.workers.values() if w.node_id == node_id),
                  key=lambda w: w.worker_id)
    for worker in lost:
        draft.remove_worker(worker.worker_id)
    for endpoint_id in sorted({w.endpoint_id for w in lost}):
        break_endpoint(draft, endpoint_id,
                       lost_worker_ids=[w.worker_id for w in lost if w.endpoint_id == endpoint_id])
    draft.nodes[node_id] = replace(draft.nodes[node_id], state=NodeStatus.DOWN,
                                   free_gpu_memory_bytes=node.gpu_memory_bytes, fetches=())


def break_endpoint(draft: Draft, endpoint_id: int, *, lost_worker_ids: list[int]) -> None:
    """Requeue the lost workers' requests and stop what is left of their endpoint."""
    for worker_id in lost_worker_ids:
        requeue(draft, worker_id)
    for worker in draft.workers_of(endpoint_id):
        requeue(draft, worker.worker_id)
        stop_worker(draft, worker)
    endpoint = draft.endpoints[endpoint_id]
    draft.endpoints[endpoint_id] = replace(endpoint, state=EndpointStatus.DRAINING)
    retire_if_empty(draft, endpoint_id)


def scale_to_zero(draft: Draft, endpoint: EndpointState) -> None:
    for worker in draft.workers_of(endpoint.endpoint_id):
        stop_worker(draft, worker)
    draft.endpoints[endpoint.endpoint_id] = replace(endpoint, state=EndpointStatus.DRAINING)
    retire_if_empty(draft, endpoint.endpoint_id)


def stop_worker(draft: Draft, worker: WorkerState) -> None:
    # Its memory stays reserved until WorkerStopped (the process may still hold it); the
    # node agent cancels its fetch, if any, right away.
    if worker.state is not WorkerStatus.STOPPING:
        draft.commands.append(StopWorker(worker.worker_id, worker.node_id))
        draft.workers[worker.worker_id] = replace(worker, state=WorkerStatus.STOPPING)
        draft.end_fetch(worker)


def requeue(draft: Draft, worker_id: int) -> None:
    held = sorted(r.request_id for r in draft.requests.values() if r.worker_id == worker_id)
    for request_id in held:
        draft.requests[request_id] = replace(draft.requests[request_id], worker_id=None)
    if held:
        draft.commands.append(RequeueRequests(worker_id, tuple(held)))


def retire_if_empty(draft: Draft, endpoint_id: int) -> None:
    if not draft.workers_of(endpoint_id):
        draft.endpoints.pop(endpoint_id)


def start_endpoint(draft: Draft, model: ModelSpec, plans: tuple[WorkerPlan, ...],
                   now: float, *, overlap: bool, is_scale_out: bool = False) -> None:
    """A scale-out's fetches carry no deadline: they are extra capacity, so they never make
    a node unavailable to a cold start (whose requests have nowhere else to go)."""
    endpoint_id = draft.new_endpoint_id()
    draft.endpoints[endpoint_id] = EndpointState(
        endpoint_id=endpoint_id, model=model.name, state=EndpointStatus.STARTING,
        pipeline_degree=len(plans), created_at=now, last_request_at=now)
    for plan in plans:
        worker_id = draft.new_worker_id()
        worker = WorkerState(
            worker_id=worker_id, endpoint_id=endpoint_id, node_id=plan.node_id, model=model.name,
            stage=plan.stage, start_layer=plan.start_layer, end_layer=plan.end_layer,
            gpu_memory_bytes=plan.gpu_memory_bytes, is_full_size=plan.is_full_size,
            state=WorkerStatus.STARTING, created_at=now)
        # the bytes must be in by the time the SLO allows for the first token
        fetch = Fetch(worker_id=worker_id, num_bytes=plan.fetch_bytes,
                      bandwidth_bytes_per_s=plan.fetch_bandwidth_bytes_per_s, started_at=now,
                      deadline=math.inf if is_scale_out else now + model.ttft_slo_s)
        draft.add_worker(worker, fetch)
        draft.commands.append(PlaceWorker(
            worker_id=worker_id, endpoint_id=endpoint_id, node_id=plan.node_id,
            model=model.name, pipeline_degree=len(plans), stage=plan.stage,
            start_layer=plan.start_layer, end_layer=plan.end_layer,
            gpu_memory_bytes=plan.gpu_memory_bytes, is_full_size=plan.is_full_size,
            overlap=overlap, is_scale_out=is_scale_out))
