"""A simulated run in a few numbers: SLO attainment, latency, cost.

- TTFT SLO attainment: the fraction of all requests whose first token came within their
  TTFT SLO (a request with no token counts as a miss); TPOT attainment likewise.
- Cost: GPU memory held x time, summed over workers (placement to stop), per request, in
  GB·s (GB = 1e9 bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hydraserve.workload.records import RequestResult, WorkerLifetime


@dataclass(frozen=True)
class RunSummary:
    name: str
    num_requests: int
    num_workers: int
    ttft_attainment: float
    tpot_attainment: float
    mean_ttft_s: float
    p99_ttft_s: float
    cost_gb_s_per_request: float


def summarize_run(name: str, results: Sequence[RequestResult],
                  workers: Sequence[WorkerLifetime]) -> RunSummary:
    num = len(results)
    ttfts = sorted(r.ttft_s for r in results if r.ttft_s is not None)
    ttft_ok = sum(1 for r in results if r.ttft_s is not None and r.ttft_s <= r.ttft_slo_s)
    tpot_ok = sum(1 for r in results if r.status == "ok"
                  and (r.tpot_s is None or r.tpot_s <= r.tpot_slo_s))
    gb_s = sum(w.gpu_memory_bytes / 1e9 * (w.end_s - w.start_s) for w in workers)
    return RunSummary(
        name=name, num_requests=num, num_workers=len(workers),
        ttft_attainment=ttft_ok / num if num else 0.0,
        tpot_attainment=tpot_ok / num if num else 0.0,
        mean_ttft_s=sum(ttfts) / len(ttfts) if ttfts else float("nan"),
        p99_ttft_s=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan"),
        cost_gb_s_per_request=gb_s / num if num else 0.0)


def format_summary(summary: RunSummary) -> str:
    return (f"{summary.name}: {summary.num_requests} requests, {summary.num_workers} workers; "
            f"TTFT SLO attainment {summary.ttft_attainment:.1%}, TPOT "
            f"{summary.tpot_attainment:.1%}; TTFT mean {summary.mean_ttft_s:.2f} s, p99 "
            f"{summary.p99_ttft_s:.2f} s; cost {summary.cost_gb_s_per_request:.0f} GB·s/request")
