"""`python -m hydraserve.sim WORKLOAD.jsonl --policy P [--cache-gb G] --cluster C --out R`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hydraserve.sim.cluster import CLUSTERS, GB
from hydraserve.sim.engine import SimConfig, simulate
from hydraserve.sim.summary import format_summary, summarize_run
from hydraserve.workload.records import read_workload, write_jsonl
from services.scheduler.policy import POLICIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hydraserve.sim",
                                     description="Replay a workload on a simulated cluster.")
    parser.add_argument("workload", type=Path, help="workload JSONL (hydraserve.workload)")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="hydraserve")
    parser.add_argument("--cache-gb", type=float, default=0.0,
                        help="host-memory cache per server, GB (0: none)")
    parser.add_argument("--cluster", choices=sorted(CLUSTERS), default="published")
    parser.add_argument("--keep-alive-s", type=float, default=60.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True, help="results JSONL to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        header, requests = read_workload(args.workload)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = SimConfig(keep_alive_s=args.keep_alive_s, max_batch=args.max_batch,
                       cache_bytes=args.cache_gb * GB)
    started = time.perf_counter()
    result = simulate(requests, policy=args.policy, cluster=CLUSTERS[args.cluster],
                      config=config, workload=header)
    write_jsonl(args.out, result.records())
    summary = summarize_run(result.header.name, result.results, result.workers)
    print(f"{format_summary(summary)} [{time.perf_counter() - started:.1f} s wall] "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
