"""The scheduler's policy: `decide(state, event, now) -> (state', commands)`, a pure function.

No I/O, no clock, no randomness; every iteration is in id order, so the same state and event
give the same decision whatever order a mapping was built in (live, replayed or reloaded
from Postgres). The service around it applies the commands and persists the new state.

What every policy shares lives in `Policy`: request bookkeeping, worker life cycle, node
heartbeats and failure, keep-alive (scale to zero), pipeline announce and consolidation, and
the calibration of the cost model from measurements. What differs between the baselines
(`POLICIES`) is the placer (`services.scheduler.placement`) and two switches: whether the
fetch overlaps the worker's start-up, and whether pipelines consolidate. Every baseline stops
idle endpoints to make room for a cold start (`evict_idle`, `services.scheduler.eviction`), as
serverless platforms do; switch it off to wait for keep-alive instead. Every baseline also
scales a busy model out to more endpoints and back in (`scale_out`,
`services.scheduler.scaling`).

Calibration: `WorkerReady.startup_s` is the worker's own span from process start to ready.
With overlap the fetch runs inside that span, so the start-up constant of the TTFT formula
(time beyond the fetch) is the span minus the worker's planned fetch time (bytes over the
bandwidth it was placed with); without overlap the process starts after the fetch, so it is
the span itself. `RequestDone.prefill_s` / `tpot_s` count only from requests a whole-model
worker served (a degree-1 endpoint), since the formulas scale a whole worker's times. Each
is a moving average (`PolicyConfig.ema_weight`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from libs.common.db.enums import EndpointStatus, WorkerStatus
from services.scheduler.draft import Draft
from services.scheduler.estimator import (
    ColdStartInputs,
    CostModel,
    moving_average,
    worker_gpu_bytes,
)
from services.scheduler.events import (
    Command,
    Event,
    ModelRegistered,
    NodeDown,
    NodeHeartbeat,
    RequestArrived,
    RequestDone,
    RequestStarted,
    Tick,
    WorkerConsolidated,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.eviction import MemoryBook
from services.scheduler.lifecycle import (
    announce_pipeline,
    on_node_heartbeat,
    on_worker_consolidated,
    on_worker_stopped,
    scale_to_zero,
    start_endpoint,
    take_node_down,
)
from services.scheduler.placement import (
    Placer,
    place_fixed_degree,
    place_pipeline,
    place_single_worker,
)
from services.scheduler.scaling import (
    endpoints_to_scale_in,
    models_to_scale_out,
    needed_endpoints,
    starting_scale_outs,
)
from services.scheduler.state import (
    Calibration,
    ClusterState,
    ModelSpec,
    ModelTimings,
    Request,
    WorkerState,
)


@dataclass(frozen=True)
class PolicyConfig:
    # a node whose last heartbeat is older than this (strictly) is marked down on a tick
    heartbeat_timeout_s: float = 15.0
    # weight of a new measurement in the calibration's moving averages
    ema_weight: float = 0.3
    # requests one endpoint runs at once (its workers' `capacity`, HYDRASERVE_WORKER__CAPACITY)
    endpoint_capacity: int = 8
    # live endpoints one model may have at once when it scales out
    max_endpoints_per_model: int = 4

    def __post_init__(self) -> None:
        if self.endpoint_capacity < 1 or self.max_endpoints_per_model < 1:
            raise ValueError("endpoint_capacity and max_endpoints_per_model must be >= 1")


@dataclass(frozen=True)
class Policy:
    placer: Placer
    config: PolicyConfig = field(default_factory=PolicyConfig)
    # the defaults the calibration replaces once something is measured
    cost: CostModel = field(default_factory=CostModel)
    # launch the worker at placement, loading behind the fetch (False: fetch, then launch)
    overlap: bool = True
    # pipelines consolidate into their full-size worker once every stage is ready
    consolidate: bool = False
    # a cold start with no room stops idle endpoints, least recently used first
    # (`services.scheduler.eviction`); False: it waits for keep-alive to free memory
    evict_idle: bool = True
    # cold starts that can still meet their TTFT SLO go first, earliest deadline first, then
    # the late ones, oldest first; False: oldest first
    deadline_order: bool = True
    # a model whose queued requests outnumber the free slots of its live endpoints gets
    # another endpoint (up to `max_endpoints_per_model`, never by evicting); an extra
    # endpoint its load has not needed for keep-alive is stopped (it drains). False: one
    # endpoint per model
    scale_out: bool = True

    def decide(self, state: ClusterState, event: Event,
               now: float) -> tuple[ClusterState, list[Command]]:
        draft = Draft(state)
        match event:
            case ModelRegistered(model=model):
                draft.models[model.name] = model
            case RequestArrived():
                _on_request_arrived(draft, event, now,
                                    default_capacity=self.config.endpoint_capacity)
            case RequestStarted():
                _on_request_started(draft, event)
            case RequestDone():
                self._calibrate_request(draft, event)
                _on_request_done(draft, event, now, default_capacity=self.config.endpoint_capacity)
            case WorkerReady():
                self._on_worker_ready(draft, event, now)
            case WorkerConsolidated():
                on_worker_consolidated(draft, event)
            case WorkerStopped():
                on_worker_stopped(draft, event)
            case NodeHeartbeat():
                on_node_heartbeat(draft, event, now)
            case NodeDown(node_id=node_id):
                take_node_down(draft, node_id)
            case Tick():
                self._on_tick(draft, now)
        # Any event may have freed memory or added demand: deferred cold starts retry here.
        self._place_queued(draft, now)
        return draft.freeze(), draft.commands

    def _on_tick(self, draft: Draft, now: float) -> None:
        for node in sorted(draft.nodes.values(), key=lambda n: n.node_id):
            if node.is_up and now - node.last_heartbeat > self.config.heartbeat_timeout_s:
                take_node_down(draft, node.node_id)
        for endpoint in sorted(draft.endpoints.values(), key=lambda e: e.endpoint_id):
            model = draft.models[endpoint.model]
            is_idle = not any(r.model == model.name for r in draft.requests.values())
            if (endpoint.is_live and is_idle
                    and now - endpoint.last_request_at >= model.keep_alive_s):
                scale_to_zero(draft, endpoint)
        if self.scale_out:
            for endpoint in endpoints_to_scale_in(
                    draft, now, default_capacity=self.config.endpoint_capacity):
                scale_to_zero(draft, endpoint)

    def _on_worker_ready(self, draft: Draft, event: WorkerReady, now: float) -> None:
        worker = draft.workers.get(event.worker_id)
        if worker is None or worker.state is not WorkerStatus.STARTING:
            return
        if event.startup_s is not None:
            self._calibrate_startup(draft, worker, event.startup_s)
        draft.workers[worker.worker_id] = replace(worker, state=WorkerStatus.READY, ready_at=now,
                                                  capacity=event.capacity)
        draft.end_fetch(worker)
        endpoint = draft.endpoints[worker.endpoint_id]
        siblings = draft.workers_of(endpoint.endpoint_id)
        if (endpoint.state is not EndpointStatus.STARTING
                or any(w.state is not WorkerStatus.READY for w in siblings)):
            return
        draft.endpoints[endpoint.endpoint_id] = replace(endpoint, state=EndpointStatus.READY)
        if endpoint.pipeline_degree > 1:
            announce_pipeline(draft, endpoint, siblings, consolidate=self.consolidate)

    def _calibrate_startup(self, draft: Draft, worker: WorkerState, startup_s: float) -> None:
        overlapped_s = 0.0
        if self.overlap:
            fetch = next((f for f in draft.nodes[worker.node_id].fetches
                          if f.worker_id == worker.worker_id), None)
            if fetch is None or fetch.bandwidth_bytes_per_s <= 0:
                return  # the fetch's share of the span is unknown
            overlapped_s = fetch.num_bytes / fetch.bandwidth_bytes_per_s
        calibration = draft.calibration
        draft.calibration = replace(calibration, startup_s=moving_average(
            calibration.startup_s, max(0.0, startup_s - overlapped_s),
            weight=self.config.ema_weight))

    def _calibrate_request(self, draft: Draft, event: RequestDone) -> None:
        request = draft.requests.get(event.request_id)
        worker = None if request is None or request.worker_id is None else (
            draft.workers.get(request.worker_id))
        if (worker is None or draft.endpoints[worker.endpoint_id].pipeline_degree != 1
                or (event.prefill_s is None and event.tpot_s is None)):
            return
        calibration = draft.calibration
        timings = calibration.models.get(worker.model, ModelTimings())
        weight = self.config.ema_weight
        if event.prefill_s is not None:
            timings = replace(timings, prefill_s=moving_average(
                timings.prefill_s, event.prefill_s, weight=weight))
        if event.tpot_s is not None:
            timings = replace(timings, tpot_s=moving_average(
                timings.tpot_s, event.tpot_s, weight=weight))
        draft.calibration = replace(calibration,
                                    models={**calibration.models, worker.model: timings})

    def cold_start_inputs(self, calibration: Calibration, model: str, *,
                          queue_wait_s: float) -> ColdStartInputs:
        """The estimates' inputs: what was measured, else the cost model's defaults."""
        timings = calibration.models.get(model, ModelTimings())
        return ColdStartInputs(
            startup_s=_measured_or(calibration.startup_s, self.cost.startup_s),
            prefill_s=_measured_or(timings.prefill_s, self.cost.prefill_s),
            tpot_s=_measured_or(timings.tpot_s, self.cost.tpot_s),
            per_hop_s=self.cost.per_hop_s, queue_wait_s=queue_wait_s)

    def _queue_key(self, model: ModelSpec, oldest: float,
                   now: float) -> tuple[bool, float, str]:
        """Where a model waiting for a cold start stands in the queue; `oldest`: the arrival
        of its oldest queued request."""
        deadline = oldest + model.ttft_slo_s
        if not self.deadline_order:
            return False, oldest, model.name
        is_late = deadline < now
        return is_late, oldest if is_late else deadline, model.name

    def _place_queued(self, draft: Draft, now: float) -> None:
        """Cold-start every model with queued requests and no live endpoint, in `_queue_key`
        order; with `evict_idle`, stop idle endpoints for the ones that find no room. Then,
        with `scale_out`, give another endpoint to each model whose queued requests outnumber
        its live endpoints' free slots, where one fits without evicting."""
        oldest: dict[str, float] = {}
        for request in draft.requests.values():
            if request.worker_id is None:
                oldest[request.model] = min(request.arrived_at,
                                            oldest.get(request.model, request.arrived_at))
        live_models = {e.model for e in draft.endpoints.values() if e.is_live}
        cold = sorted(oldest.keys() - live_models,
                      key=lambda m: self._queue_key(draft.models[m], oldest[m], now))
        book: MemoryBook | None = None
        is_cold_start_waiting = False
        if cold and self.scale_out:
            # a cold start comes before extra capacity: scale-outs still starting give way
            # (their fetches stop sharing links with it, their memory comes free)
            for endpoint in starting_scale_outs(draft):
                scale_to_zero(draft, endpoint)
        for name in cold:
            if book is None:
                book = MemoryBook(draft.freeze(), may_evict=self.evict_idle)
            is_cold_start_waiting |= not self._place(draft, book, name, now,
                                                     queued_since=oldest[name])
        # Scale-outs take only what no cold start wants: none waits and no fetch is in
        # flight anywhere (a fetch shares its node's NIC and its storage node's egress, the
        # one the policy cannot see). Requests of a model with an endpoint get a slot there
        # sooner or later; a cold start's requests have nowhere else to go.
        if (not self.scale_out or is_cold_start_waiting
                or any(node.fetches for node in draft.nodes.values())):
            return
        for name in sorted(models_to_scale_out(
                draft, oldest.keys() & live_models,
                default_capacity=self.config.endpoint_capacity,
                max_endpoints=self.config.max_endpoints_per_model),
                key=lambda m: self._queue_key(draft.models[m], oldest[m], now)):
            if book is None:
                book = MemoryBook(draft.freeze(), may_evict=self.evict_idle)
            self._place(draft, book, name, now, queued_since=oldest[name], is_scale_out=True)

    def _place(self, draft: Draft, book: MemoryBook, name: str, now: float, *,
               queued_since: float, is_scale_out: bool = False) -> bool:
        """Start an endpoint of `name` now if there is room (stopping victims for a cold
        start, never for a scale-out); whether it started."""
        model = draft.models[name]
        inputs = self.cold_start_inputs(draft.calibration, name,
                                        queue_wait_s=max(0.0, now - queued_since))
        room = book.make_room(
            functools.partial(self.placer, model=model, now=now, inputs=inputs),
            worker_bytes=worker_gpu_bytes(size_bytes=model.size_bytes,
                                          kv_cache_bytes=model.kv_cache_bytes, degree=1,
                                          is_full_size=True),
            may_wait=not is_scale_out)
        for victim in room.victims:
            scale_to_zero(draft, draft.endpoints[victim.endpoint_id])
        if not room.is_now or room.plans is None:
            return False
        start_endpoint(draft, model, room.plans, now, overlap=self.overlap,
                       is_scale_out=is_scale_out)
        book.update(draft.nodes.view)
        return True


