"""The published end-to-end experiment, simulated: TTFT SLO attainment of every policy.

384 endpoints (3 apps x 7B/13B x 64 copies) on the published hybrid cluster (2 x 4 A10 at
64 Gbps, 4 x 4 V100 at 16 Gbps, 32 Gbps storage), bursty arrivals (gamma, CV 2/4/8) at 0.6,
0.7 and 0.8 requests/s for an hour (`--quick`: 10 minutes), with equally popular models and
with Zipf popularity (`--zipf-s`). Every policy of the scheduler (`serverless_vllm`,
`single_worker`, `hydraserve`, and `hydraserve` with the host-memory cache) replays the same
workloads, as it runs live: idle endpoints are evicted for cold starts (A), cold starts that
can still meet their SLO go first (B), and a model whose requests outnumber its endpoints'
slots scales out (C). The ablation columns switch off scale-out (`-scale`), then all three
(`-none`: the policies as they were before any). The tables are printed next to the
published ranges, with each run's wall time.

    .venv/bin/python bench/simulate.py [--quick] [--zipf-s 0 1] [--columns ...] [--out-dir DIR]

See docs/SIMULATOR.md for the model, its assumptions and the results.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydraserve.sim.cluster import GB, PUBLISHED
from hydraserve.sim.engine import SimConfig, SimResult, Simulator, sim_policy
from hydraserve.sim.scenario import PUBLISHED_ATTAINMENT, published_workload
from hydraserve.sim.summary import RunSummary, summarize_run
from hydraserve.workload.records import RunHeader, WorkloadHeader, WorkloadRequest, write_jsonl


@dataclass(frozen=True)
class Column:
    name: str
    policy: str
    has_cache: bool = False
    evict_idle: bool = True
    deadline_order: bool = True
    scale_out: bool = True


COLUMNS = (Column("serverless_vllm", "serverless_vllm"), Column("single_worker", "single_worker"),
           Column("hydraserve", "hydraserve"), Column("hydraserve+cache", "hydraserve", True),
           # the ablation: without scale-out (one endpoint per model), then also without
           # eviction and deadline order (waiting for keep-alive, oldest first: the policies
           # as they were); `-deadline`: without the deadline order alone
           Column("serverless_vllm-scale", "serverless_vllm", scale_out=False),
           Column("hydraserve-scale", "hydraserve", scale_out=False),
           Column("serverless_vllm-none", "serverless_vllm", evict_idle=False,
                  deadline_order=False, scale_out=False),
           Column("hydraserve-none", "hydraserve", evict_idle=False, deadline_order=False,
                  scale_out=False))
# more of the ablation, not run by default
EXTRA_COLUMNS = (Column("serverless_vllm-deadline", "serverless_vllm", deadline_order=False),
                 Column("hydraserve-deadline", "hydraserve", deadline_order=False))
BY_NAME = {c.name: c for c in COLUMNS + EXTRA_COLUMNS}


@dataclass(frozen=True)
class Row:
    cv: float
    rate: float
    num_requests: int
    summaries: dict[str, RunSummary]
    # column -> seconds of wall time its run took
    wall_s: dict[str, float]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10-minute traces, not 1 hour")
    parser.add_argument("--cvs", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.6, 0.7, 0.8])
    parser.add_argument("--zipf-s", type=float, nargs="+", default=[0.0, 1.0],
                        help="popularity skews to run: 0 equal, s > 0 Zipf 1/rank^s")
    parser.add_argument("--columns", nargs="+", choices=list(BY_NAME),
                        default=[c.name for c in COLUMNS])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-alive-s", type=float, default=60.0)
    parser.add_argument("--cache-gb", type=float, default=64.0,
                        help="host-memory cache per server for the +cache run")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="write every run's results JSONL here")
    args = parser.parse_args()
    columns = [BY_NAME[name] for name in args.columns]
    duration_s = 600.0 if args.quick else 3600.0
    started = time.perf_counter()
    tables = []
    for zipf_s in args.zipf_s:
        print(f"\n## {_popularity(zipf_s)}", flush=True)
        rows = []
        for cv_index, cv in enumerate(args.cvs):
            for rate_index, rate in enumerate(args.rates):
                seed = args.seed * 100 + cv_index * 10 + rate_index
                header, requests = published_workload(rate=rate, cv=cv, duration_s=duration_s,
                                                      seed=seed, zipf_s=zipf_s)
                row = _run_row(args, columns, header, requests, cv=cv, rate=rate,
                               tag=f"zipf{zipf_s:g}-cv{cv:g}-rate{rate:g}")
                rows.append(row)
                print(_row(row, columns), flush=True)
        tables.append(_table(rows, columns, zipf_s=zipf_s))
    print(f"\nTTFT SLO attainment, {duration_s / 60:.0f}-minute traces, simulated in "
          f"{time.perf_counter() - started:.0f} s")
    print("\n".join(tables))
    return 0


def _run_row(args: argparse.Namespace, columns: list[Column], header: WorkloadHeader,
             requests: list[WorkloadRequest], *, cv: float, rate: float, tag: str) -> Row:
    summaries: dict[str, RunSummary] = {}
    wall_s: dict[str, float] = {}
    for column in columns:
        config = SimConfig(keep_alive_s=args.keep_alive_s,
                           cache_bytes=args.cache_gb * GB if column.has_cache else 0.0)
        policy = replace(sim_policy(column.policy), evict_idle=column.evict_idle,
                         deadline_order=column.deadline_order, scale_out=column.scale_out)
        run_started = time.perf_counter()
        results, workers = Simulator(requests, policy=policy, cluster=PUBLISHED,
                                     config=config).run()
        wall_s[column.name] = time.perf_counter() - run_started
        summaries[column.name] = summarize_run(f"sim:{column.name}", results, workers)
        print(f"  {tag} {column.name}: {summaries[column.name].ttft_attainment:.1%} "
              f"in {wall_s[column.name]:.1f} s wall", flush=True)
        if args.out_dir is not None:
            result = SimResult(RunHeader(name=f"sim:{column.name}", policy=column.policy,
                                         workload=header), results, workers)
            write_jsonl(args.out_dir / f"{tag}-{column.name}.jsonl", result.records())
    return Row(cv, rate, len(requests), summaries, wall_s)


def _popularity(zipf_s: float) -> str:
    return "equal popularity" if zipf_s == 0 else f"Zipf popularity, s = {zipf_s:g}"


def _row(row: Row, columns: list[Column]) -> str:
    cells = " | ".join(f"{row.summaries[c.name].ttft_attainment:.1%}" for c in columns)
    ratio = _ratio(row.summaries)
    cost = " / ".join(f"{row.summaries[c.name].cost_gb_s_per_request:.0f}" for c in columns)
    return (f"| {row.cv:g} | {row.rate:g} | {row.num_requests} | {cells} | "
            f"{'—' if ratio is None else f'{ratio:.2f}x'} | {cost} | "
            f"{max(row.wall_s.values()):.1f} |")


def _ratio(summaries: dict[str, RunSummary]) -> float | None:
    if "serverless_vllm" not in summaries or "hydraserve" not in summaries:
        return None
    base = summaries["serverless_vllm"].ttft_attainment
    return summaries["hydraserve"].ttft_attainment / base if base else float("inf")


def _table(rows: list[Row], columns: list[Column], *, zipf_s: float) -> str:
    names = " | ".join(c.name for c in columns)
    lines = [f"\n{_popularity(zipf_s)}:",
             f"| CV | rate (req/s) | requests | {names} | hydraserve / serverless_vllm "
             "| cost GB·s/request (same order) | slowest run (s wall) |",
             "|---|---|---|" + "---|" * (len(columns) + 3)]
    lines += [_row(row, columns) for row in rows]
    lines.append("\n| | simulated (min–max) | published |")
    lines.append("|---|---|---|")
    for column in columns:
        values = [row.summaries[column.name].ttft_attainment for row in rows]
        published = PUBLISHED_ATTAINMENT.get(column.name)
        shown = f"{published[0]:.1%}–{published[1]:.1%}" if published else "—"
        lines.append(f"| {column.name} | {min(values):.1%}–{max(values):.1%} | {shown} |")
    ratios = [r for r in (_ratio(row.summaries) for row in rows) if r is not None]
    if ratios:
        lines.append(f"| hydraserve / serverless_vllm | {min(ratios):.2f}x–{max(ratios):.2f}x "
                     "| 1.43x–1.74x |")
    walls = [w for row in rows for w in row.wall_s.values()]
    lines.append(f"\nWall time of one run: {min(walls):.1f}–{max(walls):.1f} s "
                 f"(mean {sum(walls) / len(walls):.1f} s).")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
