"""Pipeline TPOT against a whole-model worker, with the cold start taken out.

`bench/coldstart.py` measures the pipeline's TPOT while the cold start's other work (the
consolidation fetch and load, four torch imports) shares the machine. This bench isolates the
steady state: one process per stage, each running the real `StageServer` over the real NATS
data plane (`PipeChannel`), driven by the real `PipelineDriver`, against the whole model in one
`LLMEngine`, decoding the same greedy request. Each configuration runs in turn, in one run, and
the bench prints the ratios.

Configurations (`--configs`, comma-separated); the pipelines send frames on direct sockets
and run each on the receiving socket's reader thread, as the workers do; each again as
`<name>-queued` hands a stage's frames to its own thread (one wake-up more per hop, as before
2026-11-23), as `<name>-nats` (`pipe4-nats`, `pipe4-pinned-nats`, ...) sends them all
through the NATS server, and as `<name>-awake` keeps every stage's cores awake while frames
flow (`services/worker/keep_awake.py`, what the workers do by default):
- `whole`, `whole-1t`: the whole model in one process, with torch's default thread pool (one
  thread per core) / with one thread.
- `pipe4`, `pipe2`: a degree-4 / degree-2 pipeline, every stage process with the default pool;
  `pipe2-1t`: degree 2, one thread per stage process.
- `pipe4-1t`: degree 4, one thread per stage process (what `hydraserve up` and
  `bench/coldstart.py` give workers when 4 nodes share 2 cores).
- `pipe4-inproc`: degree 4 with the stages as threads of one process, frames handed inbox to
  inbox: the same stages and wire format without NATS or process wake-ups.
- `pipe4-bgpack`, `pipe4-nopack`: decode right after loading, while the stages pack their
  weights in the background / with packing off (a cold start's situation).
- `pipe4-pinned`, `whole-pinned`: each emulated node's process pinned to one core (node i to
  core i mod cores), one thread.
`pair4-1t`, `pair4-pinned`, ... (and `-nats`): the pipeline and the whole model in turn, one
  request each, in one run (the whole model in the driver's process, with its threads): the
  ratio per pair of requests, so the machine's drift cancels.
`--hops` also times frame round trips between two processes, on a socket and through NATS.
`--rounds N` runs the configurations N times in turn.

    .venv/bin/python bench/pipeline_tpot.py [--size 100m] [--tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = [1, 45, 33, 26, 124, 31, 27, 81, 90, 178, 29, 32, 37, 38, 210, 28]


def _pin(cpu: int | None) -> None:
    """`cpu` -1: one torch thread, no pinning; another number: pinned to that core, one
    thread; None: torch's defaults."""
    import torch

    if cpu is not None:
        if cpu >= 0:
            os.sched_setaffinity(0, {cpu % os.cpu_count()})  # type: ignore[operator]
        torch.set_num_threads(1)


def _stage_process(model_dir: str, start: int, end: int, stage: int, endpoint: str,
                   nats_url: str, cpu: int | None, packing: str, direct: bool, inline: bool,
                   ready: Any, stop: Any, awake: bool = False) -> None:
    """One stage >= 1: load its layers, serve frames until `stop` is set. `inline`: direct
    frames run on the socket's reader thread (as the worker does); else through the inbox
    and the stage's thread (one thread wake-up more per hop)."""
    _pin(cpu)
    import nats

    from services.worker.engine.config import EngineConfig
    from services.worker.engine.model_runner import ModelRunner
    from services.worker.keep_awake import KeepAwake
    from services.worker.pipeline.channel import PipeChannel
    from services.worker.pipeline.stage import StageServer

    runner = ModelRunner(EngineConfig(model_path=Path(model_dir), start_layer=start,
                                      end_layer=end, weight_packing=packing))
    runner.load()
    keep_awake = KeepAwake() if awake else None

    async def serve() -> None:
        nc = await nats.connect(nats_url)
        channel = PipeChannel(nc, endpoint, direct=direct, advertise_host="127.0.0.1")
        if keep_awake is not None:
            keep_awake.start()
        server = StageServer(runner, stage=stage, send=channel.send_threadsafe,
                             on_frame=keep_awake.poke if keep_awake else None)
        server.start()
        await channel.start(stage, server.inbox.put,
                            on_direct_frame=server.handle_now if inline else None)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)
        server.stop(5)
        if keep_awake is not None:
            keep_awake.stop()
        await channel.close()
        await nc.drain()

    asyncio.run(serve())


def _even_bounds(model_dir: Path, degree: int) -> list[int]:
    """The layer cuts of `degree` stages of (nearly) equal layer counts."""
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    return [round(i * num_layers / degree) for i in range(degree + 1)]


