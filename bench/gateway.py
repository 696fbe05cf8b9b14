"""Overhead of the gateway + NATS bus over calling the engine directly, for a warm model.

Sets up, on loopback only: an embedded NATS server (JetStream) in a temp dir, the demo model,
one worker process (`python -m services.worker`, capacity 32) and the gateway process
(`python -m services.gateway`, models from HYDRASERVE_GATEWAY__MODELS, no database). The
baseline is a *separate process* running the same `LLMEngine` (same folder, same
`max_num_seqs`, tokenizer on, so detokenizing is paid on both sides) and stepping it in a
tight loop: like the worker it is its own interpreter with its own torch threads, and the
benchmark's client is not in its way, so both sides share the 2 cores alike.

Both sides run the same closed-loop workload: N requests of M greedy tokens, C at once
(C = 1 and 32), each stream sending its next request when its previous one ends. The gateway
side uses the real `openai` async client, streaming, with the prompt given as token ids.
The gateway has no `ignore_eos`, so the prompts are chosen (by the direct engine, once) among
ones whose greedy answer runs the full M tokens without EOS; per-token figures are
normalised by the tokens actually received. The two sides are interleaved, R repeats.

Reported per side, each the best of the repeats: TTFT p50, per-token latency p50
((last token - first token) / (n - 1) per request), throughput (tokens/s over the run); the
ratios gateway / direct; the derived overhead per request (TTFT difference) and per token
(per-token difference); and the CPU time per token of each process (from /proc).
Run: `python bench/gateway.py [--quick]`; writes bench/out/gateway.json (gateway-quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
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

ADMIN_KEY = "sk-admin-bench-0123456789"
MODEL = "bench/demo"
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 120.0  # one side's one run at one concurrency


# --- the direct side: a process stepping the engine -------------------------------------------
def direct_server(model_dir: Path, capacity: int) -> None:
    """Read JSON commands on stdin, answer one JSON line each on stdout."""
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.sequence import SamplingParams

    engine = LLMEngine.from_model_dir(model_dir, max_num_seqs=capacity, device="cpu",
                                      dtype="auto")
    engine.load()
    for runner in engine.runners:
        runner.wait_for_packing()
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    counter = 0
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            return
        prompts: list[list[int]] = command["prompts"]
        max_tokens: int = command["max_tokens"]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        if command["op"] == "select":  # which prompts run the full length without EOS
            ids = []
            for prompt in prompts:
                counter += 1
                ids.append(rid := f"s{counter}")
                engine.add_request(rid, list(prompt), params)
            lengths: dict[str, int] = {}
            while engine.has_unfinished():
                for o in engine.step():
                    if o.finished:
                        lengths[o.request_id] = o.completion_tokens
            out.write(json.dumps({"lengths": [lengths[i] for i in ids]}) + "\n")
            out.flush()
            continue
        concurrency: int = command["concurrency"]
        pending = list(enumerate(prompts))
        sent: dict[str, float] = {}
        times: dict[str, list[float]] = {}
        done: list[dict[str, Any]] = []
        start = time.perf_counter()
        while pending or engine.has_unfinished():
            while pending and len(sent) - len(done) < concurrency:
                _, prompt = pending.pop(0)
                counter += 1
                rid = f"r{counter}"
                sent[rid] = time.perf_counter()
                times[rid] = []
                engine.add_request(rid, list(prompt), params)
            outputs = engine.step()
            now = time.perf_counter()
            for o in outputs:
                times[o.request_id].extend([now] * len(o.new_token_ids))
                if o.finished:
                    t = times[o.request_id]
                    done.append({"sent": sent[o.request_id] - start, "first": t[0] - start,
                                 "last": t[-1] - start, "tokens": len(t)})
        wall = time.perf_counter() - start
        out.write(json.dumps({"wall": wall, "requests": done}) + "\n")
        out.flush()


class DirectClient:
    def __init__(self, model_dir: Path, capacity: int, log: Path) -> None:
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--direct-server", str(model_dir), str(capacity)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        try:
            if self._read(START_TIMEOUT_S).get("ready") is not True:
                raise RuntimeError("the direct engine did not start")
        except BaseException:
            self.process.kill()
            self.process.wait()
            self._log.close()
            raise

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        import select

        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("the direct engine did not answer in time")
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the direct engine exited ({self.process.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def call(self, command: dict[str, Any], timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        self.process.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        try:
            if self.process.poll() is None and self.process.stdin is not None:
                self.process.stdin.write(b'{"op": "quit"}\n')
                self.process.stdin.close()
            self.process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            self._log.close()


# --- the gateway side ---------------------------------------------------------------------------
async def gateway_run(base_url: str, prompts: list[list[int]], max_tokens: int,
                      concurrency: int) -> dict[str, Any]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=ADMIN_KEY, max_retries=0,
                         timeout=RUN_TIMEOUT_S)
    queue = list(prompts)
    done: list[dict[str, Any]] = []
    start = time.perf_counter()

    async def one(prompt: list[int]) -> None:
        sent = time.perf_counter()
        first = last = 0.0
        tokens = 0
        stream = await client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                first = first or now
                last = now
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        done.append({"sent": sent - start, "first": first - start, "last": last - start,
                     "tokens": tokens})

    async def stream_loop() -> None:
        while queue:
            await one(queue.pop(0))

    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            await asyncio.gather(*(stream_loop() for _ in range(concurrency)))
    finally:
        await client.close()
    return {"wall": time.perf_counter() - start, "requests": done}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuMeter:
    """CPU seconds each named process spends between `start()` and `stop()`, summed."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.total = dict.fromkeys(pids, 0.0)
        self._at: dict[str, float] = {}

    def start(self) -> None:
        self._at = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        for name, pid in self.pids.items():
            self.total[name] += cpu_seconds(pid) - self._at[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_until_served(base_url: str, prompt: list[int], processes: list[
        tuple[str, subprocess.Popen[bytes], Path]]) -> None:
    """Until a completion comes back: the gateway is up and the worker has loaded."""
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        for name, process, log in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            r = httpx.post(f"{base_url}/v1/completions", timeout=10.0,
                           headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                           json={"model": MODEL, "prompt": prompt, "max_tokens": 2,
                                 "temperature": 0.0})
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not serve the model in time")
        time.sleep(0.2)


# --- figures --------------------------------------------------------------------------------------
@dataclass
class Side:
    """One side at one concurrency: each repeat's p50s and throughput."""

    ttft: list[float] = field(default_factory=list)
    per_token: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    short: int = 0  # requests that got fewer than M tokens
    tokens: list[int] = field(default_factory=list)

    def add(self, run: dict[str, Any], max_tokens: int) -> None:
        requests = run["requests"]
        self.ttft.append(statistics.median(r["first"] - r["sent"] for r in requests))
        self.per_token.append(statistics.median(
            (r["last"] - r["first"]) / (r["tokens"] - 1) for r in requests if r["tokens"] > 1))
        self.throughput.append(sum(r["tokens"] for r in requests) / run["wall"])
        self.short += sum(r["tokens"] < max_tokens for r in requests)
        self.tokens += [r["tokens"] for r in requests]

    def figures(self) -> dict[str, float]:
        """The best repeat of each (load from elsewhere only ever makes a figure worse)."""
        return {"ttft_p50_ms": 1e3 * min(self.ttft),
                "per_token_p50_ms": 1e3 * min(self.per_token),
                "throughput_tok_s": max(self.throughput)}


def pick_prompts(direct: DirectClient, count: int, max_tokens: int, prompt_len: int,
                 vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    chosen: list[list[int]] = []
    for _ in range(20):
        candidates = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(32)]
        lengths = direct.call({"op": "select", "prompts": candidates,
                               "max_tokens": max_tokens})["lengths"]
        chosen += [p for p, n in zip(candidates, lengths, strict=True) if n == max_tokens]
        if len(chosen) >= count:
            return chosen[:count]
    raise RuntimeError("too few prompts run the full length without EOS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--max-tokens", type=int, default=64, help="M, tokens per request")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repeats (at most)")
    parser.add_argument("--budget", type=float, default=150.0,
                        help="seconds after which no further repeat starts (2 at least)")
    parser.add_argument("--direct-server", nargs=2, metavar=("MODEL_DIR", "CAPACITY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.direct_server:
        direct_server(Path(args.direct_server[0]), int(args.direct_server[1]))
        return

    from libs.common.embedded import EmbeddedNats
    from services.worker.demo_model import write_demo_model

    capacity = 32
    # N requests per run at each concurrency
    counts = {1: 4, 32: 32} if args.quick else {1: 8, 32: 64}
    repeat = 1 if args.quick else args.repeat
    started = time.perf_counter()
    processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    direct: DirectClient | None = None
    done_repeats = 0
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp_name, \
            EmbeddedNats(Path(tmp_name) / "nats") as nats_server:
        tmp = Path(tmp_name)
        model_dir = write_demo_model(tmp / "model", size=args.size)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        base_url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ,
               "HYDRASERVE_NATS__URL": nats_server.url,
               "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
               "HYDRASERVE_GATEWAY__PORT": base_url.rsplit(":", 1)[1],
               "HYDRASERVE_GATEWAY__ADMIN_KEY": ADMIN_KEY,
               "HYDRASERVE_GATEWAY__MODELS": json.dumps([MODEL])}
        for var in ("HYDRASERVE_DATABASE__URL",):
            env.pop(var, None)
        try:
            for name, command in (
                    ("worker", ["-m", "services.worker", "--model-dir", str(model_dir),
                                "--model", MODEL, "--nats", nats_server.url,
                                "--worker-id", "bench-worker", "--capacity", str(capacity)]),
                    ("gateway", ["-m", "services.gateway"])):
                log = tmp / f"{name}.log"
                with log.open("wb") as f:
                    processes.append((name, subprocess.Popen(
                        [sys.executable, *command], cwd=ROOT, env=env, stdout=f,
                        stderr=subprocess.STDOUT), log))
            direct = DirectClient(model_dir, capacity, tmp / "direct.log")
            prompts = pick_prompts(direct, max(counts.values()), args.max_tokens,
                                   args.prompt_len, vocab)
            wait_until_served(base_url, prompts[0], processes)
            setup_s = time.perf_counter() - started

            sides = {(c, s): Side() for c in counts for s in ("direct", "gateway")}
            pids = {name: p.pid for name, p, _ in processes}
            meters = {c: (CpuMeter({"engine process": direct.process.pid}),
                          CpuMeter({**pids, "nats-server": nats_server.pid or 0,
                                    "client (openai)": os.getpid()})) for c in counts}
            # warm-up, not counted: both paths at 32 streams
            direct.call({"op": "run", "prompts": prompts[:32], "max_tokens": args.max_tokens,
                         "concurrency": 32})
            asyncio.run(gateway_run(base_url, prompts[:32], args.max_tokens, 32))
            while done_repeats < repeat and (
                    done_repeats < 2 or time.perf_counter() - started < args.budget):
                done_repeats += 1
                for c, n in counts.items():
                    meters[c][0].start()
                    run = direct.call({"op": "run", "prompts": prompts[:n],
                                       "max_tokens": args.max_tokens, "concurrency": c})
                    meters[c][0].stop()
                    sides[(c, "direct")].add(run, args.max_tokens)
                    meters[c][1].start()
                    run = asyncio.run(gateway_run(base_url, prompts[:n], args.max_tokens, c))
                    meters[c][1].stop()
                    sides[(c, "gateway")].add(run, args.max_tokens)
        finally:
            if direct is not None:
                direct.close()
            exit_codes = {name: stop_process(p) for name, p, _ in reversed(processes)}
    total_s = time.perf_counter() - started

    import torch

    print(f"\ngateway benchmark: demo model '{args.size}', {args.max_tokens} tokens per "
          f"request, prompts of {args.prompt_len} tokens, {done_repeats} interleaved repeats "
          f"(best of each), "
          f"torch {torch.__version__}, {os.cpu_count()} cores; set-up {setup_s:.1f} s, "
          f"total {total_s:.1f} s")
    print(f"{'measure':56} {'direct':>10} {'gateway':>10} {'gw/direct':>10}")
    rows: list[dict[str, Any]] = []
    overheads: dict[str, float] = {}
    for c, n in counts.items():
        d, g = sides[(c, "direct")].figures(), sides[(c, "gateway")].figures()
        for key, label in (("ttft_p50_ms", "TTFT p50 (ms)"),
                           ("per_token_p50_ms", "per-token latency p50 (ms)"),
                           ("throughput_tok_s", "throughput (tok/s)")):
            name = f"{c} stream{'s' if c > 1 else ''}, {n} requests: {label}"
            ratio = g[key] / d[key]
            print(f"{name:56} {d[key]:10.2f} {g[key]:10.2f} {ratio:10.2f}")
            rows.append({"measure": name, "concurrency": c, "requests": n, "key": key,
                         "direct": d[key], "gateway": g[key], "ratio": ratio})
        overheads[f"per_request_ms_c{c}"] = g["ttft_p50_ms"] - d["ttft_p50_ms"]
        overheads[f"per_token_ms_c{c}"] = g["per_token_p50_ms"] - d["per_token_p50_ms"]
    for c in counts:
        print(f"overhead at {c:2} stream(s): per request {overheads[f'per_request_ms_c{c}']:+.2f}"
              f" ms (TTFT), per token {overheads[f'per_token_ms_c{c}']:+.3f} ms")
    cpu: dict[str, dict[str, float]] = {}
    for c in counts:
        tokens = {s: sum(sides[(c, s)].tokens) for s in ("direct", "gateway")}
        per_token = {f"direct: {k}": 1e3 * v / tokens["direct"]
                     for k, v in meters[c][0].total.items()}
        per_token |= {f"gateway: {k}": 1e3 * v / tokens["gateway"]
                      for k, v in meters[c][1].total.items()}
        cpu[f"c{c}"] = per_token
        print(f"CPU ms per token at {c:2} stream(s): "
              + ", ".join(f"{k} {v:.2f}" for k, v in per_token.items()))
    short = {f"{s}_c{c}": sides[(c, s)].short for (c, s) in sides}
    if any(short.values()):
        print(f"requests shorter than {args.max_tokens} tokens: {short}")
    print(f"exit codes: {exit_codes}")
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": platform.platform(), "cores": os.cpu_count(),
              "torch": torch.__version__, "size": args.size, "max_tokens": args.max_tokens,
              "prompt_len": args.prompt_len, "repeat": done_repeats,
              "per_repeat": {f"{s}_c{c}": {"ttft_p50_ms": [1e3 * x for x in v.ttft],
                                           "per_token_p50_ms": [1e3 * x for x in v.per_token],
                                           "throughput_tok_s": v.throughput}
                             for (c, s), v in sides.items()}, "counts": counts,
              "rows": rows, "overhead": overheads, "cpu_ms_per_token": cpu, "short_requests": short,
              "exit_codes": exit_codes, "setup_s": setup_s, "total_s": total_s}
    # a smoke run does not overwrite the recorded results
    out = ROOT / "bench" / "out" / ("gateway-quick.json" if args.quick else "gateway.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
