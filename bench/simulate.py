"""The published end-to-end experiment, simulated: TTFT SLO attainment of every policy.

384 endpoints (3 apps x 7B/13B x 64 copies) on the published hybrid cluster (2 x 4 A10 at
64 Gbps, 4 x 4 V100 at 16 Gbps, 32 Gbps storage), bursty arrivals (gamma, CV 2/4/8) at 0.6,
0.7 and 0.8 requests/s for an hour (`--quick`: 10 minutes). Every policy of the scheduler
(`serverless_vllm`, `single_worker`, `hydraserve`, and `hydraserve` with the host-memory
cache) replays the same workloads; the table is printed next to the published ranges.

    .venv/bin/python bench/simulate.py [--quick] [--out-dir DIR]

See docs/SIMULATOR.md for the model, its assumptions and the results.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydraserve.sim.cluster import GB, PUBLISHED
from hydraserve.sim.engine import SimConfig, simulate
from hydraserve.sim.scenario import PUBLISHED_ATTAINMENT, published_workload
from hydraserve.sim.summary import RunSummary, summarize_run
from hydraserve.workload.records import write_jsonl

# (column, policy, cache on)
RUNS = (("serverless_vllm", "serverless_vllm", False), ("single_worker", "single_worker", False),
        ("hydraserve", "hydraserve", False), ("hydraserve+cache", "hydraserve", True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10-minute traces, not 1 hour")
    parser.add_argument("--cvs", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-alive-s", type=float, default=60.0)
    parser.add_argument("--cache-gb", type=float, default=64.0,
                        help="host-memory cache per server for the +cache run")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write every run's results JSONL here")
    args = parser.parse_args()
    duration_s = 600.0 if args.quick else 3600.0
    started = time.perf_counter()
    rows: list[tuple[float, float, int, dict[str, RunSummary]]] = []
    for cv_index, cv in enumerate(args.cvs):
        for rate_index, rate in enumerate(args.rates):
            seed = args.seed * 100 + cv_index * 10 + rate_index
            header, requests = published_workload(rate=rate, cv=cv, duration_s=duration_s,
                                                  seed=seed)
            summaries = {}
            for column, policy, has_cache in RUNS:
                config = SimConfig(keep_alive_s=args.keep_alive_s,
                                   cache_bytes=args.cache_gb * GB if has_cache else 0.0)
                result = simulate(requests, policy=policy, cluster=PUBLISHED, config=config,
                                  workload=header)
                summaries[column] = summarize_run(result.header.name, result.results,
                                                  result.workers)
                if args.out_dir is not None:
                    write_jsonl(args.out_dir / f"cv{cv:g}-rate{rate:g}-{column}.jsonl",
                                result.records())
            rows.append((cv, rate, len(requests), summaries))
            print(_row(cv, rate, len(requests), summaries), flush=True)
    print(_table(rows, duration_s=duration_s, wall_s=time.perf_counter() - started))
    return 0


def _row(cv: float, rate: float, num: int, summaries: dict[str, RunSummary]) -> str:
    cells = " | ".join(f"{summaries[c].ttft_attainment:.1%}" for c, _, _ in RUNS)
    ratio = _ratio(summaries)
    cost = " / ".join(f"{summaries[c].cost_gb_s_per_request:.0f}" for c, _, _ in RUNS)
    return f"| {cv:g} | {rate:g} | {num} | {cells} | {ratio:.2f}x | {cost} |"


def _ratio(summaries: dict[str, RunSummary]) -> float:
    base = summaries["serverless_vllm"].ttft_attainment
    return summaries["hydraserve"].ttft_attainment / base if base else float("inf")


def _table(rows: list[tuple[float, float, int, dict[str, RunSummary]]], *, duration_s: float,
           wall_s: float) -> str:
    columns = " | ".join(c for c, _, _ in RUNS)
    lines = [f"\nTTFT SLO attainment, {duration_s / 60:.0f}-minute traces, simulated in "
             f"{wall_s:.0f} s:",
             f"| CV | rate (req/s) | requests | {columns} | hydraserve / serverless_vllm "
             "| cost GB·s/request (same order) |",
             "|---|---|---|" + "---|" * (len(RUNS) + 2)]
    lines += [_row(cv, rate, num, s) for cv, rate, num, s in rows]
    lines.append("\n| | simulated (min–max) | published |")
    lines.append("|---|---|---|")
    for column, _, _ in RUNS:
        values = [s[column].ttft_attainment for *_, s in rows]
        published = PUBLISHED_ATTAINMENT.get(column)
        shown = f"{published[0]:.1%}–{published[1]:.1%}" if published else "—"
        lines.append(f"| {column} | {min(values):.1%}–{max(values):.1%} | {shown} |")
    ratios = [_ratio(s) for *_, s in rows]
    lines.append(f"| hydraserve / serverless_vllm | {min(ratios):.2f}x–{max(ratios):.2f}x "
                 "| 1.43x–1.74x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