def _cpu(pinned: bool | None, stage: int) -> int | None:
    return None if pinned is False else -1 if pinned is None else stage


class _Loop:
    """An asyncio loop on a thread, for the driver's channel."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def _decode(engine: Any, tokens: int, repeats: int, warm_up: bool = True) -> list[float]:
    """Seconds per output token (after the first) of one greedy request, `repeats` times
    (after one warm-up request, unless `warm_up` is False)."""
    from services.worker.engine.sequence import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    tpots = []
    for repeat in range(0 if warm_up else 1, repeats + 1):
        engine.add_request(f"r{repeat}", PROMPT, params)
        stamps: list[float] = []
        while engine.has_unfinished():
            for out in engine.step():
                stamps.extend(time.perf_counter() for _ in out.new_token_ids)
        if repeat:
            tpots.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    return tpots


def _pairs(driver: Any, model_dir: Path, tokens: int, repeats: int, packing: str
           ) -> list[float]:
    """The whole model loaded beside the pipeline's driver; requests alternate between the
    two: the pipeline's TPOT over the whole model's, per pair."""
    from services.worker.engine.engine import LLMEngine

    whole = LLMEngine.from_model_dir(model_dir, with_tokenizer=False, weight_packing=packing)
    whole.load()
    _decode(whole, tokens, 0)
    _decode(driver, tokens, 0)
    return [_decode(driver, tokens, 1, warm_up=False)[0]
            / _decode(whole, tokens, 1, warm_up=False)[0] for _ in range(repeats)]


def run_whole(model_dir: Path, tokens: int, repeats: int, cpu: int | None) -> list[float]:
    _pin(cpu)
    from services.worker.engine.engine import LLMEngine

    engine = LLMEngine.from_model_dir(model_dir, with_tokenizer=False, weight_packing="sync")
    engine.load()
    return _decode(engine, tokens, repeats)


def run_pipeline(model_dir: Path, degree: int, nats_url: str, tokens: int, repeats: int,
                 pinned: bool | None, packing: str = "sync", direct: bool = True,
                 paired: bool = False, inline: bool = True, awake: bool = False
                 ) -> list[float]:
    """`pinned` True: each stage pinned to a core with one thread; None: one thread each,
    unpinned; False: torch's default threads. `direct`: frames on direct sockets (else all
    through the NATS server). `paired`: the whole model is loaded in the driver's process too,
    and requests alternate between the two; the list is then the pipeline's TPOT over the
    whole model's, request by request (drift hits both alike). `awake`: every stage process
    keeps its cores awake while frames flow (`services/worker/keep_awake.py`, as the workers
    do); the driver's spinners run on through the whole model's requests of a pair."""
    import nats

    from services.worker.engine.engine import LLMEngine
    from services.worker.keep_awake import KeepAwake
    from services.worker.pipeline.channel import PipeChannel
    from services.worker.pipeline.driver import PipelineDriver

    bounds = _even_bounds(model_dir, degree)
    endpoint = f"bench{os.getpid()}x{degree}"
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    procs, readies = [], []
    for stage in range(1, degree):
        ready = ctx.Event()
        proc = ctx.Process(target=_stage_process, args=(
            str(model_dir), bounds[stage], bounds[stage + 1], stage, endpoint, nats_url,
            _cpu(pinned, stage), packing, direct, inline, ready, stop, awake), daemon=True)
        proc.start()
        procs.append(proc)
        readies.append(ready)
    _pin(_cpu(pinned, 0))
    engine = LLMEngine.from_model_dir(model_dir, stage_boundaries=bounds[:2],
                                      with_tokenizer=False, weight_packing=packing)
    engine.load()
    for ready in readies:
        if not ready.wait(120):
            raise RuntimeError("a stage process did not get ready")
    loop = _Loop()
    nc = loop.run(nats.connect(nats_url))
    channel = PipeChannel(nc, endpoint, direct=direct, advertise_host="127.0.0.1")
    keep_awake = KeepAwake() if awake else None
    driver = PipelineDriver(engine, degree=degree, send=channel.send_threadsafe,
                            on_launch=keep_awake.poke if keep_awake else None)
    loop.run(channel.start(0, driver.inbox.put))
    if keep_awake is not None:
        keep_awake.start()
    try:
        driver.connect(timeout_s=30)
        if paired:
            return _pairs(driver, model_dir, tokens, repeats, packing)
        # as a cold start does: decode the moment the stages are loaded (while they pack)
        return _decode(driver, tokens, repeats, warm_up=packing == "sync")
    finally:
        if keep_awake is not None:
            keep_awake.stop()
        stop.set()
        for proc in procs:
            proc.join(10)
        loop.run(channel.close())
        loop.run(nc.drain())
        loop.close()


def run_inproc(model_dir: Path, degree: int, tokens: int, repeats: int,
               paired: bool = False) -> list[float]:
    """The pipeline with its stages as threads of one process, frames handed from inbox to
    inbox (the real wire format, no NATS, no process wake-ups); one torch thread. `paired`:
    as in `run_pipeline`."""
    _pin(-1)
    from services.worker.engine.config import EngineConfig
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.model_runner import ModelRunner
    from services.worker.pipeline.driver import PipelineDriver
    from services.worker.pipeline.stage import StageServer

    bounds = _even_bounds(model_dir, degree)
    engine = LLMEngine.from_model_dir(model_dir, stage_boundaries=bounds[:2],
                                      with_tokenizer=False, weight_packing="sync")
    engine.load()
    servers: list[StageServer] = []

    def send(stage: int, frame: bytes) -> None:
        (driver.inbox if stage == 0 else servers[stage - 1].inbox).put(frame)

    driver = PipelineDriver(engine, degree=degree, send=send)
    for stage in range(1, degree):
        runner = ModelRunner(EngineConfig(model_path=model_dir, start_layer=bounds[stage],
                                          end_layer=bounds[stage + 1], weight_packing="sync"))
        runner.load()
        servers.append(StageServer(runner, stage=stage, send=send))
        servers[-1].start()
    try:
        driver.connect(timeout_s=30)
        if paired:
            return _pairs(driver, model_dir, tokens, repeats, "sync")
        return _decode(driver, tokens, repeats)
    finally:
        for server in servers:
            server.stop(5)


def _echo_process(nats_url: str, direct: bool, ready: Any, stop: Any) -> None:
    """Stage 1 of a hop test: every frame straight back to stage 0, through the stage
    server's path (channel -> inbox -> thread -> channel)."""
    import queue

    import nats

    from services.worker.pipeline.channel import PipeChannel

    async def serve() -> None:
        nc = await nats.connect(nats_url)
        channel = PipeChannel(nc, "hop", direct=direct, advertise_host="127.0.0.1")
        inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()

        def echo() -> None:
            while True:
                channel.send_threadsafe(0, inbox.get())

        threading.Thread(target=echo, daemon=True).start()
        await channel.start(1, inbox.put)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.05)

    asyncio.run(serve())


