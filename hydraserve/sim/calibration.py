"""The simulator's constants from the recorded events of real runs (`HS_EVENTS`).

- start-up: for each `worker.ready` with `data.phases`, the span `ready_at −
  process_started_at`, minus the worker's own fetch (`fetch.done` of the same worker, not a
  consolidation fetch, `data.fetch_s`) where that fetch overlapped the span (it ended after
  the process started); the median over workers. This is the time a cold start costs beyond
  its fetch, as the policy's calibration defines it.
- the simulator's start-up, which runs alongside the fetch (`worker_init_s`): for each
  `worker.ready` whose fetch overlapped its process, the span from the `worker.placed` event to
  `data.phases.load_started_at` (the worker starts taking its bytes: spawn, imports, engine
  build); and `ready_tail_s`: `ready_at − max(load_started_at, fetch.done time)`, what is
  left after both (the last tensors, the ready report). Medians. `apply` gives the simulator
  these where measured: its overlapped worker is ready at max(fetch end, placement +
  start-up) + tail, so the policy's "time beyond the fetch" would start a worker whose
  start-up outlasts its fetch too early by the fetch time.
- fetch bandwidth: the median `data.bytes_per_s` of `fetch.done` events that came over the
  network (`cached` false).
- prefill and tpot per model: from `request.done` timings (`RequestProgress.timings`, seconds
  from the gateway's acceptance): prefill = `ttft_s − queue_s`; tpot = `(e2e_s − ttft_s) /
  (usage.completion_tokens − 1)`; medians per model. Requests served by pipelines are not
  told apart in the events, so calibrate from runs of whole-model workers.
- prefill steps per model: the requests whose `request.first_token` one worker sent within
  10 ms were prefilled in one step (the engine prefills every waiting request at once); a
  robust (Theil-Sen) line of the step's time (the longest `ttft_s − queue_s`) over its prompt
  tokens (`usage.prompt_tokens`) gives `prefill_base_s` and `prefill_s_per_token`, which
  `times` prefers to the median.
- dispatch (`dispatch_s`): the median `queue_s` of warm requests, those received while a
  ready worker of their model was up (between its `worker.ready` and its
  `worker.stop_requested`): the gateway -> JetStream -> worker pull a simulated request does
  not wait for. `times` adds it, and the caller's `client_overhead_s` (what a client sees
  beyond the gateway's TTFT; the events cannot tell it), to the prefill.
- the spread of warm requests (`warm_spread`): for each warm request (as for dispatch), its
  gateway `ttft_s` over what the medians above predict for it (dispatch + its model's prefill
  line at its prompt tokens); the 0th, 5th, ..., 100th percentiles of that ratio. On a shared
  CPU a warm request's time spreads (a prefill doubles while its worker decodes others, or
  another worker starts); the simulator draws each prefill step's factor from these
  percentiles (`SimConfig.service_spread`) where one value per model put every warm request
  at the median.
- host contention (`host_spread`): the same percentiles, taken apart over the warm requests
  received while the host was idle (no worker starting, no other request in flight, in any
  model) and over those received while it was busy. Where every emulated node shares one
  machine's CPU, a worker starting (`import torch`) or decoding slows every other worker's
  prefill: a warm request took a median 23-25 ms at the gateway on an idle host and 37-41 ms
  on a busy one, in the calibration run and in the run it predicts alike
  (docs/SIM_VS_LIVE.md). The simulator draws each prefill step's factor from the set of the
  host's state when the step starts (`SimConfig.host_spread`), so a run with more or fewer
  busy moments than the calibration run gets more or fewer slow steps. On a real cluster the
  nodes share no CPU; leave it unset there.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hydraserve.sim.cluster import Cluster, ServingTimes
from libs.common.messages import Event

# first tokens of one worker this close together came out of one prefill step
_SAME_STEP_S = 0.01
# a host spread needs this many warm requests in each of the idle and busy sets
_MIN_HOST_REQUESTS = 5


@dataclass(frozen=True)
class ModelCalibration:
    prefill_s: float | None = None
    tpot_s: float | None = None
    # prefill = base + per_token x the prompt tokens prefilled in one step; None: too few
    # distinct step sizes to fit
    prefill_base_s: float | None = None
    prefill_s_per_token: float | None = None


@dataclass(frozen=True)
class Calibration:
    # the policy's start-up: the span beyond the worker's own fetch
    startup_s: float | None = None
    fetch_bytes_per_s: float | None = None
    models: Mapping[str, ModelCalibration] = field(default_factory=dict)
    # the simulator's start-up alongside the fetch: placement -> the worker takes its bytes
    worker_init_s: float | None = None
    # after both the fetch and the start-up: placement's last step to ready
    ready_tail_s: float | None = None
    # a warm request's gateway -> worker pull
    dispatch_s: float | None = None
    # a client's TTFT beyond the gateway's (HTTP, SSE); not in the events, the caller's
    client_overhead_s: float | None = None
    # percentiles 0, 5, ..., 100 of a warm request's TTFT over its predicted TTFT; () unknown
    warm_spread: tuple[float, ...] = ()
    # those percentiles over the requests received on an idle and on a busy host (shared
    # CPU); None: too few requests in either
    host_spread: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def apply(self, cluster: Cluster) -> Cluster:
        """The cluster with the measured start-up (bandwidths are configured): the
        overlapped start-up and tail where measured, else the policy's start-up."""
        startup_s = self.worker_init_s if self.worker_init_s is not None else self.startup_s
        if startup_s is not None:
            cluster = replace(cluster, startup_s=startup_s)
        if self.ready_tail_s is not None:
            cluster = replace(cluster, ready_tail_s=self.ready_tail_s)
        return cluster

    def times(self, model: str, default: ServingTimes) -> ServingTimes:
        """The model's measured times (a prefill of the prompts measured), else `default`;
        the prefill includes the dispatch, and the client's overhead is the fixed
        `overhead_s`, where known."""
        measured = self.models.get(model, ModelCalibration())
        dispatch_s = self.dispatch_s or 0.0
        client_s = self.client_overhead_s or 0.0
        tpot_s = default.tpot_s if measured.tpot_s is None else measured.tpot_s
        if measured.prefill_base_s is not None and measured.prefill_s_per_token is not None:
            return ServingTimes(tpot_s=tpot_s, prefill_base_s=dispatch_s + measured.prefill_base_s,
                                prefill_s_per_token=measured.prefill_s_per_token,
                                overhead_s=client_s)
        return ServingTimes(
            tpot_s=tpot_s,
            prefill_base_s=dispatch_s + (default.prefill_base_s if measured.prefill_s is None
                                         else measured.prefill_s),
            prefill_s_per_token=(default.prefill_s_per_token if measured.prefill_s is None
                                 else 0.0),
            overhead_s=client_s)


