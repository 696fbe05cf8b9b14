"""The simulator configured like a live `hydraserve up` run, and the two runs compared.

`hydraserve up` emulates each GPU node as one node agent with a GPU-memory size and a NIC cap,
and the storage service has no egress cap. So the simulated cluster is one single-GPU
server per node (`node-<i>`, GPU type `cpu`, as the agents report), the NIC the measured
rate of fetches that had their node's NIC to themselves (the emulated cap is not met
exactly), and unlimited storage egress. Each registered model is its own size class (its real
size, layers and KV cache), with the serving times `Calibration.times` gives it. Everything
measured comes from events (`calibrate`) except the client's overhead beyond the gateway's
TTFT (`client_overhead_s`), which pairs a run's client-side results with its events; use a
different run from the one predicted. Pure: no I/O.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from hydraserve.sim.calibration import Calibration, calibrate
from hydraserve.sim.cluster import GBPS, Cluster, Server, ServingTimes, SizeClass, StorageNode
from hydraserve.sim.engine import SimConfig
from hydraserve.workload.analyze import RunSummary
from hydraserve.workload.records import RequestResult, WorkloadRequest
from libs.common.messages import Event
from services.scheduler.estimator import CostModel

GIB = 1 << 30
# what a node agent reports as its GPU type by default
LIVE_GPU_TYPE = "cpu"
# a model nothing was measured of: the policy's own defaults
DEFAULT_TIMES = ServingTimes(tpot_s=CostModel().tpot_s, prefill_base_s=CostModel().prefill_s)


@dataclass(frozen=True)
class LiveModel:
    size_bytes: int
    num_layers: int
    kv_cache_bytes: int = 0


@dataclass(frozen=True)
class LiveSetup:
    """What a live run was started with (`hydraserve up` flags, model registrations)."""

    num_nodes: int
    gpu_memory_gib: float
    nic_gbps: float
    keep_alive_s: float
    # registered name -> its facts (from the admin API's answer)
    models: Mapping[str, LiveModel]
    max_pipeline_degree: int = 1
    # requests a worker runs at once (the worker's `capacity`)
    capacity: int = 8

    def __post_init__(self) -> None:
        if self.num_nodes < 1 or self.gpu_memory_gib <= 0 or self.nic_gbps <= 0:
            raise ValueError(f"bad live setup: {self}")


def live_cluster(setup: LiveSetup, calibration: Calibration, *,
                 nic_bytes_per_s: float | None = None) -> Cluster:
    """One single-GPU server per node; NIC `nic_bytes_per_s` (default: the configured cap);
    storage egress unlimited; the calibration's start-up and tail."""
    nic = setup.nic_gbps * GBPS if nic_bytes_per_s is None else nic_bytes_per_s
    servers = tuple(Server(f"node-{i}", LIVE_GPU_TYPE, 1, int(setup.gpu_memory_gib * GIB), nic)
                    for i in range(setup.num_nodes))
    cluster = Cluster(servers=servers, storage=(StorageNode("storage", math.inf),),
                      load_bytes_per_s=math.inf)
    return calibration.apply(cluster)


def live_size_classes(setup: LiveSetup, calibration: Calibration) -> dict[str, SizeClass]:
    """Each model its own class (`size_class_of` takes an exact name first)."""
    return {name: SizeClass(name, size_bytes=m.size_bytes, num_layers=m.num_layers,
                            kv_cache_bytes=m.kv_cache_bytes,
                            times={LIVE_GPU_TYPE: calibration.times(name, DEFAULT_TIMES)})
            for name, m in setup.models.items()}


def live_sim_config(setup: LiveSetup) -> SimConfig:
    """Keep-alive, batch and degree as registered; requests taken together share a prefill
    step (the worker's engine prefills every waiting request at once)."""
    return SimConfig(keep_alive_s=setup.keep_alive_s, max_batch=setup.capacity,
                     max_pipeline_degree=setup.max_pipeline_degree, batch_prefill=True)


