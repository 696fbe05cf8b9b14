"""The discrete-event simulation of a cluster driven by the scheduler's own policy.

One heap of timed events (ties broken by insertion order, so a run is a pure function of its
inputs). The simulator feeds the policy the events a live cluster would (`ModelRegistered`,
`NodeHeartbeat`, `RequestArrived`, `Tick`, `WorkerReady`, `RequestStarted`, `RequestDone`,
`WorkerConsolidated`, `WorkerStopped`) and carries out its commands: fetches share NICs and
storage egress (`hydraserve.sim.network`), workers get ready after their fetch and start-up,
ready endpoints take queued requests (`hydraserve.sim.serving`). See docs/SIMULATOR.md.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hydraserve.sim.cluster import SIZE_CLASSES, Cluster, SizeClass, size_class_of
from hydraserve.sim.models import workload_models
from hydraserve.sim.network import HostCache, Network
from hydraserve.sim.serving import Endpoint, Serving, SimWorker
from hydraserve.workload.records import (
    RequestResult,
    RunHeader,
    WorkerLifetime,
    WorkloadHeader,
    WorkloadRequest,
)
from services.scheduler.estimator import worker_gpu_bytes
from services.scheduler.events import (
    AnnouncePipeline,
    Command,
    Consolidate,
    Event,
    MarkNodeDown,
    ModelRegistered,
    NodeHeartbeat,
    PlaceWorker,
    RequestArrived,
    RequeueRequests,
    StopWorker,
    Tick,
    WorkerConsolidated,
    WorkerReady,
    WorkerStopped,
)
from services.scheduler.eviction import reclaimable_bytes
from services.scheduler.policy import POLICIES, Policy
from services.scheduler.scaling import endpoints_to_scale_in
from services.scheduler.state import ClusterState


@dataclass(frozen=True)
class SimConfig:
    tick_s: float = 1.0
    # requests one endpoint serves at once (batching slows none of them down)
    max_batch: int = 8
    # requests an endpoint takes at one instant share one prefill of all their prompt tokens
    # (the live engine's prefill step); False: each is prefilled as if alone
    batch_prefill: bool = False
    # percentiles (equally spaced, 0 to 100) of a factor on each prefill step's time, drawn
    # per step (Calibration.warm_spread); (): every step takes its modelled time
    service_spread: tuple[float, ...] = ()
    # seeds the draws from `service_spread`
    seed: int = 0
    # (idle, busy) percentiles like `service_spread`'s, one set drawn from by the host's state
    # when a step starts: busy while any worker is starting or any request is in flight
    # (Calibration.host_spread: an emulated cluster's nodes share one CPU); None: not used.
    # Takes the place of `service_spread`.
    host_spread: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    keep_alive_s: float = 60.0
    # StopWorker -> WorkerStopped
    stop_delay_s: float = 0.1
    # after the last arrival the run goes on this long; requests not done by then time out
    drain_s: float = 1800.0
    # host-memory cache per server; 0: none
    cache_bytes: float = 0.0
    max_pipeline_degree: int = 4
    # leave out the Ticks that provably change nothing (`Simulator._tick_changes_nothing`);
    # the results are the same either way, only faster
    skip_idle_ticks: bool = True

    def __post_init__(self) -> None:
        spreads = [self.service_spread, *(self.host_spread or ())]
        if self.tick_s <= 0 or self.max_batch < 1 or self.cache_bytes < 0 \
                or any(not _is_spread(s) for s in spreads) \
                or (self.host_spread is not None and (not all(self.host_spread)
                                                      or self.service_spread)):
            raise ValueError(f"bad simulator config: {self}")


def _is_spread(percentiles: Sequence[float]) -> bool:
    """() or two or more non-negative percentiles in order."""
    return len(percentiles) != 1 and all(f >= 0 for f in percentiles) \
        and list(percentiles) == sorted(percentiles)


@dataclass(frozen=True)
class SimResult:
    header: RunHeader
    results: list[RequestResult]
    workers: list[WorkerLifetime]

    def records(self) -> list[RunHeader | RequestResult | WorkerLifetime]:
        return [self.header, *self.results, *self.workers]


def sim_policy(name: str) -> Policy:
    """A baseline of `POLICIES`, with heartbeats that never time out (the simulator sends
    them only at the start and when a host cache changes)."""
    policy = POLICIES[name]
    return replace(policy, config=replace(policy.config, heartbeat_timeout_s=math.inf))


def simulate(requests: Sequence[WorkloadRequest], *, policy: str, cluster: Cluster,
             config: SimConfig = SimConfig(), workload: WorkloadHeader | None = None,
             size_classes: Mapping[str, SizeClass] = SIZE_CLASSES) -> SimResult:
    name = f"sim:{policy}" + ("+cache" if config.cache_bytes > 0 else "")
    sim = Simulator(requests, policy=sim_policy(policy), cluster=cluster, config=config,
                    size_classes=size_classes)
    results, workers = sim.run()
    return SimResult(RunHeader(name=name, policy=policy, workload=workload), results, workers)


class Simulator:
    def __init__(self, requests: Sequence[WorkloadRequest], *, policy: Policy, cluster: Cluster,
                 config: SimConfig, size_classes: Mapping[str, SizeClass] = SIZE_CLASSES) -> None:
        # the policy's endpoints run as many requests at once as the simulated ones
        self.policy = replace(policy, config=replace(policy.config,
                                                     endpoint_capacity=config.max_batch))
        self.cluster = cluster
        self.config = config
        self.state = ClusterState()
        self.now = 0.0
        self._requests = sorted(requests, key=lambda r: (r.arrival_s, r.request_id))
        self._models = workload_models(self._requests, keep_alive_s=config.keep_alive_s,
                                       size_classes=size_classes,
                                       max_pipeline_degree=config.max_pipeline_degree)
        self._sizes = {m: size_class_of(m, size_classes) for m in self._models}
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._pending: deque[Event] = deque()
        self._is_feeding = False
        self._server_of = cluster.server_of()
        self._network = Network()
        for server in cluster.servers:
            self._network.add_link(f"nic:{server.name}", server.nic_bytes_per_s)
        for storage in cluster.storage:
            self._network.add_link(f"egress:{storage.name}", storage.egress_bytes_per_s)
        # models are striped over the storage nodes in name order
        self._storage_of = {m: f"egress:{cluster.storage[i % len(cluster.storage)].name}"
                            for i, m in enumerate(sorted(self._models))}
        self._caches = {s.name: HostCache(config.cache_bytes) for s in cluster.servers
                        } if config.cache_bytes > 0 else {}
        # transfer id -> (what it is for, worker id)
        self._transfers: dict[int, tuple[str, int]] = {}
        self._transfer_ids = itertools.count(1)
        self._net_generation = 0
        self._workers: dict[int, SimWorker] = {}
        self._num_arrivals_left = len(self._requests)
        self.serving = Serving(self, max_batch=config.max_batch,
                               batch_prefill=config.batch_prefill,
                               spread=config.service_spread, seed=config.seed,
                               host_spread=config.host_spread)

    # --- the event loop ------------------------------------------------------------------

    def at(self, time: float, handler: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), handler, args))

    def run(self) -> tuple[list[RequestResult], list[WorkerLifetime]]:
        for model in sorted(self._models):
            self.feed(ModelRegistered(self._models[model]))
        for server in self.cluster.servers:
            self._heartbeat(server.name)
        for request in self._requests:
            self.at(request.arrival_s, self._on_arrival, request)
        self.at(self.config.tick_s, self._on_tick)
        last_arrival = self._requests[-1].arrival_s if self._requests else 0.0
        horizon = last_arrival + self.config.drain_s
        while self._heap and self._heap[0][0] <= horizon:
            time, _, handler, args = heapq.heappop(self._heap)
            self.now = time
            handler(*args)
        workers = [w.lifetime(end_s=self.now) for w in sorted(self._workers.values(),
                                                               key=lambda w: w.worker_id)]
        return self.serving.results(self._requests, end_s=self.now), workers

    def feed(self, event: Event) -> None:
        """Hand the policy an event; its commands (and the events they cause now) follow."""
        self._pending.append(event)
        if self._is_feeding:
            return
        self._is_feeding = True
        while self._pending:
            self.state, commands = self.policy.decide(self.state, self._pending.popleft(),
                                                      self.now)
            for command in commands:
                self._apply(command)
            self.serving.dispatch()
        self._is_feeding = False

    def _on_arrival(self, request: WorkloadRequest) -> None:
        self._num_arrivals_left -= 1
        self.serving.enqueue(request)
        self.feed(RequestArrived(request.request_id, request.model))

    def _on_tick(self) -> None:
        if not (self.config.skip_idle_ticks and self._tick_changes_nothing()):
            self.feed(Tick())
        if self._num_arrivals_left or self.state.requests or self.state.workers:
            self.at(self.now + self.config.tick_s, self._on_tick)

    def _tick_changes_nothing(self) -> bool:
        """No live endpoint's keep-alive has run out, and no model waiting for a cold start
        fits on any node: every placer needs one node with room for a whole-model worker
        (stage 0 is full size), so the Tick's retry of deferred placements places nothing.
        With eviction, room counts what stopping workers and idle endpoints hold too, so it
        stops nothing either. (Nodes never time out in the simulator.)"""
        state = self.state
        busy = {r.model for r in state.requests.values()}
        live = set()
        for endpoint in state.endpoints.values():
            if not endpoint.is_live:
                continue
            live.add(endpoint.model)
            if (endpoint.model not in busy and self.now - endpoint.last_request_at
                    >= self._models[endpoint.model].keep_alive_s):
                return False
        if self.policy.scale_out and endpoints_to_scale_in(
                state, self.now, default_capacity=self.policy.config.endpoint_capacity):
            return False
        waiting = {r.model for r in state.requests.values() if r.worker_id is None} - live
        # with eviction a cold start can also use what stopping workers and idle endpoints hold
        reclaimable = reclaimable_bytes(state) if waiting and self.policy.evict_idle else {}
        most_free = max((n.free_gpu_memory_bytes + reclaimable.get(n.node_id, 0)
                         for n in state.nodes.values() if n.is_up), default=0)
        return all(worker_gpu_bytes(size_bytes=self._models[m].size_bytes,
                                    kv_cache_bytes=self._models[m].kv_cache_bytes, degree=1,
                                    is_full_size=True) > most_free for m in waiting)

    # --- commands --------------------------------------------------------------------------

    def _apply(self, command: Command) -> None:
        match command:
            case PlaceWorker():
                self._place(command)
            case Consolidate():
                worker = self._workers[command.worker_id]
                spec = self._models[command.model]
                num_bytes = sum(spec.fetch_bytes(command.degree, s) for s in command.stages)
                worker.transfer_id = self._start_fetch("consolidate", worker, num_bytes,
                                                       cache_key=None)
            case StopWorker(worker_id=worker_id):
                worker = self._workers[worker_id]
                worker.is_stopping = True
                self._cancel_fetch(worker)
                stop = functools.partial(self._stop_after_delay, worker)
                endpoint = self.state.endpoints.get(worker.endpoint_id)
                if endpoint is not None and endpoint.is_live:
                    stop()  # a consolidated pipeline's partial worker: its requests moved
                else:
                    # scaled in or to zero: it drains, stopping once its requests are done
                    self.serving.when_drained(worker.endpoint_id, stop)
            case RequeueRequests(request_ids=request_ids):
                self.serving.requeue(request_ids)
            case AnnouncePipeline() | MarkNodeDown():
                pass  # the pipeline serves once the policy marks its endpoint ready

    def _place(self, command: PlaceWorker) -> None:
        server = self._server_of[command.node_id]
        endpoint = self.serving.endpoints.get(command.endpoint_id)
        if endpoint is None:
            endpoint = Endpoint(command.endpoint_id, command.model, command.pipeline_degree,
                                self._sizes[command.model])
            self.serving.add_endpoint(endpoint)
        worker = SimWorker(command.worker_id, command.endpoint_id, command.node_id, server,
                           command.model, command.pipeline_degree, command.stage,
                           command.gpu_memory_bytes, overlap=command.overlap,
                           placed_at=self.now)
        self._workers[worker.worker_id] = worker
        endpoint.workers.append(worker)
        num_bytes = self._models[command.model].fetch_bytes(command.pipeline_degree,
                                                            command.stage)
        worker.fetch_bytes = num_bytes
        worker.transfer_id = self._start_fetch(
            "place", worker, num_bytes,
            cache_key=f"{command.model}/{command.pipeline_degree}/{command.stage}")

    # --- fetches ---------------------------------------------------------------------------

    def _start_fetch(self, purpose: str, worker: SimWorker, num_bytes: int, *,
                     cache_key: str | None) -> int:
        transfer_id = next(self._transfer_ids)
        self._transfers[transfer_id] = (purpose, worker.worker_id)
        cache = self._caches.get(worker.server.name)
        if cache is not None and cache_key is not None and cache_key in cache:
            cache.touch(cache_key)
            worker.is_cache_hit = True
            seconds = num_bytes / self.cluster.host_cache_bytes_per_s
            self.at(self.now + seconds, self._on_fetched, transfer_id)
        else:
            links = (f"nic:{worker.server.name}", self._storage_of[worker.model])
            self._network.start(transfer_id, num_bytes, links, self.now)
            self._watch_network()
        return transfer_id

    def _cancel_fetch(self, worker: SimWorker) -> None:
        if worker.transfer_id is not None and self._transfers.pop(worker.transfer_id, None):
            self._network.cancel(worker.transfer_id, self.now)
            self._watch_network()

    def _watch_network(self) -> None:
        self._net_generation += 1
        done_at = self._network.next_done_at()
        if done_at is not None:
            self.at(max(done_at, self.now), self._on_network, self._net_generation)

    def _on_network(self, generation: int) -> None:
        if generation != self._net_generation:
            return  # the shares changed since this was scheduled
        for transfer_id in self._network.pop_done(self.now):
            self._on_fetched(transfer_id)
        self._watch_network()

    def _on_fetched(self, transfer_id: int) -> None:
        entry = self._transfers.pop(transfer_id, None)
        if entry is None:
            return  # cancelled
        purpose, worker_id = entry
        worker = self._workers[worker_id]
        worker.transfer_id = None
        tail_s = min(worker.fetch_bytes, self.cluster.load_tail_bytes) / (
            self.cluster.load_bytes_per_s)
        if purpose == "consolidate":
            self._keep(worker, f"{worker.model}/1/0", self._models[worker.model].size_bytes)
            self.at(self.now + tail_s, self._on_consolidated, worker)
            return
        worker.fetch_done_at = self.now
        self._keep(worker, f"{worker.model}/{worker.degree}/{worker.stage}", worker.fetch_bytes)
        startup_s = self.cluster.startup_s
        if worker.overlap:
            ready_at = max(self.now, worker.placed_at + startup_s) + tail_s
        else:
            ready_at = self.now + startup_s + worker.fetch_bytes / self.cluster.load_bytes_per_s
        ready_at += self.cluster.ready_tail_s
        self.at(ready_at, self._on_ready, worker)

    def _keep(self, worker: SimWorker, key: str, num_bytes: int) -> None:
        cache = self._caches.get(worker.server.name)
        if cache is not None and cache.add(key, num_bytes):
            self._heartbeat(worker.server.name)

    def _heartbeat(self, server_name: str) -> None:
        server = next(s for s in self.cluster.servers if s.name == server_name)
        cache = self._caches.get(server_name)
        cached = cache.keys() if cache is not None else frozenset()
        for node_id in server.node_ids():
            self.feed(NodeHeartbeat(node_id, server.gpu_type, server.gpu_memory_bytes,
                                    int(server.nic_bytes_per_s), cached=cached,
                                    nic_id=server.name))

    # --- worker life cycle -----------------------------------------------------------------

    def _on_ready(self, worker: SimWorker) -> None:
        if worker.is_stopping:
            return
        worker.ready_at = self.now
        started_at = worker.placed_at if worker.overlap else worker.fetch_done_at
        assert started_at is not None
        self.feed(WorkerReady(worker.worker_id, startup_s=self.now - started_at))

    def _on_consolidated(self, worker: SimWorker) -> None:
        if worker.is_stopping:
            return
        self.serving.consolidated(worker)
        self.feed(WorkerConsolidated(worker.worker_id))

    def _stop_after_delay(self, worker: SimWorker) -> None:
        self.at(self.now + self.config.stop_delay_s, self._on_stopped, worker)

    def _on_stopped(self, worker: SimWorker) -> None:
        worker.stopped_at = self.now
        self.serving.worker_stopped(worker)
        self.feed(WorkerStopped(worker.worker_id))