def calibrate(events: Sequence[Event]) -> Calibration:
    fetch_s: dict[str, tuple[float, float]] = {}  # worker id -> (fetch seconds, done time)
    bandwidths: list[float] = []
    for event in events:
        if event.kind != "fetch.done":
            continue
        data = event.data
        if not data.get("cached") and _is_number(data.get("bytes_per_s")):
            bandwidths.append(float(data["bytes_per_s"]))
        if (event.worker_id is not None and not data.get("consolidation")
                and _is_number(data.get("fetch_s"))):
            fetch_s[event.worker_id] = (float(data["fetch_s"]), event.time)
    startups = [s for e in events if e.kind == "worker.ready"
                if (s := _startup_s(e, fetch_s)) is not None]
    placed_at = {e.worker_id: e.time for e in events
                 if e.kind == "worker.placed" and e.worker_id is not None}
    overlapped = [o for e in events if e.kind == "worker.ready"
                  if (o := _overlapped_startup(e, placed_at, fetch_s)) is not None]
    prefills: dict[str, list[float]] = {}
    tpots: dict[str, list[float]] = {}
    for event in events:
        if event.kind == "request.done" and event.model is not None:
            prefill_s, tpot_s = _request_times(event.data)
            if prefill_s is not None:
                prefills.setdefault(event.model, []).append(prefill_s)
            if tpot_s is not None:
                tpots.setdefault(event.model, []).append(tpot_s)
    fits = _prefill_fits(events)
    models = {m: ModelCalibration(prefill_s=_median(prefills.get(m)), tpot_s=_median(tpots.get(m)),
                                  prefill_base_s=fits[m][0] if m in fits else None,
                                  prefill_s_per_token=fits[m][1] if m in fits else None)
              for m in sorted(prefills.keys() | tpots.keys())}
    warm = _warm_requests(events)
    dispatch_s = _median([float(d["queue_s"]) for d in warm.values()
                          if _is_number(d.get("queue_s"))])
    ratios = _warm_ratios(warm, models, dispatch_s or 0.0)
    return Calibration(startup_s=_median(startups), fetch_bytes_per_s=_median(bandwidths),
                       models=models, worker_init_s=_median([o[0] for o in overlapped]),
                       ready_tail_s=_median([o[1] for o in overlapped]),
                       dispatch_s=dispatch_s, warm_spread=_warm_spread(list(ratios.values())),
                       host_spread=_host_spread(events, ratios))


