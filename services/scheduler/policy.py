"""The scheduler's policy: `decide(state, event, now) -> (state', commands)`, a pure function.

No I/O, no clock, no randomness; every iteration is in id order, so the same state and event
give the same decision whatever order a mapping was built in (live, replayed or reloaded
from Postgres). The service around it applies the commands and persists the new state.

What every policy shares lives in `Policy`: request bookkeeping, worker life cycle, node
heartbeats and failure, keep-alive (scale to zero). What differs between baselines is the
placer (`services.scheduler.placement`): `single_worker` here; the SLO-aware pipeline placer
is another `Policy(placer=...)` with the same `decide` signature.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from libs.common.db.enums import EndpointStatus, NodeStatus, WorkerStatus
from services.scheduler.draft import Draft
from services.scheduler.events import (
    Command,
    Event,
    MarkNodeDown,
    ModelRegistered,
    NodeDown,
    NodeHeartbeat,
    PlaceWorker,
    RequestArrived,
    RequestDone,
    RequestStarted,
    RequeueRequests,
    StopWorker,
    Tick,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.placement import Placer, WorkerPlan, place_single_worker
from services.scheduler.state import (
    ClusterState,
    EndpointState,
    Fetch,
    ModelSpec,
    NodeState,
    Request,
    WorkerState,
)


@dataclass(frozen=True)
class PolicyConfig:
    # a node whose last heartbeat is older than this (strictly) is marked down on a tick
    heartbeat_timeout_s: float = 15.0


@dataclass(frozen=True)
class Policy:
    placer: Placer
    config: PolicyConfig = field(default_factory=PolicyConfig)

    def decide(self, state: ClusterState, event: Event,
               now: float) -> tuple[ClusterState, list[Command]]:
        draft = Draft(state)
        match event:
            case ModelRegistered(model=model):
                draft.models[model.name] = model
            case RequestArrived():
                _on_request_arrived(draft, event, now)
            case RequestStarted():
                _on_request_started(draft, event)
            case RequestDone():
                _on_request_done(draft, event, now)
            case WorkerReady():
                _on_worker_ready(draft, event, now)
            case WorkerStopped():
                _on_worker_stopped(draft, event)
            case NodeHeartbeat():
                _on_node_heartbeat(draft, event, now)
            case NodeDown(node_id=node_id):
                _take_node_down(draft, node_id)
            case Tick():
                self._on_tick(draft, now)
        # Any event may have freed memory or added demand: deferred cold starts retry here.
        self._place_queued(draft, now)
        return draft.freeze(), draft.commands

    def _on_tick(self, draft: Draft, now: float) -> None:
        for node in sorted(draft.nodes.values(), key=lambda n: n.node_id):
            if node.is_up and now - node.last_heartbeat > self.config.heartbeat_timeout_s:
                _take_node_down(draft, node.node_id)
        for endpoint in sorted(draft.endpoints.values(), key=lambda e: e.endpoint_id):
            model = draft.models[endpoint.model]
            is_idle = not any(r.model == model.name for r in draft.requests.values())
            if (endpoint.is_live and is_idle
                    and now - endpoint.last_request_at >= model.keep_alive_s):
                _scale_to_zero(draft, endpoint)

    def _place_queued(self, draft: Draft, now: float) -> None:
        """Cold-start every model with queued requests and no live endpoint, oldest first."""
        oldest: dict[str, float] = {}
        for request in draft.requests.values():
            if request.worker_id is None:
                oldest[request.model] = min(request.arrived_at,
                                            oldest.get(request.model, request.arrived_at))
        live_models = {e.model for e in draft.endpoints.values() if e.is_live}
        for name in sorted(oldest.keys() - live_models, key=lambda m: (oldest[m], m)):
            model = draft.models[name]
            plans = self.placer(draft.nodes.view, model, now)
            if plans is not None:
                _start_endpoint(draft, model, plans, now)


def _on_request_arrived(draft: Draft, event: RequestArrived, now: float) -> None:
    # Unknown models are the gateway's to refuse; a redelivered arrival changes nothing.
    if event.model not in draft.models or event.request_id in draft.requests:
        return
    draft.requests[event.request_id] = Request(event.request_id, event.model, arrived_at=now)
    _touch_endpoints(draft, event.model, now)


def _on_request_started(draft: Draft, event: RequestStarted) -> None:
    request = draft.requests.get(event.request_id)
    worker = draft.workers.get(event.worker_id)
    if request is not None and worker is not None and worker.model == request.model:
        draft.requests[request.request_id] = replace(request, worker_id=worker.worker_id)


def _on_request_done(draft: Draft, event: RequestDone, now: float) -> None:
    if event.request_id in draft.requests:
        _touch_endpoints(draft, draft.requests.pop(event.request_id).model, now)


def _on_worker_ready(draft: Draft, event: WorkerReady, now: float) -> None:
    worker = draft.workers.get(event.worker_id)
    if worker is None or worker.state is not WorkerStatus.STARTING:
        return
    draft.workers[worker.worker_id] = replace(worker, state=WorkerStatus.READY, ready_at=now)
    draft.end_fetch(worker)
    endpoint = draft.endpoints[worker.endpoint_id]
    siblings = draft.workers_of(endpoint.endpoint_id)
    if (endpoint.state is EndpointStatus.STARTING
            and all(w.state is WorkerStatus.READY for w in siblings)):
        draft.endpoints[endpoint.endpoint_id] = replace(endpoint, state=EndpointStatus.READY)


def _on_worker_stopped(draft: Draft, event: WorkerStopped) -> None:
    worker = draft.workers.get(event.worker_id)
    if worker is None:
        return
    draft.remove_worker(worker.worker_id)
    if worker.state is WorkerStatus.STOPPING:
        _retire_if_empty(draft, worker.endpoint_id)
    else:
        # it died on its own: the endpoint cannot serve without it
        _break_endpoint(draft, worker.endpoint_id, lost_worker_ids=[worker.worker_id])


def _on_node_heartbeat(draft: Draft, event: NodeHeartbeat, now: float) -> None:
    node = draft.nodes.get(event.node_id)
    used = 0 if node is None else node.gpu_memory_bytes - node.free_gpu_memory_bytes
    fetches = () if node is None else node.fetches
    draft.nodes[event.node_id] = NodeState(
        node_id=event.node_id, gpu_type=event.gpu_type, gpu_memory_bytes=event.gpu_memory_bytes,
        free_gpu_memory_bytes=event.gpu_memory_bytes - used,
        nic_bandwidth_bytes_per_s=event.nic_bandwidth_bytes_per_s, state=NodeStatus.UP,
        last_heartbeat=now, fetches=fetches)


def _take_node_down(draft: Draft, node_id: str) -> None:
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
        _break_endpoint(draft, endpoint_id,
                        lost_worker_ids=[w.worker_id for w in lost if w.endpoint_id == endpoint_id])
    draft.nodes[node_id] = replace(draft.nodes[node_id], state=NodeStatus.DOWN,
                                   free_gpu_memory_bytes=node.gpu_memory_bytes, fetches=())


def _break_endpoint(draft: Draft, endpoint_id: int, *, lost_worker_ids: list[int]) -> None:
    """Requeue the lost workers' requests and stop what is left of their endpoint."""
    for worker_id in lost_worker_ids:
        _requeue(draft, worker_id)
    for worker in draft.workers_of(endpoint_id):
        _requeue(draft, worker.worker_id)
        _stop_worker(draft, worker)
    endpoint = draft.endpoints[endpoint_id]
    draft.endpoints[endpoint_id] = replace(endpoint, state=EndpointStatus.DRAINING)
    _retire_if_empty(draft, endpoint_id)


