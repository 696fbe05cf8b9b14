"""Serving in the simulation: queues per model, endpoints taking requests, token timings.

An endpoint the policy marks READY takes its model's queued requests, oldest first, up to
`max_batch` at once; batching slows nothing down, except that with `batch_prefill` the
requests taken at one instant share one prefill of all their prompt tokens (the worker's
engine prefills every waiting request in one step; docs/SIM_VS_LIVE.md). A request's first
token comes a prefill after it is taken, times a factor drawn per step from calibrated
percentiles of how warm requests spread on the live system: from `host_spread`'s idle or busy
percentiles by the host's state when the step starts (busy: any worker starting or any request
in flight, in any model; the nodes of an emulated cluster share one CPU), else from `spread`,
else none; plus the fixed `overhead_s`. Then
a token every `tpot`. While the endpoint is a degree-p pipeline both are scaled by DESIGN.md's
factor p − a + a/p (a = 1 full-size worker) and decoding pays a per-hop cost per stage
boundary; after consolidation the remaining tokens go at the whole worker's tpot.
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hydraserve.sim.cluster import Server, ServingTimes, SizeClass
from hydraserve.workload.records import RequestResult, WorkerLifetime, WorkloadRequest
from libs.common.db.enums import EndpointStatus
from services.scheduler.estimator import pipeline_factor
from services.scheduler.events import RequestDone, RequestStarted

if TYPE_CHECKING:
    from hydraserve.sim.engine import Simulator


@dataclass(eq=False)
class SimWorker:
    worker_id: int
    endpoint_id: int
    node_id: str
    server: Server
    model: str
    degree: int
    stage: int
    gpu_memory_bytes: int
    overlap: bool
    placed_at: float
    fetch_bytes: int = 0
    transfer_id: int | None = None
    is_cache_hit: bool = False
    fetch_done_at: float | None = None
    ready_at: float | None = None
    is_stopping: bool = False
    stopped_at: float | None = None

    def lifetime(self, *, end_s: float) -> WorkerLifetime:
        return WorkerLifetime(worker_id=str(self.worker_id), model=self.model,
                              node_id=self.node_id, gpu_memory_bytes=self.gpu_memory_bytes,
                              start_s=self.placed_at,
                              end_s=end_s if self.stopped_at is None else self.stopped_at,
                              stage=self.stage, degree=self.degree)


@dataclass(eq=False)
class _Active:
    request: WorkloadRequest
    worker_id: int
    started_at: float
    first_token_at: float
    # decoding: `tokens_left` tokens from `decode_from` on, `spt` seconds each
    decode_from: float
    tokens_left: float
    spt: float
    # bumped when the finish is rescheduled; an older finish event is stale
    generation: int = 0

    def finish_at(self) -> float:
        return self.decode_from + self.tokens_left * self.spt


@dataclass(eq=False)
class Endpoint:
    endpoint_id: int
    model: str
    degree: int
    size: SizeClass
    workers: list[SimWorker] = field(default_factory=list)
    is_consolidated: bool = False
    active: dict[str, _Active] = field(default_factory=dict)
    # run once `active` is empty (workers told to stop, draining)
    on_drained: list[Callable[[], None]] = field(default_factory=list)

    def head(self) -> SimWorker:
        return min(self.workers, key=lambda w: w.stage)

    def pace(self) -> tuple[ServingTimes, float]:
        """The whole worker's times on the slowest GPU serving, and the pipeline's factor."""
        serving = [self.head()] if self.is_consolidated or self.degree == 1 else self.workers
        times = self.size.times_on({w.server.gpu_type for w in serving})
        if self.is_consolidated or self.degree == 1:
            return times, 1.0
        return times, pipeline_factor(self.degree, 1)

    def decode_spt(self, per_hop_s: float) -> float:
        times, factor = self.pace()
        hops = 0 if factor == 1.0 else self.degree - 1
        return times.tpot_s * factor + per_hop_s * hops


class Serving:
    def __init__(self, sim: Simulator, *, max_batch: int, batch_prefill: bool = False,
                 spread: Sequence[float] = (), seed: int = 0,
                 host_spread: tuple[Sequence[float], Sequence[float]] | None = None) -> None:
        self._sim = sim
        self._max_batch = max_batch
        self._batch_prefill = batch_prefill
        self._spread = list(spread)
        self._host_spread = host_spread
        self._rng = random.Random(seed)
        self.endpoints: dict[int, Endpoint] = {}
        # model -> queued (arrival, request id), oldest first
        self._queues: dict[str, list[tuple[float, str]]] = defaultdict(list)
        self._by_id: dict[str, WorkloadRequest] = {}
        self._done: dict[str, RequestResult] = {}
        self._where: dict[str, Endpoint] = {}

    def add_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoints[endpoint.endpoint_id] = endpoint

    def enqueue(self, request: WorkloadRequest) -> None:
        self._by_id[request.request_id] = request
        bisect.insort(self._queues[request.model], (request.arrival_s, request.request_id))

    def requeue(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            endpoint = self._where.pop(request_id, None)
            if endpoint is not None:
                endpoint.active.pop(request_id, None)
                self.enqueue(self._by_id[request_id])

    def dispatch(self) -> None:
        """Ready endpoints with room take their model's oldest queued requests."""
        state = self._sim.state.endpoints
        for endpoint in list(self.endpoints.values()):
            queue = self._queues.get(endpoint.model)
            if not queue or len(endpoint.active) >= self._max_batch:
                continue
            policy_view = state.get(endpoint.endpoint_id)
            if policy_view is None or policy_view.state is not EndpointStatus.READY:
                continue
            taken = []
            while queue and len(endpoint.active) + len(taken) < self._max_batch:
                _, request_id = queue.pop(0)
                taken.append(self._by_id[request_id])
            spread = self._step_spread()
            # taken together, they are prefilled in one step of all their prompt tokens
            batch_tokens = sum(r.prompt_tokens for r in taken) if self._batch_prefill else None
            step_factor = self._draw(spread) if self._batch_prefill else None
            for request in taken:
                self._start(endpoint, request, prefill_tokens=batch_tokens,
                            spread=self._draw(spread) if step_factor is None else step_factor)

    def _step_spread(self) -> Sequence[float]:
        """The percentiles a step starting now draws its factor from."""
        if self._host_spread is None:
            return self._spread
        idle, busy = self._host_spread
        is_busy = any(endpoint.active or any(w.ready_at is None and not w.is_stopping
                                             for w in endpoint.workers)
                      for endpoint in self.endpoints.values())
        return busy if is_busy else idle

    def _draw(self, spread: Sequence[float]) -> float:
        """A factor from the spread's percentiles (inverse CDF, linear between them)."""
        if not spread:
            return 1.0
        position = self._rng.random() * (len(spread) - 1)
        low = int(position)
        high = min(low + 1, len(spread) - 1)
        return spread[low] + (position - low) * (spread[high] - spread[low])

    def _start(self, endpoint: Endpoint, request: WorkloadRequest, *,
               prefill_tokens: int | None = None, spread: float = 1.0) -> None:
        sim = self._sim
        now = sim.now
        times, factor = endpoint.pace()
        tokens = request.prompt_tokens if prefill_tokens is None else prefill_tokens
        first_token_at = now + times.prefill_s(tokens) * factor * spread + times.overhead_s
        head = endpoint.head()
        active = _Active(request, head.worker_id, now, first_token_at,
                         decode_from=first_token_at, tokens_left=request.output_tokens - 1,
                         spt=endpoint.decode_spt(sim.cluster.per_hop_s))
        endpoint.active[request.request_id] = active
        self._where[request.request_id] = endpoint
        sim.at(active.finish_at(), self._on_finish, endpoint, active, active.generation)
        sim.feed(RequestStarted(request.request_id, head.worker_id))

    def consolidated(self, worker: SimWorker) -> None:
        """The endpoint runs as one worker now: the rest of every decode goes faster."""
        endpoint = self.endpoints[worker.endpoint_id]
        endpoint.is_consolidated = True
        now = self._sim.now
        spt = endpoint.decode_spt(self._sim.cluster.per_hop_s)
        for active in endpoint.active.values():
            if now > active.decode_from:
                active.tokens_left = max(0.0, active.tokens_left
                                         - (now - active.decode_from) / active.spt)
                active.decode_from = now
            active.spt = spt
            active.generation += 1
            self._sim.at(active.finish_at(), self._on_finish, endpoint, active,
                         active.generation)

    def when_drained(self, endpoint_id: int, callback: Callable[[], None]) -> None:
        """Call `callback` once the endpoint runs no request (now, if it runs none)."""
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None or not endpoint.active:
            callback()
        else:
            endpoint.on_drained.append(callback)

    def worker_stopped(self, worker: SimWorker) -> None:
        endpoint = self.endpoints.get(worker.endpoint_id)
        if endpoint is not None and all(w.stopped_at is not None for w in endpoint.workers):
            del self.endpoints[endpoint.endpoint_id]

    def _on_finish(self, endpoint: Endpoint, active: _Active, generation: int) -> None:
        request = active.request
        if generation != active.generation or endpoint.active.get(request.request_id) is not (
                active):
            return
        del endpoint.active[request.request_id]
        del self._where[request.request_id]
        if not endpoint.active:
            callbacks, endpoint.on_drained = endpoint.on_drained, []
            for callback in callbacks:
                callback()
        now = self._sim.now
        num_after_first = request.output_tokens - 1
        tpot_s = (now - active.first_token_at) / num_after_first if num_after_first else None
        self._done[request.request_id] = RequestResult(
            request_id=request.request_id, model=request.model, app=request.app,
            submit_s=request.arrival_s, ttft_s=active.first_token_at - request.arrival_s,
            tpot_s=tpot_s, output_tokens=request.output_tokens, status="ok",
            ttft_slo_s=request.ttft_slo_s, tpot_slo_s=request.tpot_slo_s)
        self._sim.feed(RequestDone(request.request_id,
                                   prefill_s=active.first_token_at - active.started_at,
                                   tpot_s=tpot_s))

    def results(self, requests: Sequence[WorkloadRequest], *,
                end_s: float) -> list[RequestResult]:
        """Every request's result in arrival order; one not done by `end_s` timed out."""
        out = []
        for request in requests:
            result = self._done.get(request.request_id)
            if result is None:
                endpoint = self._where.get(request.request_id)
                active = None if endpoint is None else endpoint.active[request.request_id]
                first = None if active is None or active.first_token_at > end_s else (
                    active.first_token_at)
                result = RequestResult(
                    request_id=request.request_id, model=request.model, app=request.app,
                    submit_s=request.arrival_s,
                    ttft_s=None if first is None else first - request.arrival_s,
                    output_tokens=0, status="timeout", error="not done when the run ended",
                    ttft_slo_s=request.ttft_slo_s, tpot_slo_s=request.tpot_slo_s)
            out.append(result)
        return out
