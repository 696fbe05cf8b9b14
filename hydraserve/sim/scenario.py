"""The published end-to-end experiment as a workload: 384 endpoints, bursty arrivals.

3 applications x 2 model sizes (7B- and 13B-class) x 64 copies, each copy its own endpoint,
with the published SLOs. Arrivals are a SIMPLIFIED STAND-IN for the Azure Functions trace the
published experiment sampled: every model is an independent renewal process with gamma
inter-arrival times of coefficient of variation `cv` (shape 1 / cv²), together `rate`
requests/s. The models are equally popular (`zipf_s` 0), or model k of a seeded random ranking
gets a share ∝ 1 / k^zipf_s of the rate: the Azure trace's popularity is heavily skewed (a few
functions take most invocations), and Zipf is an ASSUMED shape for that, not a fit. Prompt
and output lengths are uniform in per-app ranges chosen to resemble the published datasets
(ShareGPT-like chat, HumanEval-like code, LongBench-like summaries); they are assumptions, not
samples of those datasets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hydraserve.workload.records import AppName, WorkloadHeader, WorkloadRequest


@dataclass(frozen=True)
class AppProfile:
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    # size class -> (TTFT SLO s, TPOT SLO s), as published
    slos: dict[str, tuple[float, float]]


APPS: dict[AppName, AppProfile] = {
    "chatbot": AppProfile((32, 1024), (16, 512), {"7b": (7.5, 0.200), "13b": (12.0, 0.200)}),
    "code": AppProfile((64, 512), (32, 256), {"7b": (7.5, 0.084), "13b": (12.0, 0.116)}),
    "summarization": AppProfile((1024, 3584), (32, 256),
                                {"7b": (37.5, 0.084), "13b": (60.0, 0.116)}),
}
SIZES = ("7b", "13b")
NUM_COPIES = 64

# The published attainment ranges over the bursty workloads (TTFT SLO attainment).
PUBLISHED_ATTAINMENT = {"serverless_vllm": (0.439, 0.535), "hydraserve": (0.738, 0.842),
                        "hydraserve+cache": (0.783, 0.882)}


def published_models(num_copies: int = NUM_COPIES) -> list[tuple[str, AppName, str]]:
    """(model name, app, size class) of every endpoint, e.g. `code-13b-07`."""
    return [(f"{app}-{size}-{copy:02d}", app, size)
            for app in APPS for size in SIZES for copy in range(num_copies)]


def popularity_weights(num_models: int, *, zipf_s: float, seed: int) -> list[float]:
    """Each model's relative popularity, in model order: all 1 for `zipf_s` 0, else 1 / k^s
    for its rank k in an order drawn from `seed` (so popularity is not tied to app, size or
    name)."""
    if zipf_s == 0:
        return [1.0] * num_models
    ranks = list(range(1, num_models + 1))
    random.Random(f"popularity-{seed}").shuffle(ranks)
    return [rank ** -zipf_s for rank in ranks]


def published_workload(*, rate: float, cv: float, duration_s: float, seed: int,
                       num_copies: int = NUM_COPIES, zipf_s: float = 0.0
                       ) -> tuple[WorkloadHeader, list[WorkloadRequest]]:
    if zipf_s < 0:
        raise ValueError(f"zipf_s {zipf_s} must be >= 0")
    models = published_models(num_copies)
    weights = popularity_weights(len(models), zipf_s=zipf_s, seed=seed)
    total_weight = sum(weights)
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)
    arrivals: list[tuple[float, str, AppName, str]] = []
    for (name, app, size), weight in zip(models, weights, strict=True):
        mean_gap_s = total_weight / (rate * weight)
        # start each process in its stationary phase: the gap around a random instant is
        # length-biased (gamma of shape + 1), and the instant falls uniformly inside it
        t = rng.gammavariate(shape + 1, mean_gap_s / shape) * rng.random()
        while t < duration_s:
            arrivals.append((t, name, app, size))
            t += rng.gammavariate(shape, mean_gap_s / shape)
    arrivals.sort()
    requests = []
    for index, (t, name, app, size) in enumerate(arrivals):
        profile = APPS[app]
        ttft_slo_s, tpot_slo_s = profile.slos[size]
        requests.append(WorkloadRequest(
            request_id=f"r{index:06d}", arrival_s=round(t, 6), model=name, app=app,
            prompt_tokens=rng.randint(*profile.prompt_tokens),
            output_tokens=rng.randint(*profile.output_tokens),
            ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s))
    popularity = "equal popularity" if zipf_s == 0 else f"Zipf popularity s={zipf_s:g}"
    header = WorkloadHeader(
        seed=seed, arrival="gamma", rate=rate, cv=cv, duration_s=duration_s,
        num_models=len(models),
        description=(f"published mix: {len(APPS)} apps x {len(SIZES)} sizes x {num_copies} "
                     f"copies; per-model gamma renewal arrivals, {popularity} "
                     "(Azure-trace stand-in)"))
    return header, requests
