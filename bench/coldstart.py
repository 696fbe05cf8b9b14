"""Cold starts of every policy, side by side on one emulated cluster.

Sets up, on loopback only: embedded NATS (JetStream) and PostgreSQL (or the servers named by
HYDRASERVE_NATS__URL / HYDRASERVE_DATABASE__URL), a random-weight demo model imported into the
storage service with an egress cap, four node agents whose fetches share a per-node NIC cap,
and the gateway. Then, for each mode, a scheduler with that policy (on a database of its own)
serves cold requests: each one a streamed greedy completion through the gateway with the
`openai` client, sent once the model has scaled to zero (keep-alive) so that it is cold.

Modes (DESIGN.md's baselines, all the same scheduler core):
- `serverless_vllm`: one worker; fetch the whole model, then start the worker, then load.
- `single_worker`: one worker, every start-up stage overlapped with the fetch.
- `hydraserve`: pipeline of degree `--degree` (default 4) across nodes, overlapped, then
  consolidation into the full-size worker (its TPOT is measured before and after).

Reported: client-side TTFT per cold request and the mean of the best `--best` (default 2 of
3), the phase breakdown of the best cold start (from the events), ratios to
`serverless_vllm`, the floor size / (degree x NIC) + first-token time (a warm request's
TTFT), and TPOT of the pipeline, of the consolidated worker and of a single worker.
Node agents fork workers from a zygote with their imports done (`--launcher forkserver`, the
same for every mode; `--launcher local` spawns them). Every worker runs with cores / 4
threads (at least 1; `--worker-threads`), the emulated node's share of this machine, as
`hydraserve up` does: a thread pool larger than the CPU time it gets stalls at every op's
barrier and would slow whichever mode has more processes.
Run: `python bench/coldstart.py [--quick]`; writes bench/out/coldstart.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import nats  # noqa: E402
from nats.js.api import DeliverPolicy  # noqa: E402

from hydraserve.up import Supervisor, worker_threads  # noqa: E402
from libs.common.embedded.process import free_port  # noqa: E402
from libs.common.messages import Event, EventKind  # noqa: E402
from libs.common.subjects import EVENTS_SUBJECTS  # noqa: E402

API_KEY = "sk-bench-coldstart-0123456789"
PROMPT = "Once upon a time"
NODES = ("node-0", "node-1", "node-2", "node-3")
MODES = ("serverless_vllm", "single_worker", "hydraserve")


@dataclass
class Request:
    ttft_s: float
    tpot_s: float
    num_tokens: int
    text: str


@dataclass
class ColdStart:
    mode: str
    request: Request
    # phase -> seconds since the request was sent (latest over the stages)
    phases: dict[str, float] = field(default_factory=dict)
    degree: int = 1


@dataclass
class ModeResult:
    mode: str
    colds: list[ColdStart] = field(default_factory=list)
    # a warm request after each cold start (hydraserve: after consolidation)
    warms: list[Request] = field(default_factory=list)

    @property
    def warm(self) -> Request | None:
        """The warm request with the median TPOT (the cold TPOT is a median too)."""
        ranked = sorted(self.warms, key=lambda r: r.tpot_s)
        return ranked[(len(ranked) - 1) // 2] if ranked else None

    def best_ttft(self, best: int) -> float:
        return statistics.mean(sorted(c.request.ttft_s for c in self.colds)[:best])


# --- the cluster ------------------------------------------------------------------------------
class Cluster:
    def __init__(self, args: argparse.Namespace, work: Path, stack: ExitStack) -> None:
        self.args = args
        self.work = work
        self.supervisor = Supervisor(work / "logs")
        stack.callback(self.supervisor.stop_all)
        self.nats_url = os.environ.get("HYDRASERVE_NATS__URL") or self._embedded_nats(stack)
        self.server_url = os.environ.get("HYDRASERVE_DATABASE__URL") or \
            self._embedded_postgres(stack)
        self.storage_url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        self.api = f"http://127.0.0.1:{free_port('127.0.0.1')}"
        self.model = f"bench-{uuid.uuid4().hex[:6]}"
        self.nic_bytes_per_s = 0.0
        self.size_bytes = 0
        self.scheduler: Any = None

    def _embedded_nats(self, stack: ExitStack) -> str:
        from libs.common.embedded import EmbeddedNats

        return stack.enter_context(EmbeddedNats(self.work / "nats")).url

    def _embedded_postgres(self, stack: ExitStack) -> str:
        from libs.common.embedded import EmbeddedPostgres

        return stack.enter_context(EmbeddedPostgres(self.work / "postgres")).url

    def start(self, model_dir: Path) -> None:
        args = self.args
        self.size_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        self.nic_bytes_per_s = self.size_bytes / args.fetch_s
        egress_mbps = self.nic_bytes_per_s * 8 / 1e6 * len(NODES) * args.egress_factor
        self.supervisor.start("storage", [
            "-m", "services.storage", "--root", str(self.work / "store"),
            "--port", self.storage_url.rsplit(":", 1)[1], "--egress-mbps", f"{egress_mbps:.3f}",
        ], {})
        _wait_http(f"{self.storage_url}/models", self.supervisor)
        response = httpx.post(f"{self.storage_url}/models",
                              json={"path": str(model_dir), "name": self.model}, timeout=600)
        response.raise_for_status()
        self.supervisor.start("gateway", ["-m", "services.gateway"], {
            "HYDRASERVE_NATS__URL": self.nats_url,
            "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
            "HYDRASERVE_GATEWAY__PORT": self.api.rsplit(":", 1)[1],
            "HYDRASERVE_GATEWAY__API_KEYS": json.dumps([API_KEY]),
            "HYDRASERVE_GATEWAY__MODELS": json.dumps([self.model]),
            "HYDRASERVE_GATEWAY__FIRST_TOKEN_TIMEOUT_S": "600",
        })
        _wait_http(f"{self.api}/health", self.supervisor)
        nic_gbps = self.nic_bytes_per_s * 8 / 1e9
        # each emulated node's workers get its share of the cores (as `hydraserve up` does)
        threads = self.args.worker_threads or worker_threads(len(NODES))
        for node in NODES:
            self.supervisor.start(f"agent-{node}", [
                "-m", "services.prefetcher", "--node-id", node, "--gpu-memory-gb", "16",
                "--nic-gbps", f"{nic_gbps:.6f}", "--storage-url", self.storage_url,
                "--nats", self.nats_url, "--work-dir", str(self.work / "nodes" / node),
                "--heartbeat-interval", "1", "--worker-arg=--capacity=4",
                f"--worker-arg=--threads={threads}", "--launcher", self.args.launcher,
            ], {})

    async def start_scheduler(self, mode: str) -> None:
        database_url = await _fresh_database(self.server_url, f"hs_bench_{mode}")
        policy = ["--policy", mode]
        keep_alive = self.args.keep_alive
        if mode == "hydraserve":
            policy += ["--degree", str(self.args.degree)]
            if not self.args.consolidate:
                policy += ["--no-consolidate"]
            # long enough for the consolidation fetch (the rest of the model over one NIC),
            # or the idle endpoint scales to zero before the warm request can be measured
            keep_alive = max(keep_alive, self.args.fetch_s + 5)
        self.scheduler = self.supervisor.start(f"scheduler-{mode}", [
            "-m", "services.scheduler", "--nats", self.nats_url, "--database-url",
            database_url, "--storage-url", self.storage_url, "--register-model", self.model,
            "--keep-alive", str(keep_alive), "--consumer", f"bench-{mode}",
            "--ttft-slo", "600", *policy,
        ], {})
        await _wait_for_nodes(database_url, self.supervisor)

    def stop_scheduler(self) -> None:
        child = self.scheduler
        child.process.terminate()
        child.process.wait(30)
        self.supervisor.children.remove(child)


def _wait_http(url: str, supervisor: Supervisor, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (exited := supervisor.first_exited()) is not None:
            raise RuntimeError(f"{exited.name} exited; see {exited.log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer")


async def _fresh_database(server_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    from libs.common.db.migrate import upgrade

    server = make_url(server_url)
    dsn = server.set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = server.set(drivername="postgresql+asyncpg", database=name).render_as_string(
        hide_password=False)
    await asyncio.to_thread(upgrade, url)
    return url


async def _wait_for_nodes(database_url: str, supervisor: Supervisor) -> None:
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        async with asyncio.timeout(60):
            while len(await conn.fetch("SELECT id FROM nodes")) < len(NODES):
                if (exited := supervisor.first_exited()) is not None:
                    raise RuntimeError(f"{exited.name} exited; see {exited.log}")
                await asyncio.sleep(0.2)
    finally:
        await conn.close()


# --- events -----------------------------------------------------------------------------------
class EventLog:
    """Every event from now on, collected in the background."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.events: list[Event] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventLog:
        self._nc = await nats.connect(self.nats_url)
        js = self._nc.jetstream()
        self._sub = await js.subscribe(EVENTS_SUBJECTS, ordered_consumer=True,
                                       deliver_policy=DeliverPolicy.NEW)
        self._task = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await self._nc.close()

    async def _collect(self) -> None:
        async for msg in self._sub.messages:
            self.events.append(Event.model_validate_json(msg.data))

    def since(self, at: float, kind: str | None = None) -> list[Event]:
        return [e for e in self.events if e.time >= at and (kind is None or e.kind == kind)]

    async def wait_for(self, at: float, kind: str, count: int = 1, timeout: float = 900,
                       **data: Any) -> list[Event]:
        async with asyncio.timeout(timeout):
            while True:
                found = [e for e in self.since(at, kind)
                         if all(e.data.get(k) == v for k, v in data.items())]
                if len(found) >= count:
                    return found
                await asyncio.sleep(0.1)


