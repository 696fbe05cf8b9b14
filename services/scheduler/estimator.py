"""Cold-start estimates of the SLO-aware policy: DESIGN.md's reference formulas, pure.

- GPU memory per worker of degree p: ceil((model + kv) / p); a full-size worker: model + kv.
- TTFT(p) = size / (p · band) + prefill · (p − a + a/p) + queue_wait + startup,
  band the slowest chosen node's available bandwidth, a the number of full-size workers.
- TPOT(p) = tpot · (p − a + a/p) + per_hop · (p − 1).
- available bandwidth of a node for a new fetch: NIC / (n + 1) with n fetches in flight, or 0
  if that share would make one of them miss its deadline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.state import Fetch

# One full-size worker per pipeline: the one that survives consolidation.
NUM_FULL_SIZE_WORKERS = 1


@dataclass(frozen=True)
class CostModel:
    """The constants the formulas need that are not properties of a model.

    The defaults are ASSUMPTIONS, used until the policy has measured better (its
    `Calibration`, from worker.ready and request.done):
    - `startup_s` = 2.0 s: what a cold start costs beyond the weight fetch when every start-up
      stage overlaps it: process spawn, the worker's lean imports and runtime init, engine
      build and the load of the tensors that arrive last.
    - `per_hop_s` = 2 ms: one stage-to-stage activation transfer per decode step.
    - `prefill_s` = 0.25 s and `tpot_s` = 30 ms: a whole-model worker's prefill of a typical
      prompt and its time per output token, for a model nothing has been measured of yet.
    """

    startup_s: float = 2.0
    per_hop_s: float = 0.002
    prefill_s: float = 0.25
    tpot_s: float = 0.03

    def __post_init__(self) -> None:
        if min(self.startup_s, self.per_hop_s, self.prefill_s, self.tpot_s) < 0:
            raise ValueError(f"costs must be >= 0: {self}")


@dataclass(frozen=True)
class ColdStartInputs:
    """Everything a placer estimates a cold start with besides the model and the nodes."""

    startup_s: float
    prefill_s: float
    tpot_s: float
    per_hop_s: float
    # how long the model's oldest queued request has waited already
    queue_wait_s: float = 0.0


def moving_average(average: float | None, sample: float, *, weight: float) -> float:
    """An exponential moving average: the first sample as is, then `weight` per new sample."""
    if not 0 < weight <= 1:
        raise ValueError(f"need 0 < weight <= 1, got {weight}")
    return sample if average is None else (1 - weight) * average + weight * sample


@dataclass(frozen=True)
class DegreeChoice:
    degree: int
    num_full_size: int
    # available bandwidth of the slowest of the chosen nodes
    bandwidth_bytes_per_s: float
    ttft_s: float
    tpot_s: float
    meets_slo: bool


def pipeline_factor(degree: int, num_full_size: int) -> float:
    """p − a + a/p: a pipeline's prefill or decode step time relative to one whole worker."""
    if degree < 1 or not 0 <= num_full_size <= degree:
        raise ValueError(f"need degree >= 1 and 0 <= num_full_size <= degree, got "
                         f"degree={degree}, num_full_size={num_full_size}")
    return degree - num_full_size + num_full_size / degree


def worker_gpu_bytes(*, size_bytes: int, kv_cache_bytes: int, degree: int,
                     is_full_size: bool) -> int:
    """GPU memory of one worker of a degree-`degree` pipeline."""
    total = size_bytes + kv_cache_bytes
    return total if is_full_size else -(-total // degree)


def estimate_ttft(*, size_bytes: int, degree: int, bandwidth_bytes_per_s: float,
                  num_full_size: int, prefill_s: float, startup_s: float,
                  queue_wait_s: float = 0.0) -> float:
    """Seconds from placement to the first token of a degree-`degree` cold start."""
    if bandwidth_bytes_per_s <= 0:
        return math.inf
    fetch_s = size_bytes / (degree * bandwidth_bytes_per_s)
    return (fetch_s + prefill_s * pipeline_factor(degree, num_full_size)
            + queue_wait_s + startup_s)


def estimate_tpot(*, degree: int, num_full_size: int, tpot_s: float, per_hop_s: float) -> float:
    """Seconds per output token while the endpoint runs as a degree-`degree` pipeline."""
    return tpot_s * pipeline_factor(degree, num_full_size) + per_hop_s * (degree - 1)


def available_bandwidth(*, nic_bandwidth_bytes_per_s: float, fetches: Sequence[Fetch],
                        now: float) -> float:
    """The NIC share a new fetch on this node gets, or 0 if it would break a deadline.

    A fetch "breaks" when it would finish by its deadline at today's share NIC / n but not at
    NIC / (n + 1); one already late either way is not held against the newcomer.
    """
    share = nic_bandwidth_bytes_per_s / (len(fetches) + 1)
    if fetches:
        current_share = nic_bandwidth_bytes_per_s / len(fetches)
        for fetch in fetches:
            remaining = fetch.remaining_bytes(now)
            is_on_time = now + remaining / current_share <= fetch.deadline
            if is_on_time and now + remaining / share > fetch.deadline:
                return 0.0
    return share


def choose_degree(*, size_bytes: int, bandwidths: Sequence[float], ttft_slo_s: float,
                  tpot_slo_s: float, max_degree: int, prefill_s: float, tpot_s: float,
                  cost: CostModel, queue_wait_s: float = 0.0) -> DegreeChoice | None:
    """The smallest pipeline degree whose estimates meet both SLOs.

    `bandwidths` are the available bandwidths of the candidate nodes, one stage per node, so
    degree p uses the p fastest and is limited by the p-th. When no degree meets the SLOs the
    one with the lowest TTFT estimate is returned (meets_slo False); None when no node has
    bandwidth to give.
    """
    usable = sorted((b for b in bandwidths if b > 0), reverse=True)
    choices = []
    for degree in range(1, min(max_degree, len(usable)) + 1):
        num_full_size = min(NUM_FULL_SIZE_WORKERS, degree)
        band = usable[degree - 1]
        ttft = estimate_ttft(size_bytes=size_bytes, degree=degree, bandwidth_bytes_per_s=band,
                             num_full_size=num_full_size, prefill_s=prefill_s,
                             startup_s=cost.startup_s, queue_wait_s=queue_wait_s)
        tpot = estimate_tpot(degree=degree, num_full_size=num_full_size, tpot_s=tpot_s,
                             per_hop_s=cost.per_hop_s)
        choice = DegreeChoice(degree=degree, num_full_size=num_full_size,
                              bandwidth_bytes_per_s=band, ttft_s=ttft, tpot_s=tpot,
                              meets_slo=ttft <= ttft_slo_s and tpot <= tpot_slo_s)
        if choice.meets_slo:
            return choice
        choices.append(choice)
    return min(choices, key=lambda c: (c.ttft_s, c.degree), default=None)