def _overlapped_startup(event: Event, placed_at: Mapping[str, float],
                        fetch_s: Mapping[str, tuple[float, float]]
                        ) -> tuple[float, float] | None:
    """(placement -> load start, the rest after both it and the fetch) of a worker whose
    fetch overlapped its process; None for any other."""
    phases = event.data.get("phases")
    if not isinstance(phases, dict) or event.worker_id not in placed_at:
        return None
    started, load_started, ready = (phases.get(k) for k in (
        "process_started_at", "load_started_at", "ready_at"))
    fetch = fetch_s.get(event.worker_id or "")
    if not all(_is_number(t) for t in (started, load_started, ready)) or fetch is None \
            or fetch[1] <= float(started):
        return None
    init_s = float(load_started) - placed_at[event.worker_id or ""]
    tail_s = float(ready) - max(float(load_started), fetch[1])
    return max(0.0, init_s), max(0.0, tail_s)


def _prefill_fits(events: Sequence[Event]) -> dict[str, tuple[float, float]]:
    """Model -> (base, per token) of a Theil-Sen line through its prefill steps.

    A step is the requests whose `request.first_token` came from one worker within
    `_SAME_STEP_S` of each other; its tokens are their `usage.prompt_tokens`, its time the
    longest `ttft_s − queue_s` among them. A model needs steps of two sizes or more; a
    negative slope is taken as flat."""
    done = {e.request_id: e.data for e in events if e.kind == "request.done" and e.request_id}
    firsts: dict[tuple[str, str], list[Event]] = {}
    for event in sorted(events, key=lambda e: e.time):
        if (event.kind == "request.first_token" and event.model and event.worker_id
                and event.request_id in done):
            firsts.setdefault((event.model, event.worker_id), []).append(event)
    steps: dict[str, list[tuple[float, float]]] = {}  # model -> (tokens, seconds)
    for (model, _), group in firsts.items():
        step: list[Event] = []
        for event in [*group, None]:
            if step and (event is None or event.time - step[-1].time > _SAME_STEP_S):
                point = _step_point([done[e.request_id or ""] for e in step])
                if point is not None:
                    steps.setdefault(model, []).append(point)
                step = []
            if event is not None:
                step.append(event)
    fits = {}
    for model, points in steps.items():
        # Theil-Sen: the median of the pairwise slopes, robust to the few steps a busy CPU
        # slowed down (least squares let them set the line)
        slopes = [(y2 - y1) / (x2 - x1) for (x1, y1), (x2, y2) in itertools.combinations(
            points, 2) if x1 != x2]
        if not slopes:
            continue
        slope = max(0.0, statistics.median(slopes))
        fits[model] = (max(0.0, statistics.median(y - slope * x for x, y in points)), slope)
    return fits


def _step_point(requests: list[Mapping[str, Any]]) -> tuple[float, float] | None:
    tokens, seconds = 0, []
    for data in requests:
        usage = data.get("usage")
        prompt_tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        prefill_s, _ = _request_times(data)
        if not isinstance(prompt_tokens, int) or prefill_s is None:
            return None
        tokens += prompt_tokens
        seconds.append(prefill_s)
    return float(tokens), max(seconds)


def _warm_ratios(warm: Mapping[tuple[str, str], Mapping[str, Any]],
                 models: Mapping[str, ModelCalibration], dispatch_s: float) -> dict[str, float]:
    """Request id -> its gateway TTFT over the TTFT predicted for it (dispatch + its model's
    prefill line at its prompt tokens), for the warm requests with both."""
    ratios = {}
    for (model, request_id), data in warm.items():
        measured = models.get(model, ModelCalibration())
        usage = data.get("usage")
        tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        if measured.prefill_base_s is not None and measured.prefill_s_per_token is not None \
                and isinstance(tokens, int):
            prefill_s = measured.prefill_base_s + measured.prefill_s_per_token * tokens
        elif measured.prefill_s is not None:
            prefill_s = measured.prefill_s
        else:
            continue
        if _is_number(data.get("ttft_s")) and dispatch_s + prefill_s > 0:
            ratios[request_id] = float(data["ttft_s"]) / (dispatch_s + prefill_s)
    return ratios


