"""`hydraserve workload generate|replay|analyze`: make a workload file, run it against a
gateway into a results file, and summarize results files (docs/WORKLOADS.md). The parser is
built without importing numpy, openai or matplotlib; each command imports what it uses."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _squeeze(text: str) -> tuple[float, float]:
    trace_s, sep, target_s = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"squeeze {text!r} is not TRACE_S:TARGET_S")
    return float(trace_s), float(target_s)


def _mapping(text: str) -> tuple[str, str]:
    source, sep, target = text.partition("=")
    if not sep or not source or not target:
        raise argparse.ArgumentTypeError(f"model map {text!r} is not FROM=TO")
    return source, target


def add_workload_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `workload` and its subcommands to `commands` (an argparse subparsers object)."""
    workload = commands.add_parser(
        "workload", help="generate, replay and analyze workloads",
        description="Generate a workload file, replay it against a gateway, analyze results.")
    sub = workload.add_subparsers(dest="workload_command", required=True, metavar="SUBCOMMAND")

    gen = sub.add_parser("generate", help="write a seeded synthetic or trace-based workload")
    gen.add_argument("out", type=Path, help="the workload file to write (JSON Lines)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--arrival", default="poisson",
                     choices=["poisson", "gamma", "trace", "windowed_gamma"])
    gen.add_argument("--rate", type=float, default=1.0, help="requests/s (poisson, gamma)")
    gen.add_argument("--cv", type=float, default=1.0,
                     help="inter-arrival CV (gamma; windowed_gamma: times --cv-factor)")
    gen.add_argument("--duration", type=float, default=None,
                     help="seconds (required for poisson and gamma)")
    gen.add_argument("--trace", type=Path, default=None,
                     help="CSV with a header row: time_s[,model] (trace, windowed_gamma)")
    gen.add_argument("--squeeze", type=_squeeze, default=None, metavar="TRACE_S:TARGET_S",
                     help="squeeze TRACE_S seconds of the trace into TARGET_S")
    gen.add_argument("--window", type=float, default=600.0,
                     help="windowed_gamma: window seconds, after squeezing (default 600)")
    gen.add_argument("--cv-factor", type=float, default=1.0,
                     help="windowed_gamma: scale --cv by this (default 1)")
    gen.add_argument("--num-models", type=int, default=None,
                     help="model endpoints (default: 6, or the number of --models)")
    gen.add_argument("--models", type=_names, default=(),
                     help="comma-separated real model names, one per endpoint")
    gen.add_argument("--apps", type=_names, default=("chatbot", "code", "summarization"))
    gen.add_argument("--app-weights", type=_floats, default=None,
                     help="draw each endpoint's app by these weights (default round-robin)")
    gen.add_argument("--sizes", type=_names, default=("7b", "13b"))
    gen.add_argument("--size-weights", type=_floats, default=None)
    gen.add_argument("--popularity", default="uniform", choices=["uniform", "zipf"])
    gen.add_argument("--zipf-s", type=float, default=1.0)
    gen.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="clip prompt lengths (e.g. to a small model's context)")
    gen.add_argument("--max-output-tokens", type=int, default=None)

    rep = sub.add_parser("replay", help="send a workload to a gateway; write results")
    rep.add_argument("workload", type=Path)
    rep.add_argument("--api", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    rep.add_argument("--api-key", required=True)
    rep.add_argument("--out", type=Path, required=True, help="the results file to write")
    rep.add_argument("--rate-scale", type=float, default=1.0,
                     help="send at arrival_s / X (X > 1: faster)")
    rep.add_argument("--model-map", type=_mapping, action="append", default=[],
                     metavar="FROM=TO", help="ask for model TO instead of FROM (repeatable)")
    rep.add_argument("--max-requests", type=int, default=None)
    rep.add_argument("--max-concurrency", type=int, default=256)
    rep.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    rep.add_argument("--prompt-token-id", type=int, default=None,
                     help="send prompts as this token id repeated (exact lengths)")
    rep.add_argument("--nats", default=None,
                     help="also record worker lifetimes from HS_EVENTS at this NATS URL")
    rep.add_argument("--linger", type=float, default=0.0,
                     help="with --nats: seconds to keep reading events after the last answer")
    rep.add_argument("--name", default="live", help="the run's name (default: live)")
    rep.add_argument("--policy", default="hydraserve",
                     help="the scheduler policy the system ran (recorded only)")

    ana = sub.add_parser("analyze", help="SLO attainment, latency and cost of results files")
    ana.add_argument("results", type=Path, nargs="+")
    ana.add_argument("--png-dir", type=Path, default=None,
                     help="also write ttft_cdf.png and attainment.png here")
    return workload


def _generate(args: argparse.Namespace) -> int:
    from hydraserve.workload.generate import GenerateConfig, generate, read_trace
    from hydraserve.workload.records import write_jsonl

    trace = read_trace(args.trace) if args.trace is not None else ()
    num_models = args.num_models or len(args.models) or 6
    config = GenerateConfig(
        seed=args.seed, arrival=args.arrival, rate=args.rate, cv=args.cv,
        duration_s=args.duration, num_models=num_models, models=args.models,
        apps=args.apps, app_weights=args.app_weights, sizes=args.sizes,
        size_weights=args.size_weights, popularity=args.popularity, zipf_s=args.zipf_s,
        trace=trace, squeeze=args.squeeze, window_s=args.window, cv_factor=args.cv_factor,
        max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens)
    header, requests = generate(config)
    write_jsonl(args.out, [header, *requests])
    print(f"wrote {len(requests)} requests over {header.duration_s:g}s "
          f"({header.rate:.3f}/s) to {args.out}")
    return 0


async def _replay_run(args: argparse.Namespace) -> int:
    from hydraserve.workload.records import RunHeader, read_workload, write_jsonl
    from hydraserve.workload.replay import (
        ReplayConfig,
        WorkerEventRecorder,
        replay,
        worker_lifetimes,
    )

    header, requests = read_workload(args.workload)
    config = ReplayConfig(
        api_url=args.api, api_key=args.api_key, rate_scale=args.rate_scale,
        model_map=dict(args.model_map), max_requests=args.max_requests,
        max_concurrency=args.max_concurrency, timeout_s=args.timeout,
        prompt_token_id=args.prompt_token_id)
    recorder = WorkerEventRecorder(args.nats) if args.nats else None
    if recorder is not None:
        await recorder.start()
    workers = []
    try:
        started_at, results = await replay(requests, config)
        if recorder is not None:
            await asyncio.sleep(args.linger)
    finally:
        events = await recorder.stop() if recorder is not None else []
    if recorder is not None:
        served = {config.model_map.get(r.model, r.model) for r in requests}
        workers = worker_lifetimes(events, started_at=started_at, ended_at=time.time(),
                                   models=served)
    run = RunHeader(name=args.name, policy=args.policy, started_at=started_at,
                    workload=header)
    write_jsonl(args.out, [run, *results, *workers])
    num_ok = sum(1 for r in results if r.status == "ok")
    print(f"{num_ok}/{len(results)} requests ok, {len(workers)} workers; wrote {args.out}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_replay_run(args))
    except KeyboardInterrupt:
        print("interrupted; no results written", file=sys.stderr)
        return 1


def _analyze(args: argparse.Namespace) -> int:
    from hydraserve.workload.analyze import format_comparison, format_summary, summarize
    from hydraserve.workload.records import read_results

    summaries = [summarize(*read_results(path)) for path in args.results]
    for summary in summaries:
        for line in format_summary(summary):
            print(line)
        print()
    if len(summaries) > 1:
        for line in format_comparison(summaries):
            print(line)
    if args.png_dir is not None:
        from hydraserve.workload.plots import write_plots

        for path in write_plots(summaries, args.png_dir):
            print(f"wrote {path}")
    return 0


def run_workload(args: argparse.Namespace) -> int:
    """The `workload` subcommands; 1 on a bad argument or file."""
    handlers = {"generate": _generate, "replay": _replay, "analyze": _analyze}
    try:
        return handlers[args.workload_command](args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
