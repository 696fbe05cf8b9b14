"""Synthetic workloads: when requests arrive, to which model, of which application and length.

Pure and seeded: `generate(config)` draws everything from one `numpy.random.Generator` made
from `config.seed`, so the same config gives the same workload. Arrivals come from a Poisson
process, a gamma renewal process with a given coefficient of variation (CV), a trace file
(`time_s[,model]` CSV, optionally squeezed in time), or the trace's per-window rates refit
with gamma arrivals (`windowed_gamma`, as the published artifact does with the Azure Functions
trace). Models are `<app>-<size>-<i>` endpoints of three applications and two model sizes,
each request carrying its application's SLOs for that size. docs/WORKLOADS.md has the details.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, get_args

import numpy as np

from hydraserve.workload.records import AppName, WorkloadHeader, WorkloadRequest

Arrival = Literal["poisson", "gamma", "trace", "windowed_gamma"]
ModelSize = Literal["7b", "13b"]
APPS: tuple[AppName, ...] = get_args(AppName)
SIZES: tuple[ModelSize, ...] = get_args(ModelSize)
T = TypeVar("T")

# (app, size) -> (TTFT SLO s, TPOT SLO s), as published
SLOS: dict[tuple[str, str], tuple[float, float]] = {
    ("chatbot", "7b"): (7.5, 0.200),
    ("chatbot", "13b"): (12.0, 0.200),
    ("code", "7b"): (7.5, 0.084),
    ("code", "13b"): (12.0, 0.116),
    ("summarization", "7b"): (37.5, 0.084),
    ("summarization", "13b"): (60.0, 0.116),
}


@dataclass(frozen=True)
class LengthDist:
    """Token counts ~ round(lognormal(log(median), sigma)), clipped to [min, max]."""

    median: float
    sigma: float
    min_tokens: int
    max_tokens: int

    def sample(self, rng: np.random.Generator, *, cap: int | None = None) -> int:
        value = round(float(rng.lognormal(math.log(self.median), self.sigma)))
        upper = self.max_tokens if cap is None else min(self.max_tokens, cap)
        return max(1, min(max(value, self.min_tokens), upper))


# app -> (prompt length, output length); chatbot: short prompts (ShareGPT-like), code:
# medium prompts and short completions, summarization: long documents, short summaries
LENGTHS: dict[str, tuple[LengthDist, LengthDist]] = {
    "chatbot": (LengthDist(256, 0.8, 16, 2048), LengthDist(128, 0.7, 8, 1024)),
    "code": (LengthDist(512, 0.6, 32, 2048), LengthDist(96, 0.6, 8, 512)),
    "summarization": (LengthDist(1536, 0.4, 256, 4096), LengthDist(128, 0.5, 16, 512)),
}


@dataclass(frozen=True)
class TraceArrival:
    time_s: float
    # the trace's own key (an Azure function, a model); None when the CSV has no model column
    key: str | None = None


@dataclass(frozen=True)
class Endpoint:
    model: str
    app: AppName
    size: ModelSize


@dataclass(frozen=True)
class GenerateConfig:
    seed: int = 0
    arrival: Arrival = "poisson"
    # mean requests per second (poisson, gamma)
    rate: float = 1.0
    cv: float = 1.0
    # seconds of workload; for a trace, default: the squeezed length, or its last arrival
    duration_s: float | None = None
    num_models: int = 6
    # real model names, one per endpoint (replaces `<app>-<size>-<i>`)
    models: tuple[str, ...] = ()
    apps: tuple[AppName, ...] = APPS
    # None: round-robin; else a weight per app in `apps`, drawn per endpoint
    app_weights: tuple[float, ...] | None = None
    sizes: tuple[ModelSize, ...] = SIZES
    size_weights: tuple[float, ...] | None = None
    popularity: Literal["uniform", "zipf"] = "uniform"
    zipf_s: float = 1.0
    # trace: the `time_s[,model]` CSV's rows, and (trace_s, target_s): squeeze trace_s seconds
    # of it into target_s
    trace: tuple[TraceArrival, ...] = ()
    squeeze: tuple[float, float] | None = None
    # windowed_gamma: window length (s, after squeezing) and CV = cv * cv_factor
    window_s: float = 600.0
    cv_factor: float = 1.0
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    lengths: dict[str, tuple[LengthDist, LengthDist]] = field(default_factory=lambda: LENGTHS)

    def __post_init__(self) -> None:
        if self.arrival not in get_args(Arrival):
            raise ValueError(f"arrival {self.arrival!r} is not one of {get_args(Arrival)}")
        if self.rate <= 0 or self.cv <= 0 or self.cv_factor <= 0 or self.window_s <= 0:
            raise ValueError(f"rate {self.rate}, cv {self.cv}, cv_factor {self.cv_factor} "
                             f"and window_s {self.window_s} must be positive")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s {self.duration_s} must be positive")
        if self.arrival in ("poisson", "gamma") and self.duration_s is None:
            raise ValueError(f"arrival {self.arrival!r} needs duration_s")
        if self.arrival in ("trace", "windowed_gamma") and not self.trace:
            raise ValueError(f"arrival {self.arrival!r} needs a trace with at least one row")
        if self.num_models < 1:
            raise ValueError(f"num_models {self.num_models} must be at least 1")
        if self.models and len(self.models) != self.num_models:
            raise ValueError(f"{len(self.models)} model names for {self.num_models} models")
        for name, values, weights in (("app", self.apps, self.app_weights),
                                      ("size", self.sizes, self.size_weights)):
            if not values:
                raise ValueError(f"no {name}s to assign")
            if weights is not None and (len(weights) != len(values) or min(weights) < 0
                                        or sum(weights) <= 0):
                raise ValueError(f"{name} weights {weights} do not fit {values}")
        if unknown := set(self.apps) - set(APPS):
            raise ValueError(f"unknown apps {sorted(unknown)}; known: {APPS}")
        if unknown := set(self.sizes) - set(SIZES):
            raise ValueError(f"unknown sizes {sorted(unknown)}; known: {SIZES}")
        if self.squeeze is not None and min(self.squeeze) <= 0:
            raise ValueError(f"squeeze {self.squeeze} must be two positive lengths")


# --- arrival processes ----------------------------------------------------------------------


def poisson_arrivals(rng: np.random.Generator, rate: float, duration_s: float, *,
                     start_s: float = 0.0) -> list[float]:
    """A Poisson process of `rate` on [start_s, start_s + duration_s)."""
    return gamma_arrivals(rng, rate, 1.0, duration_s, start_s=start_s)


def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, duration_s: float, *,
                   start_s: float = 0.0) -> list[float]:
    """A renewal process on [start_s, start_s + duration_s): inter-arrival times
    ~ Gamma(shape=1/cv², scale=cv²/rate), mean 1/rate and CV `cv` (cv 1 is Poisson)."""
    shape, scale = 1.0 / cv**2, cv**2 / rate
    times: list[float] = []
    now = start_s
    end = start_s + duration_s
    # draw in batches of about the expected count; a few rounds at most
    batch = max(16, int(rate * duration_s * 1.1) + 16)
    while True:
        for gap in rng.gamma(shape, scale, size=batch):
            now += float(gap)
            if now >= end:
                return times
            times.append(now)


def read_trace(path: Path) -> tuple[TraceArrival, ...]:
    """A CSV with a header row: `time_s` (seconds from the trace's start) and optionally
    `model` (any key: a function, an app). Rows in any order; returned sorted by time."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "time_s" not in reader.fieldnames:
            raise ValueError(f"{path}: needs a header row with a time_s column")
        has_model = "model" in reader.fieldnames
        rows = []
        for number, row in enumerate(reader, start=2):
            try:
                time_s = float(row["time_s"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: time_s {row['time_s']!r} "
                                 "is not a number") from exc
            if time_s < 0 or not math.isfinite(time_s):
                raise ValueError(f"{path}:{number}: time_s {time_s} must be >= 0")
            rows.append(TraceArrival(time_s, row["model"] if has_model else None))
    return tuple(sorted(rows, key=lambda r: r.time_s))


def _squeezed(config: GenerateConfig) -> tuple[list[TraceArrival], float]:
    """The trace's arrivals with times scaled by the squeeze, and the workload's length."""
    factor = 1.0 if config.squeeze is None else config.squeeze[1] / config.squeeze[0]
    rows = [TraceArrival(r.time_s * factor, r.key) for r in config.trace]
    if config.duration_s is not None:
        duration = config.duration_s
    elif config.squeeze is not None:
        duration = config.squeeze[1]
    else:
        # just past the last arrival, so it is inside [0, duration)
        duration = math.floor(rows[-1].time_s) + 1.0
    return [r for r in rows if r.time_s < duration], duration


def windowed_gamma_arrivals(rng: np.random.Generator, times: list[float], duration_s: float,
                            *, window_s: float, cv: float) -> list[float]:
    """Per window of `window_s`, gamma arrivals at the rate `times` have in that window."""
    counts = np.bincount(np.floor(np.asarray(times) / window_s).astype(int),
                         minlength=math.ceil(duration_s / window_s))
    out: list[float] = []
    for index, count in enumerate(counts):
        start = index * window_s
        length = min(window_s, duration_s - start)
        if count and length > 0:
            out += gamma_arrivals(rng, count / length, cv, length, start_s=start)
    return out


# --- the model and application mix ----------------------------------------------------------


def _assign(rng: np.random.Generator, values: tuple[T, ...],
               weights: tuple[float, ...] | None, num: int, *, stride: int = 1) -> list[T]:
    if weights is None:
        return [values[(i // stride) % len(values)] for i in range(num)]
    p = np.asarray(weights, dtype=float) / sum(weights)
    return [values[int(k)] for k in rng.choice(len(values), size=num, p=p)]


def endpoints(config: GenerateConfig, rng: np.random.Generator) -> list[Endpoint]:
    """The model endpoints: apps round-robin (or drawn by weight); sizes round-robin over
    each pass through the apps, so 6 models cover every (app, size) pair once."""
    apps = _assign(rng, config.apps, config.app_weights, config.num_models)
    sizes = _assign(rng, config.sizes, config.size_weights, config.num_models,
                    stride=len(config.apps))
    return [Endpoint(config.models[i] if config.models else f"{app}-{size}-{i}", app, size)
            for i, (app, size) in enumerate(zip(apps, sizes, strict=True))]


def popularity(config: GenerateConfig) -> np.ndarray:
    """Each endpoint's share of the requests: uniform, or Zipf (∝ 1/rank^s, model 0 first)."""
    if config.popularity == "uniform":
        weights = np.ones(config.num_models)
    else:
        weights = 1.0 / np.arange(1, config.num_models + 1) ** config.zipf_s
    return weights / weights.sum()


def _arrivals(config: GenerateConfig, rng: np.random.Generator
              ) -> tuple[list[float], list[str | None], float]:
    """Arrival times, each one's trace key (None: no key), and the workload's length."""
    if config.arrival == "poisson":
        assert config.duration_s is not None
        times = poisson_arrivals(rng, config.rate, config.duration_s)
        return times, [None] * len(times), config.duration_s
    if config.arrival == "gamma":
        assert config.duration_s is not None
        times = gamma_arrivals(rng, config.rate, config.cv, config.duration_s)
        return times, [None] * len(times), config.duration_s
    rows, duration = _squeezed(config)
    if config.arrival == "trace":
        return [r.time_s for r in rows], [r.key for r in rows], duration
    # windowed_gamma: refit each key's (each function's) arrivals on its own
    by_key: dict[str | None, list[float]] = {}
    for row in rows:
        by_key.setdefault(row.key, []).append(row.time_s)
    drawn = [(t, key) for key, times in by_key.items()
             for t in windowed_gamma_arrivals(rng, times, duration, window_s=config.window_s,
                                              cv=config.cv * config.cv_factor)]
    drawn.sort(key=lambda item: item[0])
    return [t for t, _ in drawn], [key for _, key in drawn], duration


def generate(config: GenerateConfig) -> tuple[WorkloadHeader, list[WorkloadRequest]]:
    """The workload `config` describes; identical for identical configs."""
    rng = np.random.default_rng(config.seed)
    eps = endpoints(config, rng)
    times, keys, duration = _arrivals(config, rng)
    if not times:
        raise ValueError("the workload has no requests; raise the rate or the duration")
    share = popularity(config)
    # a trace key keeps one endpoint: keys in order of first appearance, round-robin
    key_index: dict[str, int] = {}
    requests = []
    for index, (time_s, key) in enumerate(zip(times, keys, strict=True)):
        if key is None:
            endpoint = eps[int(rng.choice(len(eps), p=share))]
        else:
            endpoint = eps[key_index.setdefault(key, len(key_index)) % len(eps)]
        prompt_dist, output_dist = config.lengths[endpoint.app]
        ttft_slo, tpot_slo = SLOS[(endpoint.app, endpoint.size)]
        requests.append(WorkloadRequest(
            request_id=f"r{index:06d}", arrival_s=round(time_s, 6), model=endpoint.model,
            app=endpoint.app,
            prompt_tokens=prompt_dist.sample(rng, cap=config.max_prompt_tokens),
            output_tokens=output_dist.sample(rng, cap=config.max_output_tokens),
            ttft_slo_s=ttft_slo, tpot_slo_s=tpot_slo))
    header = WorkloadHeader(
        seed=config.seed, arrival=config.arrival, rate=len(requests) / duration,
        cv=config.cv * config.cv_factor if config.arrival in ("gamma", "windowed_gamma")
        else None,
        duration_s=duration, num_models=config.num_models, description=describe(config, eps))
    return header, requests


def describe(config: GenerateConfig, eps: list[Endpoint]) -> str:
    mix = ", ".join(f"{e.model}={e.app}/{e.size}" for e in eps)
    parts = [f"models: {mix}", f"popularity: {config.popularity}"
             + (f" s={config.zipf_s}" if config.popularity == "zipf" else "")]
    if config.arrival in ("trace", "windowed_gamma") and config.squeeze is not None:
        parts.append(f"squeeze: {config.squeeze[0]:g}s -> {config.squeeze[1]:g}s")
    if config.arrival == "windowed_gamma":
        parts.append(f"window: {config.window_s:g}s")
    parts.append("lengths: lognormal per app (docs/WORKLOADS.md)")
    return "; ".join(parts)