def hop_round_trips(nats_url: str, frame_bytes: int = 3072, count: int = 300,
                    gap_s: float = 0.0, direct: bool = True) -> list[float]:
    """Round trips of a frame to another process and back over the data plane, `gap_s` idle
    between them (a pipeline stage idles while the others compute)."""
    import queue

    import nats

    from services.worker.pipeline.channel import PipeChannel

    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_echo_process, args=(nats_url, direct, ready, stop), daemon=True)
    proc.start()
    loop = _Loop()
    try:
        if not ready.wait(60):
            raise RuntimeError("the echo process did not start")
        nc = loop.run(nats.connect(nats_url))
        channel = PipeChannel(nc, "hop", direct=direct, advertise_host="127.0.0.1")
        inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        loop.run(channel.start(0, inbox.put))
        frame = b"x" * frame_bytes
        trips = []
        for _ in range(count):
            if gap_s:
                time.sleep(gap_s)
            started = time.perf_counter()
            channel.send_threadsafe(1, frame)
            inbox.get(timeout=10)
            trips.append(time.perf_counter() - started)
        loop.run(channel.close())
        loop.run(nc.drain())
        return trips
    finally:
        stop.set()
        proc.join(5)
        loop.close()


def _child(results: Any, fn: Callable[..., list[float]], *args: Any) -> None:
    results.put(fn(*args))