def _warm_spread(ratios: list[float]) -> tuple[float, ...]:
    """Percentiles 0, 5, ..., 100 of warm TTFT / predicted TTFT; () with under 2 requests."""
    if len(ratios) < 2:
        return ()
    ratios = sorted(ratios)
    inner = statistics.quantiles(ratios, n=20, method="inclusive")
    return (ratios[0], *inner, ratios[-1])


def _host_spread(events: Sequence[Event], ratios: Mapping[str, float]
                 ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(idle, busy): the warm spread of requests received while no worker was starting and no
    other request was in flight, and of the rest; None with under `_MIN_HOST_REQUESTS`
    requests in either set."""
    placed = {e.worker_id: e.time for e in events
              if e.kind == "worker.placed" and e.worker_id is not None}
    # a worker is starting from its placement to its first ready or stop
    starting_until: dict[str, float] = {}
    for event in sorted(events, key=lambda e: e.time):
        if event.worker_id in placed and event.worker_id not in starting_until and \
                event.kind in ("worker.ready", "worker.stop_requested", "worker.stopped"):
            starting_until[event.worker_id] = event.time
    received = {e.request_id: e.time for e in events
                if e.kind == "request.received" and e.request_id}
    done = {e.request_id: e.time for e in events
            if e.kind in ("request.done", "request.expired") and e.request_id}
    idle, busy = [], []
    for request_id, ratio in ratios.items():
        at = received.get(request_id)
        if at is None:
            continue
        is_busy = any(t <= at < starting_until.get(w, math.inf) for w, t in placed.items()) \
            or any(other != request_id and t <= at < done.get(other, math.inf)
                   for other, t in received.items())
        (busy if is_busy else idle).append(ratio)
    if len(idle) < _MIN_HOST_REQUESTS or len(busy) < _MIN_HOST_REQUESTS:
        return None
    return _warm_spread(idle), _warm_spread(busy)


def _warm_requests(events: Sequence[Event]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(model, request id) -> `request.done` data of the requests received while a ready
    worker of their model was up."""
    ready: dict[str, tuple[str, float]] = {}  # worker id -> (model, ready time)
    stopped: dict[str, float] = {}
    received: dict[str, tuple[str, float]] = {}  # request id -> (model, time)
    for event in events:
        if event.kind == "worker.ready" and event.worker_id and event.model:
            ready.setdefault(event.worker_id, (event.model, event.time))
        elif event.kind == "worker.stop_requested" and event.worker_id:
            stopped.setdefault(event.worker_id, event.time)
        elif event.kind == "request.received" and event.request_id and event.model:
            received.setdefault(event.request_id, (event.model, event.time))
    warm: dict[tuple[str, str], Mapping[str, Any]] = {}
    for event in events:
        if event.kind != "request.done" or event.request_id not in received:
            continue
        model, at = received[event.request_id or ""]
        if any(m == model and t <= at < stopped.get(w, math.inf) for w, (m, t) in ready.items()):
            warm[(model, event.request_id or "")] = event.data
    return warm


def _startup_s(event: Event, fetch_s: Mapping[str, tuple[float, float]]) -> float | None:
    phases = event.data.get("phases")
    if not isinstance(phases, dict):
        return None
    started, ready = phases.get("process_started_at"), phases.get("ready_at")
    if not _is_number(started) or not _is_number(ready):
        return None
    span = float(ready) - float(started)
    fetch = fetch_s.get(event.worker_id or "")
    # a fetch that ended before the process started did not overlap it (`serverless_vllm`)
    if fetch is not None and fetch[1] > float(started):
        span -= min(fetch[0], fetch[1] - float(started))
    return max(0.0, span)


def _request_times(data: Mapping[str, Any]) -> tuple[float | None, float | None]:
    queue_s, ttft_s, e2e_s = (data.get(k) for k in ("queue_s", "ttft_s", "e2e_s"))
    if not _is_number(queue_s) or not _is_number(ttft_s):
        return None, None
    prefill_s = max(0.0, float(ttft_s) - float(queue_s))
    usage = data.get("usage")
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    tpot_s = None
    if _is_number(e2e_s) and isinstance(tokens, int) and tokens > 1:
        tpot_s = max(0.0, float(e2e_s) - float(ttft_s)) / (tokens - 1)
    return prefill_s, tpot_s


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None
