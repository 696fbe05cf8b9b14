"""A live run of a small workload on `hydraserve up`, and the simulator predicting it.

In one run:
1. writes a small random Llama model (`demo_model`, size `--size`) and starts `hydraserve up`
   (embedded NATS and PostgreSQL, `--nodes` emulated nodes with a NIC cap set so that one
   fetch takes `--fetch-s`), then registers the model under `--num-models` names with a short
   keep-alive and whole-model workers only (`--max-degree`, default 1);
2. generates a seeded workload with `hydraserve workload generate` (gamma arrivals, CV `--cv`,
   `--seed`, `--duration`); its TTFT SLOs are scaled by `--ttft-slo-scale` (the published SLOs
   are for 7B models on GPUs; the scaled ones put a cold start here past them and a warm
   request within them);
3. replays it with `hydraserve workload replay` (the `openai` client through the gateway) and
   reads every event of HS_EVENTS;
4. splits the run in alternate `--held-out-window` second windows (default 60): the requests
   arriving in even windows and the workers placed in them calibrate the simulator
   (`hydraserve.sim.live.held_out_calibration`, and the client's overhead beyond the
   gateway's TTFT from their client-side results); the simulator, configured like the live
   cluster, simulates the whole workload, and the requests of the odd windows are compared,
   live against simulated, analyzed the same way (`hydraserve.workload.analyze`). Both halves
   see the machine as it is from minute to minute. The predictions: warm requests at their
   modelled times (`held_out`), each prefill step drawn from the calibrated spread
   (`held_out_spread`), or from the spread of the host's state (`held_out_host`, the main
   one: the emulated nodes share one CPU);
5. prints live vs simulated with relative errors, and how firmly the compared requests pin
   their own percentiles (the share of bootstrap resamples of their TTFTs within the
   tolerance of each), and writes bench/out/sim_vs_live.json.

`--held-out-window 0` runs the older protocol instead: run A (`--calib-seed`,
`--calib-duration`) to calibrate from, then run B (`--seed`, `--duration`) once A's workers
have scaled to zero, predicted from A (and, in sample, from B's own events). Two runs one
after the other see the machine drift between them (docs/SIM_VS_LIVE.md, runs 13–17).

Run: `.venv/bin/python bench/sim_vs_live.py [--work-dir DIR]` (about 16 minutes, 15.5 of them
live; `--quick` about 3); `--from-dir DIR` predicts again from a kept work folder.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from hydraserve.event_view import EventFilter  # noqa: E402
from hydraserve.events import collect  # noqa: E402
from hydraserve.sim.calibration import Calibration, calibrate  # noqa: E402
from hydraserve.sim.engine import simulate  # noqa: E402
from hydraserve.sim.live import (  # noqa: E402
    LiveModel,
    LiveSetup,
    Metric,
    alternate_windows,
    client_overhead_s,
    compare,
    events_between,
    held_out_calibration,
    live_cluster,
    live_sim_config,
    live_size_classes,
    median_metrics,
    paired_requests,
    resampled_within,
    scale_slos,
    solo_fetch_bytes_per_s,
)
from hydraserve.up import read_banner  # noqa: E402
from hydraserve.workload.analyze import RunSummary, format_comparison, summarize  # noqa: E402
from hydraserve.workload.records import (  # noqa: E402
    read_results,
    read_workload,
    write_jsonl,
)
from libs.common.embedded.process import free_port  # noqa: E402
from libs.common.messages import Event  # noqa: E402
from services.scheduler.policy import DEFAULT_POLICY  # noqa: E402

TOLERANCE = 0.15
START_TIMEOUT_S = 180.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short workloads (smoke run)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpu-memory-gb", type=float, default=4.0)
    parser.add_argument("--fetch-s", type=float, default=5.0,
                        help="set the NIC cap so that one model's fetch alone takes this long")
    parser.add_argument("--keep-alive", type=float, default=10.0)
    parser.add_argument("--size", default="small", choices=["tiny", "small", "100m"])
    parser.add_argument("--num-models", type=int, default=3)
    parser.add_argument("--max-degree", type=int, default=1)
    parser.add_argument("--rate", type=float, default=0.6, help="requests/s, all models")
    parser.add_argument("--cv", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=900.0,
                        help="the run (with --held-out-window 0: run B), seconds")
    parser.add_argument("--seed", type=int, default=5,
                        help="the run (with --held-out-window 0: run B)")
    parser.add_argument("--calib-duration", type=float, default=100.0, help="run A, seconds")
    parser.add_argument("--calib-seed", type=int, default=1, help="run A")
    parser.add_argument("--ttft-slo-scale", type=float, default=0.4)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--max-output-tokens", type=int, default=32)
    parser.add_argument("--held-out-window", type=float, default=60.0, metavar="W",
                        help="the requests arriving in even W-second windows calibrate, the "
                             "odd ones are predicted; 0: run A calibrates, run B is predicted")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep state, logs and results here (default: a temporary folder)")
    parser.add_argument("--from-dir", type=Path, default=None,
                        help="predict again from a kept --work-dir (no live run)")
    parser.add_argument("--sim-seeds", type=int, default=9,
                        help="simulated runs per prediction with a warm spread (their median)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sim_vs_live.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.calib_duration = (120.0 if args.held_out_window else 60.0), 40.0
    if args.held_out_window < 0:
        parser.error("--held-out-window must be >= 0")
    return args


# --- the live system -------------------------------------------------------------------------


class Up:
    """`hydraserve up` as a child process; stopped with SIGINT like Ctrl-C."""

    def __init__(self, args: argparse.Namespace, work: Path, nic_gbps: float) -> None:
        self.port = free_port("127.0.0.1")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HYDRASERVE_")}
        env["OMP_NUM_THREADS"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hydraserve.cli", "up", "--state-dir", str(work / "state"),
             "--port", str(self.port), "--nodes", str(args.nodes),
             "--gpu-memory-gb", str(args.gpu_memory_gb), "--nic-gbps", f"{nic_gbps:.6f}",
             "--keep-alive", str(args.keep_alive), "--no-demo"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        banner = read_banner(self.process, timeout_s=START_TIMEOUT_S)
        self.api = f"http://127.0.0.1:{self.port}"
        self.admin_key = _search(r"admin key\s+(\S+)", banner)
        self.nats_url = _search(r"NATS\s+(nats://\S+)", banner)

    def register(self, name: str, path: Path, *, ttft_slo_s: float, tpot_slo_s: float,
                 keep_alive_s: float, max_degree: int) -> dict[str, Any]:
        response = httpx.post(f"{self.api}/admin/models", timeout=120, headers={
            "Authorization": f"Bearer {self.admin_key}"}, json={
            "name": name, "path": str(path), "ttft_slo_ms": round(ttft_slo_s * 1000),
            "tpot_slo_ms": round(tpot_slo_s * 1000), "keep_alive_s": keep_alive_s,
            "max_pipeline_degree": max_degree})
        response.raise_for_status()
        return dict(response.json())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _search(pattern: str, text: str) -> str:
    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"no {pattern!r} in hydraserve up's banner: {text}")
    return match.group(1)


def _cli(*args: str) -> None:
    command = [sys.executable, "-m", "hydraserve.cli", *args]
    print("$ hydraserve " + " ".join(args[:2]) + " ...", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def _workload(args: argparse.Namespace, out: Path, *, seed: int, duration: float,
              models: list[str]) -> Path:
    raw = out.with_suffix(".raw.jsonl")
    _cli("workload", "generate", str(raw), "--arrival", "gamma", "--rate", str(args.rate),
         "--cv", str(args.cv), "--duration", str(duration), "--seed", str(seed),
         "--num-models", str(len(models)), "--models", ",".join(models), "--sizes", "7b",
         "--max-prompt-tokens", str(args.max_prompt_tokens),
         "--max-output-tokens", str(args.max_output_tokens))
    header, requests = read_workload(raw)
    write_jsonl(out, [header, *scale_slos(requests, ttft_scale=args.ttft_slo_scale)])
    return out


def _replay(up: Up, workload: Path, out: Path, *, linger_s: float) -> None:
    _cli("workload", "replay", str(workload), "--api", up.api, "--api-key", up.admin_key,
         "--out", str(out), "--nats", up.nats_url, "--linger", str(linger_s),
         "--policy", DEFAULT_POLICY, "--timeout", "120")


def live_runs(args: argparse.Namespace, work: Path
              ) -> tuple[LiveSetup, list[Event], dict[str, Any]]:
    """Start `hydraserve up`, register the models, replay A then B into `work`; the setup,
    every event of HS_EVENTS and a few facts of the run."""
    from services.worker.demo_model import write_demo_model

    model_dir = write_demo_model(work / "model", size=args.size)
    size_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    nic_gbps = size_bytes * 8 / args.fetch_s / 1e9
    names = [f"sv-{i}" for i in range(args.num_models)]
    held_out = args.held_out_window > 0
    workload_a = None if held_out else _workload(
        args, work / "workload_a.jsonl", seed=args.calib_seed, duration=args.calib_duration,
        models=names)
    workload_b = _workload(args, work / "workload_b.jsonl", seed=args.seed,
                           duration=args.duration, models=names)
    slos = {r.model: (r.ttft_slo_s, r.tpot_slo_s) for r in read_workload(workload_b)[1]}
    started = time.monotonic()
    up = Up(args, work, nic_gbps)
    try:
        print(f"hydraserve up: {up.api}, NATS {up.nats_url} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        models = {}
        for name in names:
            ttft_slo_s, tpot_slo_s = slos.get(name, (10.0, 0.2))
            info = up.register(name, model_dir, ttft_slo_s=ttft_slo_s, tpot_slo_s=tpot_slo_s,
                               keep_alive_s=args.keep_alive, max_degree=args.max_degree)
            models[name] = LiveModel(size_bytes=int(info["size_bytes"]),
                                     num_layers=int(info["num_layers"]),
                                     kv_cache_bytes=int(info["kv_cache_bytes"]))
        # long enough after A's last answer for its workers to scale to zero: B starts cold
        linger_s = args.keep_alive + 5
        live_a, live_b = work / "live_a.jsonl", work / "live_b.jsonl"
        if workload_a is not None:
            _replay(up, workload_a, live_a, linger_s=linger_s)
        _replay(up, workload_b, live_b, linger_s=linger_s)
        events = asyncio.run(collect(up.nats_url, EventFilter()))
    finally:
        up.stop()
    wall_s = time.monotonic() - started
    setup = LiveSetup(num_nodes=args.nodes, gpu_memory_gib=args.gpu_memory_gb,
                      nic_gbps=nic_gbps, keep_alive_s=args.keep_alive, models=models,
                      max_pipeline_degree=args.max_degree)
    facts = {"live_wall_s": round(wall_s, 1), "model_bytes": size_bytes,
             "nic_gbps": nic_gbps, "num_events": len(events),
             "held_out_window_s": args.held_out_window or None}
    return setup, events, facts


# --- the prediction --------------------------------------------------------------------------


def predict(setup: LiveSetup, calibration: Calibration, workload: Path, *,
            nic_bytes_per_s: float | None, batch_prefill: bool, name: str, seed: int = 0
            ) -> Path:
    header, requests = read_workload(workload)
    config = replace(live_sim_config(setup), batch_prefill=batch_prefill,
                     service_spread=calibration.warm_spread, seed=seed,
                     host_spread=calibration.host_spread)
    result = simulate(requests, policy=DEFAULT_POLICY,
                      cluster=live_cluster(setup, calibration, nic_bytes_per_s=nic_bytes_per_s),
                      config=config, workload=header,
                      size_classes=live_size_classes(setup, calibration))
    out = workload.with_name(f"{name}.jsonl")
    write_jsonl(out, [result.header.model_copy(update={"name": name}), *result.results,
                      *result.workers])
    return out


def _fmt(value: float | None, name: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if name.startswith("attainment") else f"{value:.3f}"


def _err(metric: Metric) -> str:
    error = metric.relative_error
    if error is None:
        return "-"
    mark = ("ok" if metric.is_within(TOLERANCE) else "NO") if metric.is_target else "(info)"
    return f"{100 * error:+.1f}% {mark}"


def table(predictions: dict[str, list[Metric]]) -> list[str]:
    """One row per metric: live, then each prediction and its relative error."""
    names = list(predictions)
    rows = [["metric", "live", *(c for n in names for c in (n, "error"))]]
    for row_metrics in zip(*predictions.values(), strict=True):
        first = row_metrics[0]
        rows.append([first.name, _fmt(first.live, first.name),
                     *(c for m in row_metrics for c in (_fmt(m.sim, m.name), _err(m)))])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in rows]


def _calibration_json(calibration: Calibration) -> dict[str, Any]:
    data = asdict(calibration)
    data["models"] = {m: asdict(c) for m, c in calibration.models.items()}
    return data


def _save_setup(path: Path, setup: LiveSetup, facts: dict[str, Any]) -> None:
    path.write_text(json.dumps({"setup": {**asdict(setup), "models": {
        m: asdict(v) for m, v in setup.models.items()}}, "facts": facts}, indent=2) + "\n")


def _load_setup(path: Path) -> tuple[LiveSetup, dict[str, Any]]:
    data = json.loads(path.read_text())
    fields = data["setup"]
    models = {m: LiveModel(**v) for m, v in fields.pop("models").items()}
    return LiveSetup(**fields, models=models), data["facts"]


def variants(events: list[Event], live_a: Path, live_b: Path
             ) -> dict[str, tuple[Calibration, float | None, bool]]:
    """Name -> (calibration, NIC bytes/s, batched prefill) of each prediction of run B."""
    header_a, results_a, _ = read_results(live_a)
    header_b, _, _ = read_results(live_b)
    events_a = events_between(events, 0.0, header_b.started_at)
    events_b = events_between(events, header_b.started_at, float("inf"))
    overhead = client_overhead_s(results_a, started_at=header_a.started_at, events=events_a)
    nic_a = solo_fetch_bytes_per_s(events_a)
    calib_a = replace(calibrate(events_a), client_overhead_s=overhead)
    calib_b = replace(calibrate(events_b), client_overhead_s=overhead)
    # the model before this benchmark: the policy's start-up as the overlapped one, no tail,
    # no dispatch or client overhead, the median prefill of every request as if alone, the
    # configured NIC cap
    before = Calibration(startup_s=calib_a.startup_s, models={
        m: replace(c, prefill_base_s=None, prefill_s_per_token=None)
        for m, c in calib_a.models.items()})
    # warm requests at their modelled times; `_spread`: each prefill step's time drawn from A's
    # warm spread (docs/SIM_VS_LIVE.md: it did not predict B's median better across runs);
    # `_host`: drawn from the spread of the host's state (idle or busy) when the step starts
    nic_b = solo_fetch_bytes_per_s(events_b) or nic_a
    return {"sim_calib_a": (replace(calib_a, warm_spread=(), host_spread=None), nic_a, True),
            "sim_calib_a_host": (replace(calib_a, warm_spread=()), nic_a, True),
            "sim_calib_a_spread": (replace(calib_a, host_spread=None), nic_a, True),
            "sim_calib_b": (replace(calib_b, warm_spread=(), host_spread=None), nic_b, True),
            "sim_calib_b_host": (replace(calib_b, warm_spread=()), nic_b, True),
            "sim_calib_a_before_fixes": (before, None, False)}


def held_out_variants(events: list[Event], workload: Path, live: Path, window_s: float
                      ) -> tuple[dict[str, tuple[Calibration, float | None, bool]], set[str]]:
    """One run split in alternate windows: name -> (calibration, NIC, batched prefill) of each
    prediction, all calibrated from the even windows, and the ids of the held-out requests
    (the odd windows), the only ones compared."""
    header, results, _ = read_results(live)
    calib_ids, held_out = alternate_windows(read_workload(workload)[1], window_s)
    start = header.started_at
    placed = [e for e in events if e.kind == "worker.placed" and e.worker_id]
    calib_workers = {e.worker_id or "" for e in placed
                     if int((e.time - start) // window_s) % 2 == 0}
    # the gateway names each request anew: the calibration requests' own ids
    calib_event_ids = {event.request_id or "" for result, event in paired_requests(
        results, started_at=start, events=events) if result.request_id in calib_ids}
    calib = held_out_calibration(events, calib_event_ids, calib_workers)
    calib_events = [e for e in events
                    if e.request_id is None or e.request_id in calib_event_ids]
    overhead = client_overhead_s([r for r in results if r.request_id in calib_ids],
                                 started_at=start, events=calib_events)
    calib = replace(calib, client_overhead_s=overhead)
    nic = solo_fetch_bytes_per_s([e for e in events if e.worker_id in calib_workers])
    return {"held_out_host": (replace(calib, warm_spread=()), nic, True),
            "held_out_spread": (replace(calib, host_spread=None), nic, True),
            "held_out": (replace(calib, warm_spread=(), host_spread=None), nic, True)}, held_out


def _only(path: Path, request_ids: set[str] | None) -> RunSummary:
    header, results, workers = read_results(path)
    if request_ids is not None:
        results = [r for r in results if r.request_id in request_ids]
    return summarize(header, results, workers)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_dir is not None:
        work = args.from_dir
        setup, facts = _load_setup(work / "setup.json")
    else:
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="sim-vs-live-"))
        work.mkdir(parents=True, exist_ok=True)
        setup, events, facts = live_runs(args, work)
        write_jsonl(work / "events.jsonl", events)
        _save_setup(work / "setup.json", setup, facts)
    live_a, live_b = work / "live_a.jsonl", work / "live_b.jsonl"
    events = [Event.model_validate_json(line)
              for line in (work / "events.jsonl").read_text().splitlines() if line]
    window_s = facts.get("held_out_window_s")
    compared: set[str] | None = None
    if window_s:
        named, compared = held_out_variants(events, work / "workload_b.jsonl", live_b,
                                            window_s)
    else:
        named = variants(events, live_a, live_b)
    live = _only(live_b, compared)
    predictions = {}
    summaries = [live]
    for name, (calibration, nic, batch_prefill) in named.items():
        # with a spread, each simulated run draws its own warm times: the prediction is the
        # median of each metric over `--sim-seeds` runs (the first run's summary is shown)
        seeds = range(args.sim_seeds if calibration.warm_spread or calibration.host_spread else 1)
        runs = [_only(predict(
            setup, calibration, work / "workload_b.jsonl", nic_bytes_per_s=nic,
            batch_prefill=batch_prefill, name=f"{name}_seed{seed}" if seed else name,
            seed=seed), compared) for seed in seeds]
        summaries.append(runs[0])
        predictions[name] = (calibration, nic, median_metrics(
            [compare(live, run) for run in runs]))
    print()
    for line in format_comparison(summaries):
        print(line)
    print()
    for line in table({n: m for n, (_, _, m) in predictions.items()}):
        print(line)
    # the live run's own noise: how often a bootstrap resample of its TTFTs puts a
    # percentile within the tolerance of the measured one
    self_check = {p: resampled_within(live.ttfts, p, tolerance=TOLERANCE) for p in (50, 90, 99)}
    print("\nlive B resampled (bootstrap, 2000 resamples of its TTFTs): each percentile within "
          f"{TOLERANCE:.0%} of the measured one in " + ", ".join(
              f"p{p} {'-' if v is None else f'{v:.0%}'}" for p, v in self_check.items())
          + " of resamples")
    calib_a, nic_a, _ = predictions["held_out_host" if window_s else "sim_calib_a"]
    print(f"\nlive: {live.overall.num_requests} requests, {live.num_workers} workers; "
          f"calibration ({'even windows' if window_s else 'A'}): {calib_a}\n"
          f"NIC (solo fetches of {'the even windows' if window_s else 'A'}): {nic_a}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **facts, "work_dir": str(work), "tolerance": TOLERANCE,
        "live_resampled_within": {f"p{p}": v for p, v in self_check.items()},
        "predictions": {name: {
            "calibration": _calibration_json(calibration), "nic_bytes_per_s": nic,
            "metrics": [{"name": m.name, "live": m.live, "sim": m.sim,
                         "relative_error": m.relative_error, "is_target": m.is_target,
                         "is_within": m.is_within(TOLERANCE)} for m in metrics]}
            for name, (calibration, nic, metrics) in predictions.items()},
    }, indent=2) + "\n")
    print(f"wrote {args.out}")
    if args.work_dir is None and args.from_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