def _in_child(fn: Callable[..., list[float]], *args: Any) -> list[float]:
    """Run one configuration in a fresh process, so thread pools and affinity start clean
    (not a Pool: its daemonic workers may not start the stage processes)."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    proc = ctx.Process(target=_child, args=(results, fn, *args))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{fn.__name__} failed (exit code {proc.exitcode})")
    return results.get()


CONFIGS: dict[str, Callable[[Path, str, int, int], list[float]]] = {
    "whole": lambda m, u, t, r: _in_child(run_whole, m, t, r, None),
    "whole-pinned": lambda m, u, t, r: _in_child(run_whole, m, t, r, 0),
    "whole-1t": lambda m, u, t, r: _in_child(run_whole, m, t, r, -1),
    "pipe4-inproc": lambda m, u, t, r: _in_child(run_inproc, m, 4, t, r),
    "pair4-inproc": lambda m, u, t, r: _in_child(run_inproc, m, 4, t, r, True),
    "pipe4-bgpack": lambda m, u, t, r: _in_child(run_pipeline, m, 4, u, t, r, False,
                                                 "background"),
    "pipe4-nopack": lambda m, u, t, r: _in_child(run_pipeline, m, 4, u, t, r, False, "off"),
}
# (degree, pinned) of the pipelines over direct sockets; each again as `<name>-queued` with a
# stage's direct frames handed to its own thread (not run on the reader thread), and as
# `<name>-nats` with every frame through the NATS server
for _name, (_degree, _pinned) in {"pipe2": (2, False), "pipe2-1t": (2, None),
                                  "pipe4": (4, False), "pipe4-1t": (4, None),
                                  "pipe4-pinned": (4, True)}.items():
    for _suffix, _direct, _inline, _awake in (
            ("", True, True, False), ("-queued", True, False, False),
            ("-nats", False, False, False), ("-awake", True, True, True)):
        CONFIGS[_name + _suffix] = (
            lambda m, u, t, r, d=_degree, p=_pinned, x=_direct, i=_inline, a=_awake:
            _in_child(run_pipeline, m, d, u, t, r, p, "sync", x, False, i, a))
        # `pair<...>`: the pipeline's TPOT over the whole model's, requests alternating
        CONFIGS["pair" + _name.removeprefix("pipe") + _suffix] = (
            lambda m, u, t, r, d=_degree, p=_pinned, x=_direct, i=_inline, a=_awake:
            _in_child(run_pipeline, m, d, u, t, r, p, "sync", x, True, i, a))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m", choices=["tiny", "small", "100m"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the configurations this many times in turn (drift on a "
                             "shared machine then hits every configuration alike)")
    parser.add_argument("--configs", default="whole,pipe4,whole-pinned,pipe4-pinned")
    parser.add_argument("--hops", action="store_true",
                        help="also time frame round trips between two processes (busy, and "
                             "with 30 ms idle between them)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "pipeline_tpot.json")
    args = parser.parse_args()
    configs = args.configs.split(",")
    unknown = set(configs) - CONFIGS.keys()
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {sorted(CONFIGS)}")

    from libs.common.embedded.nats_server import EmbeddedNats
    from services.worker.demo_model import write_demo_model

    # the models bench/coldstart.py writes (this bench needs none of its service imports)
    model_dir = ROOT / "bench" / "out" / "models" / args.size
    if not (model_dir / "config.json").exists():
        write_demo_model(model_dir, size=args.size)
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        for round_index in range(args.rounds):
            for name in configs:
                print(f"round {round_index + 1}, {name}: running", flush=True)
                tpots = CONFIGS[name](model_dir, server.url, args.tokens, args.repeats)
                results.setdefault(name, []).extend(tpots)
                shown = (f"pipeline / whole per pair {', '.join(f'{t:.3f}' for t in tpots)}"
                         if name.startswith("pair") else
                         f"TPOT per request (ms) {', '.join(f'{t * 1e3:.1f}' for t in tpots)}")
                print(f"round {round_index + 1}, {name}: {shown}", flush=True)
        hops: dict[str, float] = {}
        if args.hops:
            for way, direct in (("socket", True), ("NATS", False)):
                for label, gap_s in (("busy", 0.0), ("idle 30 ms", 0.03)):
                    trips = hop_round_trips(server.url, gap_s=gap_s, direct=direct,
                                            count=300 if not gap_s else 100)
                    key = f"{way}, {label} between"
                    hops[key] = statistics.median(trips)
                    print(f"hop round trip, {key}: median {hops[key] * 1e3:.3f} ms", flush=True)
    medians = {name: statistics.median(tpots) for name, tpots in results.items()}
    print(f"\n{'config':<18} {'TPOT median (ms)':>17}")
    for name, value in medians.items():
        if name.startswith("pair"):
            print(f"{name:<18} {'pipeline / whole, median of pairs:':>17} {value:.3f}x "
                  f"(min {min(results[name]):.3f}, max {max(results[name]):.3f}, "
                  f"{len(results[name])} pairs)")
        else:
            print(f"{name:<18} {value * 1e3:>17.1f}")
    for pipe in medians:
        if not pipe.startswith("pipe"):
            continue
        base = pipe.removesuffix("-nats")
        whole = ("whole-1t" if base in ("pipe4-1t", "pipe4-inproc") else
                 "whole-pinned" if base == "pipe4-pinned" else "whole")
        if whole in medians:
            print(f"{pipe} / {whole}: {medians[pipe] / medians[whole]:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "tokens": args.tokens,
                                    "tpot_s": results, "median_s": medians,
                                    "hop_round_trip_s": hops}, indent=2))


if __name__ == "__main__":
    main()