def _on_request_arrived(draft: Draft, event: RequestArrived, now: float, *,
                        default_capacity: int) -> None:
    # Unknown models are the gateway's to refuse; a redelivered arrival changes nothing.
    if event.model not in draft.models or event.request_id in draft.requests:
        return
    draft.requests[event.request_id] = Request(event.request_id, event.model, arrived_at=now)
    _touch_endpoints(draft, event.model, now, default_capacity=default_capacity)


def _on_request_started(draft: Draft, event: RequestStarted) -> None:
    request = draft.requests.get(event.request_id)
    worker = draft.workers.get(event.worker_id)
    if request is not None and worker is not None and worker.model == request.model:
        draft.requests[request.request_id] = replace(request, worker_id=worker.worker_id)


def _on_request_done(draft: Draft, event: RequestDone, now: float, *,
                     default_capacity: int) -> None:
    if event.request_id in draft.requests:
        _touch_endpoints(draft, draft.requests.pop(event.request_id).model, now,
                         default_capacity=default_capacity)


def _measured_or(measured: float | None, default: float) -> float:
    return default if measured is None else measured


def _touch_endpoints(draft: Draft, model: str, now: float, *, default_capacity: int) -> None:
    """Restart the keep-alive clock of the model's live endpoints that its requests need
    (`scaling.needed_endpoints`): the oldest always, a later one only while the ones before
    it cannot run them all, so an extra endpoint's clock runs out once its load has gone."""
    for endpoint in needed_endpoints(draft, model, default_capacity=default_capacity):
        draft.endpoints[endpoint.endpoint_id] = replace(endpoint, last_request_at=now)


