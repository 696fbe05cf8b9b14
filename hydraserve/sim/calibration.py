"""The simulator's constants from the recorded events of real runs (`HS_EVENTS`).

- start-up: for each `worker.ready` with `data.phases`, the span `ready_at −
  process_started_at`, minus the worker's own fetch (`fetch.done` of the same worker, not a
  consolidation fetch, `data.fetch_s`) where that fetch overlapped the span (it ended after
  the process started); the median over workers. This is the time a cold start costs beyond
  its fetch, as the policy's calibration defines it.
- fetch bandwidth: the median `data.bytes_per_s` of `fetch.done` events that came over the
  network (`cached` false).
- prefill and tpot per model: from `request.done` timings (`RequestProgress.timings`, seconds
  from the gateway's acceptance): prefill = `ttft_s − queue_s`; tpot = `(e2e_s − ttft_s) /
  (usage.completion_tokens − 1)`; medians per model. Requests served by pipelines are not
  told apart in the events, so calibrate from runs of whole-model workers.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hydraserve.sim.cluster import Cluster, ServingTimes
from libs.common.messages import Event


@dataclass(frozen=True)
class ModelCalibration:
    prefill_s: float | None = None
    tpot_s: float | None = None


@dataclass(frozen=True)
class Calibration:
    startup_s: float | None = None
    fetch_bytes_per_s: float | None = None
    models: Mapping[str, ModelCalibration] = field(default_factory=dict)

    def apply(self, cluster: Cluster) -> Cluster:
        """The cluster with the measured start-up constant (bandwidths are configured)."""
        return cluster if self.startup_s is None else replace(cluster, startup_s=self.startup_s)

    def times(self, model: str, default: ServingTimes) -> ServingTimes:
        """The model's measured times (a prefill of the prompts measured), else `default`."""
        measured = self.models.get(model, ModelCalibration())
        return ServingTimes(
            tpot_s=default.tpot_s if measured.tpot_s is None else measured.tpot_s,
            prefill_base_s=(default.prefill_base_s if measured.prefill_s is None
                            else measured.prefill_s),
            prefill_s_per_token=(default.prefill_s_per_token if measured.prefill_s is None
                                 else 0.0))


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
    prefills: dict[str, list[float]] = {}
    tpots: dict[str, list[float]] = {}
    for event in events:
        if event.kind == "request.done" and event.model is not None:
            prefill_s, tpot_s = _request_times(event.data)
            if prefill_s is not None:
                prefills.setdefault(event.model, []).append(prefill_s)
            if tpot_s is not None:
                tpots.setdefault(event.model, []).append(tpot_s)
    models = {m: ModelCalibration(prefill_s=_median(prefills.get(m)), tpot_s=_median(tpots.get(m)))
              for m in sorted(prefills.keys() | tpots.keys())}
    return Calibration(startup_s=_median(startups), fetch_bytes_per_s=_median(bandwidths),
                       models=models)


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
