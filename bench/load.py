"""A bounded loopback load test: N concurrent streaming clients for D seconds against a warm
model through the gateway.

Sets up, on loopback only (the patterns of bench/gateway.py): an embedded NATS server
(JetStream) in a temp dir, the demo model, W worker processes (`python -m services.worker`)
and the gateway process (models from HYDRASERVE_GATEWAY__MODELS, no database). Then N clients
(one `openai.AsyncOpenAI`, streaming completions of M tokens with `ignore_eos`) each send
their next request as soon as the previous one ends (closed loop), for D seconds; requests
still running at the end are awaited and counted.

Recorded: requests, errors by kind (HTTP status or exception class) and the error rate,
TTFT p50/p99 (request sent -> first token, queueing included), tokens/s and requests/s over
the run, and the RSS (VmRSS from /proc) of every process (gateway, workers, nats-server)
sampled every second into a bounded ring (start, max, end reported). Prints a table; writes
bench/out/load.json.

Run: `python bench/load.py [--clients 200] [--duration 60] [--workers 1] [--capacity 32]`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gateway import (  # noqa: E402  (after the path insert, like bench/gateway.py)
    ADMIN_KEY,
    MODEL,
    free_port,
    stop_process,
    wait_until_served,
)

OUT = ROOT / "bench" / "out" / "load.json"
PROMPT = "Once upon a time"
# RSS samples kept per process (one a second): a ring, so memory stays bounded however long
MAX_RSS_SAMPLES = 3600


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


@dataclass
class RssSampler:
    """VmRSS of each named process, every `interval_s`, in a ring of MAX_RSS_SAMPLES."""

    pids: dict[str, int]
    interval_s: float = 1.0
    samples: dict[str, collections.deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.samples = {name: collections.deque(maxlen=MAX_RSS_SAMPLES) for name in self.pids}

    def sample(self) -> None:
        for name, pid in self.pids.items():
            if (value := rss_mb(pid)) is not None:
                self.samples[name].append(value)

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def figures(self) -> dict[str, dict[str, float]]:
        return {name: {"start_mb": round(s[0], 1), "max_mb": round(max(s), 1),
                       "end_mb": round(s[-1], 1), "samples": len(s)}
                for name, s in self.samples.items() if s}


@dataclass
class Tally:
    """Per-request outcomes; TTFTs and token counts only (a few floats a request)."""

    ttft_s: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


async def load(base_url: str, *, clients: int, duration_s: float, max_tokens: int,
               tally: Tally) -> float:
    """Run the closed loop; the wall time from the first request to the last answer."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=ADMIN_KEY, max_retries=0,
                                timeout=120)
    started = time.perf_counter()
    end = started + duration_s

    async def one() -> None:
        sent = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            stream = await client.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0,
                stream=True, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    first = first or time.perf_counter()
                    tokens += 1
        except openai.APIStatusError as exc:
            tally.errors[f"HTTP {exc.status_code}"] += 1
            return
        except (openai.APIError, OSError) as exc:
            tally.errors[type(exc).__name__] += 1
            return
        if first is None:
            tally.errors["no tokens"] += 1
            return
        tally.ok += 1
        tally.tokens += tokens
        tally.ttft_s.append(first - sent)

    async def loop() -> None:
        while time.perf_counter() < end:
            await one()

    try:
        await asyncio.gather(*(loop() for _ in range(clients)))
    finally:
        await client.close()
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200, help="N concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="D seconds of load")
    parser.add_argument("--workers", type=int, default=1, help="W worker processes")
    parser.add_argument("--capacity", type=int, default=32, help="each worker's batch")
    parser.add_argument("--max-tokens", type=int, default=32, help="M tokens a request")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--first-token-timeout", type=float, default=60.0,
                        help="the gateway's (queueing included)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    from libs.common.embedded import EmbeddedNats
    from services.worker.demo_model import write_demo_model

    started = time.perf_counter()
    processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp_name, \
            EmbeddedNats(Path(tmp_name) / "nats") as nats_server:
        tmp = Path(tmp_name)
        model_dir = write_demo_model(tmp / "model", size=args.size)
        base_url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ,
               "HYDRASERVE_NATS__URL": nats_server.url,
               "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
               "HYDRASERVE_GATEWAY__PORT": base_url.rsplit(":", 1)[1],
               "HYDRASERVE_GATEWAY__ADMIN_KEY": ADMIN_KEY,
               "HYDRASERVE_GATEWAY__MODELS": json.dumps([MODEL]),
               "HYDRASERVE_GATEWAY__FIRST_TOKEN_TIMEOUT_S": str(args.first_token_timeout)}
        env.pop("HYDRASERVE_DATABASE__URL", None)
        commands = [(f"worker-{i}", ["-m", "services.worker", "--model-dir", str(model_dir),
                                     "--model", MODEL, "--nats", nats_server.url,
                                     "--worker-id", f"load-worker-{i}",
                                     "--capacity", str(args.capacity)])
                    for i in range(args.workers)]
        commands.append(("gateway", ["-m", "services.gateway"]))
        try:
            for name, command in commands:
                log = tmp / f"{name}.log"
                with log.open("wb") as f:
                    processes.append((name, subprocess.Popen(
                        [sys.executable, *command], cwd=ROOT, env=env, stdout=f,
                        stderr=subprocess.STDOUT), log))
            wait_until_served(base_url, [5, 6, 7], processes)
            setup_s = time.perf_counter() - started
            sampler = RssSampler({**{name: p.pid for name, p, _ in processes},
                                  "nats-server": nats_server.pid or 0})

            async def run() -> float:
                sampling = asyncio.create_task(sampler.run())
                try:
                    return await load(base_url, clients=args.clients,
                                      duration_s=args.duration, max_tokens=args.max_tokens,
                                      tally=tally)
                finally:
                    sampling.cancel()
                    sampler.sample()

            wall_s = asyncio.run(run())
        finally:
            exit_codes = {name: stop_process(p) for name, p, _ in reversed(processes)}

    total = tally.ok + sum(tally.errors.values())
    result: dict[str, Any] = {
        "command": " ".join(["python", "bench/load.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "config": {"clients": args.clients, "duration_s": args.duration,
                   "workers": args.workers, "capacity": args.capacity,
                   "max_tokens": args.max_tokens, "model_size": args.size,
                   "first_token_timeout_s": args.first_token_timeout},
        "setup_s": round(setup_s, 2), "wall_s": round(wall_s, 2),
        "requests": total, "ok": tally.ok, "errors": dict(tally.errors),
        "error_rate": round((total - tally.ok) / total, 4) if total else None,
        "ttft_p50_ms": round(1e3 * percentile(tally.ttft_s, 0.5), 1) if tally.ttft_s else None,
        "ttft_p99_ms": round(1e3 * percentile(tally.ttft_s, 0.99), 1) if tally.ttft_s else None,
        "ttft_mean_ms": round(1e3 * statistics.fmean(tally.ttft_s), 1) if tally.ttft_s else None,
        "throughput_tok_s": round(tally.tokens / wall_s, 1),
        "throughput_req_s": round(tally.ok / wall_s, 2),
        "rss": sampler.figures(),
        "exit_codes": exit_codes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nload test: {args.clients} streaming clients for {args.duration:g}s, "
          f"{args.workers} worker(s) of capacity {args.capacity}, {args.max_tokens} tokens a "
          f"request, demo model '{args.size}' (setup {setup_s:.1f}s, run {wall_s:.1f}s)")
    rows = [("requests", f"{total}"), ("answered", f"{tally.ok}"),
            ("errors", ", ".join(f"{k}: {v}" for k, v in tally.errors.items()) or "none"),
            ("error rate", f"{100 * (result['error_rate'] or 0):.2f}%"),
            ("TTFT p50", f"{result['ttft_p50_ms']} ms"),
            ("TTFT p99", f"{result['ttft_p99_ms']} ms"),
            ("throughput", f"{result['throughput_tok_s']} tok/s, "
                           f"{result['throughput_req_s']} req/s")]
    rows += [(f"RSS {name}", f"{r['start_mb']} -> max {r['max_mb']} -> {r['end_mb']} MB")
             for name, r in result["rss"].items()]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(f"  exit codes: {exit_codes}; wrote {args.out}")


if __name__ == "__main__":
    main()