# --- requests ---------------------------------------------------------------------------------
async def stream(api: str, model: str, max_tokens: int) -> tuple[Request, float]:
    """A streamed greedy completion; (its figures, the unix time it was sent)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{api}/v1", api_key=API_KEY, max_retries=0, timeout=900)
    sent_at = time.time()
    sent = time.perf_counter()
    times: list[float] = []
    text = ""
    try:
        chunks = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        async for chunk in chunks:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
                text += chunk.choices[0].text
    finally:
        await client.close()
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    return Request(times[0] - sent, tpot, len(times), text), sent_at


def phases(events: list[Event], sent_at: float) -> tuple[dict[str, float], int]:
    """The cold start's phases (latest over its stages), seconds since the request was sent."""
    placed = [e for e in events if e.kind == EventKind.WORKER_PLACED]
    worker_ids = {e.worker_id for e in placed}
    out: dict[str, float] = {}

    def latest(name: str, times: list[float]) -> None:
        if times:
            out[name] = max(times) - sent_at

    latest("placed", [e.time for e in placed])
    latest("fetch done", [e.time for e in events if e.kind == EventKind.FETCH_DONE
                          and e.worker_id in worker_ids and not e.data.get("consolidation")])
    ready = [e for e in events if e.kind == EventKind.WORKER_READY and e.worker_id in worker_ids]
    for phase in ("process_started_at", "imports_done_at", "engine_imported_at",
                  "load_started_at", "loaded_at", "ready_at"):
        latest(phase.removesuffix("_at").replace("_", " "),
               [e.data["phases"][phase] for e in ready if phase in e.data.get("phases", {})])
    latest("pipeline ready", [e.time for e in events
                              if e.kind == EventKind.ENDPOINT_PIPELINE_READY])
    first_tokens = [e.time for e in events if e.kind == EventKind.REQUEST_FIRST_TOKEN]
    if first_tokens:  # the cold request's (a warm one may follow)
        out["first token"] = min(first_tokens) - sent_at
    return dict(sorted(out.items(), key=lambda kv: kv[1])), max(1, len(placed))