def scale_slos(requests: Sequence[WorkloadRequest], *, ttft_scale: float,
               tpot_scale: float = 1.0) -> list[WorkloadRequest]:
    """The requests with their SLOs scaled (to the speed of the cluster they run on)."""
    if ttft_scale <= 0 or tpot_scale <= 0:
        raise ValueError(f"SLO scales must be positive: {ttft_scale}, {tpot_scale}")
    return [r.model_copy(update={"ttft_slo_s": round(r.ttft_slo_s * ttft_scale, 6),
                                 "tpot_slo_s": round(r.tpot_slo_s * tpot_scale, 6)})
            for r in requests]


def alternate_windows(requests: Sequence[WorkloadRequest], window_s: float
                      ) -> tuple[set[str], set[str]]:
    """(ids of the requests arriving in even windows [2k w, (2k + 1) w), ids of the rest):
    one run split into a calibration half and a held-out half that share the machine's
    state from minute to minute."""
    if window_s <= 0:
        raise ValueError(f"the window must be > 0 s, not {window_s}")
    even = {r.request_id for r in requests if int(r.arrival_s // window_s) % 2 == 0}
    return even, {r.request_id for r in requests} - even


def held_out_calibration(events: Sequence[Event], request_ids: set[str],
                         worker_ids: set[str]) -> Calibration:
    """`calibrate` from one part of a run: the request figures (prefill, TPOT, dispatch,
    spreads) from the requests `request_ids` only, the start-up and fetch figures from the
    workers `worker_ids` only. Every worker's life cycle stays in as context (which requests
    found a worker ready), and so do the other requests' arrival and end times, without
    their timings (whether the host was busy)."""
    request_view = []
    for event in events:
        if event.request_id is None or event.request_id in request_ids:
            request_view.append(event)
        elif event.kind in ("request.received", "request.done", "request.expired"):
            request_view.append(event.model_copy(update={"data": {}}))
    worker_view = [e for e in events if e.request_id is None
                   and (e.worker_id is None or e.worker_id in worker_ids)]
    by_request, by_worker = calibrate(request_view), calibrate(worker_view)
    return replace(by_request, startup_s=by_worker.startup_s,
                   fetch_bytes_per_s=by_worker.fetch_bytes_per_s,
                   worker_init_s=by_worker.worker_init_s, ready_tail_s=by_worker.ready_tail_s)


def events_between(events: Sequence[Event], start: float, end: float) -> list[Event]:
    """The events at `start` <= time < `end` (unix seconds)."""
    return [e for e in events if start <= e.time < end]


def solo_fetch_bytes_per_s(events: Sequence[Event]) -> float | None:
    """The median rate of network fetches that overlapped no other fetch on their node."""
    started = {e.worker_id: e for e in events if e.kind == "fetch.started" and e.worker_id}
    spans = []  # (node, start, end, bytes per s)
    for event in events:
        begin = started.get(event.worker_id)
        rate = event.data.get("bytes_per_s")
        if (event.kind == "fetch.done" and begin is not None and not event.data.get("cached")
                and not event.data.get("consolidation") and isinstance(rate, int | float)):
            spans.append((begin.node_id, begin.time, event.time, float(rate)))
    solo = [rate for i, (node, start, end, rate) in enumerate(spans)
            if not any(j != i and other[0] == node and other[1] < end and start < other[2]
                       for j, other in enumerate(spans))]
    return statistics.median(solo) if solo else None


def client_overhead_s(results: Sequence[RequestResult], *, started_at: float,
                      events: Sequence[Event], max_skew_s: float = 1.0) -> float | None:
    """The median of client TTFT − gateway TTFT (`request.done` `ttft_s`) over a run's ok
    requests, paired with their events by `paired_requests`."""
    gateway_ttft = {e.request_id: float(e.data["ttft_s"]) for e in events
                    if e.kind == "request.done" and isinstance(e.data.get("ttft_s"), int | float)}
    overheads = []
    for result, event in paired_requests(results, started_at=started_at, events=events,
                                         max_skew_s=max_skew_s):
        ttft = gateway_ttft.get(event.request_id)
        if result.status == "ok" and result.ttft_s is not None and ttft is not None:
            overheads.append(result.ttft_s - ttft)
    return statistics.median(overheads) if overheads else None


def paired_requests(results: Sequence[RequestResult], *, started_at: float,
                    events: Sequence[Event], max_skew_s: float = 1.0
                    ) -> list[tuple[RequestResult, Event]]:
    """Each client-side result with its `request.received` (the gateway names a request
    anew): per model, the k-th request sent with the k-th received; a pair further apart in
    time than `max_skew_s` is left out."""
    received: dict[str, list[Event]] = {}
    for event in sorted(events, key=lambda e: e.time):
        if event.kind == "request.received" and event.model and event.request_id:
            received.setdefault(event.model, []).append(event)
    sent: dict[str, list[RequestResult]] = {}
    for result in sorted(results, key=lambda r: r.submit_s):
        sent.setdefault(result.model, []).append(result)
    return [(result, event) for model, model_results in sent.items()
            for result, event in zip(model_results, received.get(model, []), strict=False)
            if abs(event.time - (started_at + result.submit_s)) <= max_skew_s]


# --- the comparison ------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    live: float | None
    sim: float | None
    # held to the tolerance (the others are shown for context)
    is_target: bool = True

    @property
    def relative_error(self) -> float | None:
        """(sim − live) / live; None when either is missing or live is 0."""
        if self.live is None or self.sim is None or self.live == 0:
            return None
        return (self.sim - self.live) / self.live

    def is_within(self, tolerance: float) -> bool:
        error = self.relative_error
        return error is not None and abs(error) <= tolerance


def compare(live: RunSummary, sim: RunSummary) -> list[Metric]:
    """Attainment (both SLOs, TTFT) and TTFT p50/p90/p99 as targets; TPOT attainment, TPOT
    p50 and cost per request for context."""
    return [
        Metric("attainment (both SLOs)", live.overall.both, sim.overall.both),
        Metric("attainment (TTFT SLO)", live.overall.ttft, sim.overall.ttft),
        *(Metric(f"TTFT p{p} (s)", live.ttft_s[p], sim.ttft_s[p]) for p in (50, 90, 99)),
        Metric("attainment (TPOT SLO)", live.overall.tpot, sim.overall.tpot, is_target=False),
        Metric("TPOT p50 (s)", live.tpot_s[50], sim.tpot_s[50], is_target=False),
        Metric("cost (GB·s/request)", live.cost_gb_s_per_request, sim.cost_gb_s_per_request,
               is_target=False),
    ]


def median_metrics(runs: Sequence[Sequence[Metric]]) -> list[Metric]:
    """Per metric, the median of the simulated values over several simulated runs (each a
    `compare` of the same live run); a metric missing in a run is left out of its median."""
    merged = []
    for same in zip(*runs, strict=True):
        values = [m.sim for m in same if m.sim is not None]
        merged.append(replace(same[0], sim=statistics.median(values) if values else None))
    return merged


def resampled_within(values: Sequence[float], percentile: float, *, tolerance: float,
                     num_resamples: int = 2000, seed: int = 0) -> float | None:
    """How well a run pins down its own percentile: the share of bootstrap resamples of
    `values` (as many values, drawn with replacement) whose percentile lies within
    `tolerance` (relative) of the percentile of `values` itself. A prediction of the
    distribution behind the run can be expected within the tolerance about as often. None
    without values or with a percentile of 0."""
    if not values:
        return None
    data = np.asarray(values, dtype=float)
    measured = float(np.percentile(data, percentile))
    if measured == 0:
        return None
    draws = np.random.default_rng(seed).integers(0, len(data), (num_resamples, len(data)))
    resampled = np.percentile(data[draws], percentile, axis=1)
    return float(np.mean(np.abs(resampled / measured - 1) <= tolerance))