def _scale_to_zero(draft: Draft, endpoint: EndpointState) -> None:
    for worker in draft.workers_of(endpoint.endpoint_id):
        _stop_worker(draft, worker)
    draft.endpoints[endpoint.endpoint_id] = replace(endpoint, state=EndpointStatus.DRAINING)
    _retire_if_empty(draft, endpoint.endpoint_id)


def _stop_worker(draft: Draft, worker: WorkerState) -> None:
    # Its memory stays reserved until WorkerStopped (the process may still hold it); the
    # node agent cancels its fetch, if any, right away.
    if worker.state is not WorkerStatus.STOPPING:
        draft.commands.append(StopWorker(worker.worker_id, worker.node_id))
        draft.workers[worker.worker_id] = replace(worker, state=WorkerStatus.STOPPING)
        draft.end_fetch(worker)


def _requeue(draft: Draft, worker_id: int) -> None:
    held = sorted(r.request_id for r in draft.requests.values() if r.worker_id == worker_id)
    for request_id in held:
        draft.requests[request_id] = replace(draft.requests[request_id], worker_id=None)
    if held:
        draft.commands.append(RequeueRequests(worker_id, tuple(held)))


def _retire_if_empty(draft: Draft, endpoint_id: int) -> None:
    if not draft.workers_of(endpoint_id):
        draft.endpoints.pop(endpoint_id)


def _touch_endpoints(draft: Draft, model: str, now: float) -> None:
    for endpoint in list(draft.endpoints.values()):
        if endpoint.model == model and endpoint.is_live:
            draft.endpoints[endpoint.endpoint_id] = replace(endpoint, last_request_at=now)


def _start_endpoint(draft: Draft, model: ModelSpec, plans: tuple[WorkerPlan, ...],
                    now: float) -> None:
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
                      deadline=now + model.ttft_slo_s)
        draft.add_worker(worker, fetch)
        draft.commands.append(PlaceWorker(
            worker_id=worker_id, endpoint_id=endpoint_id, node_id=plan.node_id,
            model=model.name, pipeline_degree=len(plans), stage=plan.stage,
            start_layer=plan.start_layer, end_layer=plan.end_layer,
            gpu_memory_bytes=plan.gpu_memory_bytes, is_full_size=plan.is_full_size))


# The `single_worker` baseline: p = 1, whole-model workers.
SINGLE_WORKER = Policy(placer=place_single_worker)


def decide(state: ClusterState, event: Event, now: float) -> tuple[ClusterState, list[Command]]:
    """The default policy (single worker) on one event."""
    return SINGLE_WORKER.decide(state, event, now)