async def run_mode(cluster: Cluster, log: EventLog, mode: str, args: argparse.Namespace
                   ) -> ModeResult:
    result = ModeResult(mode)
    await cluster.start_scheduler(mode)
    try:
        for attempt in range(args.cold):
            request, sent_at = await stream(cluster.api, cluster.model, args.max_tokens)
            events = log.since(sent_at)
            if mode == "hydraserve" and args.degree > 1 and args.consolidate:
                await log.wait_for(sent_at, EventKind.WORKER_CONSOLIDATED)
                # the released stages' processes exit first (they share the 2 cores)
                await log.wait_for(sent_at, EventKind.WORKER_STOPPED, count=args.degree - 1,
                                   by="node_agent")
            warm, _ = await stream(cluster.api, cluster.model, args.max_tokens)
            result.warms.append(warm)
            cold_phases, degree = phases(log.since(sent_at), sent_at)
            result.colds.append(ColdStart(mode, request, cold_phases, degree))
            print(f"  {mode} cold #{attempt + 1}: TTFT {request.ttft_s:6.2f}s  degree {degree}"
                  f"  TPOT cold {request.tpot_s * 1000:6.1f} ms, warm {warm.tpot_s * 1000:6.1f} ms"
                  f"  ({len(events)} events)", flush=True)
            # cold again: wait until every worker has stopped (keep-alive, scale to zero)
            placed = log.since(sent_at, EventKind.WORKER_PLACED)
            await log.wait_for(sent_at, EventKind.WORKER_STOPPED, count=len(placed),
                               by="node_agent")
            for stopped in log.since(sent_at, EventKind.WORKER_STOPPED):
                steps = stopped.data.get("num_steps") or 0
                if steps and "compute_s" in stopped.data:  # a pipeline stage after the first
                    print(f"    stage worker {stopped.worker_id}: {steps} steps, model "
                          f"{stopped.data['compute_s'] / steps * 1000:.2f} ms/step, frames "
                          f"{stopped.data['frame_s'] / steps * 1000:.2f} ms/step", flush=True)
    finally:
        cluster.stop_scheduler()
    return result