# The baselines of DESIGN.md, on the same core.
# `serverless_vllm`: one whole-model worker; fetch, then start, then load.
SERVERLESS_VLLM = Policy(placer=place_single_worker, overlap=False)
# `single_worker`: p = 1 with every start-up stage overlapping the fetch.
SINGLE_WORKER = Policy(placer=place_single_worker)
# `hydraserve`: SLO-aware p <= 4, one full-size stage-0 worker, consolidation.
HYDRASERVE = Policy(placer=place_pipeline, consolidate=True)

POLICIES: dict[str, Policy] = {"serverless_vllm": SERVERLESS_VLLM,
                               "single_worker": SINGLE_WORKER, "hydraserve": HYDRASERVE}
DEFAULT_POLICY = "hydraserve"


def build_policy(name: str, *, degree: int | None = None, heartbeat_timeout_s: float = 15.0,
                 max_endpoints: int = PolicyConfig.max_endpoints_per_model,
                 capacity: int = PolicyConfig.endpoint_capacity, consolidate: bool = True,
                 evict: bool = True) -> Policy:
    """The policy the scheduler runs with `--policy name [--degree N] [--max-endpoints N]
    [--no-consolidate] [--no-evict]` and workers of `capacity`: its `__main__`, and event
    replay (which must decide as it did). ValueError names a flag that does not fit."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; one of {', '.join(sorted(POLICIES))}")
    if max_endpoints < 1:
        raise ValueError("--max-endpoints must be at least 1")
    chosen = replace(
        POLICIES[name], scale_out=max_endpoints > 1,
        config=PolicyConfig(heartbeat_timeout_s=heartbeat_timeout_s, endpoint_capacity=capacity,
                            max_endpoints_per_model=max_endpoints))
    if degree is not None:
        if name != "hydraserve":
            raise ValueError("--degree goes with --policy hydraserve")
        chosen = replace(chosen, placer=functools.partial(place_fixed_degree, degree=degree))
    if not consolidate:
        chosen = replace(chosen, consolidate=False)
    if not evict:
        chosen = replace(chosen, evict_idle=False)
    return chosen


def decide(state: ClusterState, event: Event, now: float) -> tuple[ClusterState, list[Command]]:
    """The default policy (single worker) on one event."""
    return SINGLE_WORKER.decide(state, event, now)