# --- report -----------------------------------------------------------------------------------
def report(results: dict[str, ModeResult], cluster: Cluster, args: argparse.Namespace
           ) -> dict[str, Any]:
    base = results["serverless_vllm"].best_ttft(args.best)
    single_warm = results["single_worker"].warm
    first_token_s = single_warm.ttft_s if single_warm else 0.0
    floor = cluster.size_bytes / (args.degree * cluster.nic_bytes_per_s) + first_token_s
    lines = [f"model {cluster.size_bytes / 1e6:.0f} MB, NIC {cluster.nic_bytes_per_s / 1e6:.2f} "
             f"MB/s per node ({cluster.size_bytes / cluster.nic_bytes_per_s:.1f} s for the whole"
             f" model), storage egress {args.egress_factor:g} x 4 NICs, {args.cold} cold "
             f"requests per mode, TTFT = mean of the best {args.best}", ""]
    lines.append(f"{'mode':<16} {'TTFT s':>8} {'vs serverless_vllm':>19} {'vs floor':>9}"
                 f" {'TPOT cold ms':>13} {'TPOT warm ms':>13}")
    summary: dict[str, Any] = {}
    for mode, result in results.items():
        ttft = result.best_ttft(args.best)
        tpot_cold = statistics.median(c.request.tpot_s for c in result.colds)
        tpot_warm = result.warm.tpot_s if result.warm else float("nan")
        lines.append(f"{mode:<16} {ttft:8.2f} {base / ttft:18.2f}x {ttft / floor:8.2f}x"
                     f" {tpot_cold * 1000:13.1f} {tpot_warm * 1000:13.1f}")
        summary[mode] = {"ttft_s": ttft, "speedup_vs_serverless_vllm": base / ttft,
                         "vs_floor": ttft / floor, "tpot_cold_s": tpot_cold,
                         "tpot_warm_s": tpot_warm,
                         "ttfts_s": [c.request.ttft_s for c in result.colds]}
    lines += ["", f"floor = size / ({args.degree} x NIC) + first-token time "
              f"({first_token_s:.3f} s, a warm single worker's TTFT) = {floor:.2f} s"]
    hydra = results["hydraserve"]
    pipeline_tpot = summary["hydraserve"]["tpot_cold_s"]
    consolidated_tpot = summary["hydraserve"]["tpot_warm_s"]
    single_tpot = summary["single_worker"]["tpot_warm_s"]
    lines.append(f"TPOT: pipeline {pipeline_tpot * 1000:.1f} ms = "
                 f"{pipeline_tpot / consolidated_tpot:.2f}x the consolidated worker's "
                 f"({consolidated_tpot * 1000:.1f} ms); consolidated / single worker = "
                 f"{consolidated_tpot / single_tpot:.2f}x")
    lines.append("")
    lines.append("phases of the best cold start of each mode (s since the request was sent):")
    for mode, result in results.items():
        best = min(result.colds, key=lambda c: c.request.ttft_s)
        lines.append(f"  {mode} (degree {best.degree}): " + ", ".join(
            f"{name} {at:.2f}" for name, at in best.phases.items()))
    text = "\n".join(lines)
    print("\n" + text)
    same_text = {mode: len({c.request.text for c in r.colds} | {w.text for w in r.warms})
                 for mode, r in results.items()}
    texts = {r.colds[0].request.text for r in results.values()}
    print(f"\nanswers identical across modes and requests: {len(texts) == 1} "
          f"(distinct per mode: {same_text})")
    return {"summary": summary, "floor_s": floor, "report": text,
            "size_bytes": cluster.size_bytes, "nic_bytes_per_s": cluster.nic_bytes_per_s,
            "colds": {m: [asdict(c) for c in r.colds] for m, r in results.items()},
            "pipeline_tpot_vs_consolidated": pipeline_tpot / consolidated_tpot,
            "degree": hydra.colds[0].degree if hydra.colds else None}


def demo_model(size: str) -> Path:
    from services.worker.demo_model import write_demo_model

    out = ROOT / "bench" / "out" / "models" / size
    if not (out / "config.json").exists():
        print(f"writing the {size} demo model to {out} ...", flush=True)
        write_demo_model(out, size=size)
    return out


async def run(args: argparse.Namespace) -> None:
    model_dir = demo_model(args.size)
    work = ROOT / "bench" / "out" / "coldstart-run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with ExitStack() as stack:
        cluster = Cluster(args, work, stack)
        cluster.start(model_dir)
        print(f"cluster up: 4 nodes, NIC {cluster.nic_bytes_per_s / 1e6:.2f} MB/s each; "
              f"model {cluster.size_bytes / 1e6:.0f} MB; logs in {work}/logs", flush=True)
        results: dict[str, ModeResult] = {}
        async with EventLog(cluster.nats_url) as log:
            for mode in [args.only] if args.only else MODES:
                results[mode] = await run_mode(cluster, log, mode, args)
        if args.only:  # an experiment on one mode: its per-request lines are the output
            return
        out = report(results, cluster, args)
    out.update(date=time.strftime("%Y-%m-%d %H:%M"), machine=platform.platform(),
               cpus=os.cpu_count(), args=vars(args))
    path = ROOT / "bench" / "out" / "coldstart.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launcher", choices=["local", "forkserver"], default="forkserver",
                        help="how node agents start workers, the same for every mode "
                             "(default forkserver: forked with torch imported)")
    parser.add_argument("--no-consolidate", dest="consolidate", action="store_false",
                        help="hydraserve's pipeline is not consolidated (its TPOT alone)")
    parser.add_argument("--worker-threads", type=int,
                        help="CPU threads per worker (default: cores / 4 nodes, at least 1)")
    parser.add_argument("--size", default="100m", choices=["tiny", "small", "100m"],
                        help="the demo model (100m: 125M parameters, 500 MB fp32)")
    parser.add_argument("--fetch-s", type=float, default=24.0,
                        help="seconds one node's NIC takes for the whole model (sets the cap)")
    parser.add_argument("--egress-factor", type=float, default=1.0,
                        help="storage egress cap as a multiple of the 4 NICs together")
    parser.add_argument("--degree", type=int, default=4, choices=[2, 3, 4])
    parser.add_argument("--cold", type=int, default=3, help="cold requests per mode")
    parser.add_argument("--best", type=int, default=2, help="TTFT: mean of the best N")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--keep-alive", type=float, default=2.0)
    parser.add_argument("--only", choices=MODES,
                        help="run one mode and print its requests, no report (experiments)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: small model, 6 s fetch, 1 cold request per mode")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.fetch_s, args.cold, args.best = "small", 6.0, 1, 1
    return args


def main() -> None:
    asyncio.run(run(parse_args()))


if __name__ == "__main__":
    main()

