"""`hydraserve up`: the whole system on one machine.

Starts embedded NATS (JetStream) and PostgreSQL from their wheels unless URLs are configured,
runs the migrations, then the storage service, the gateway, the scheduler and emulated GPU
nodes (node agents with a GPU-memory size and a NIC bandwidth cap), each a child process
logging to `<state>/logs/`. It registers the demo model unless told not to, prints where the
API is, and stops everything on Ctrl-C (children first, then the embedded servers).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from libs.common.embedded.process import free_port, parent_death_preexec

DEMO_MODEL = "demo"


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path


class Supervisor:
    """Child processes that die with us and are stopped in reverse start order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, *args], stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **env}, preexec_fn=parent_death_preexec(signal.SIGTERM),
            )
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def first_exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop_all(self, timeout: float = 15.0) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def run_up(args: argparse.Namespace) -> int:
    state: Path = args.state_dir.resolve()
    state.mkdir(parents=True, exist_ok=True)
    admin_key = _admin_key(state)
    with ExitStack() as stack:
        nats_url = os.environ.get("HYDRASERVE_NATS__URL") or stack.enter_context(
            _embedded_nats(state / "nats"))
        database_url = os.environ.get("HYDRASERVE_DATABASE__URL") or stack.enter_context(
            _embedded_postgres(state / "postgres"))
        _say(f"NATS       {nats_url}")
        _say(f"PostgreSQL {database_url}")
        from libs.common.db.migrate import upgrade

        upgrade(database_url)
        supervisor = Supervisor(state / "logs")
        stack.callback(supervisor.stop_all)
        _install_signal_handlers()
        try:
            api = _start_services(supervisor, args, state=state, nats_url=nats_url,
                                  database_url=database_url, admin_key=admin_key)
        except (TimeoutError, RuntimeError) as exc:
            _say(f"error: {exc}; logs are in {state / 'logs'}")
            return 1
        _banner(api, admin_key, state, demo=args.demo)
        return _supervise(supervisor)
    return 0


def worker_threads(num_nodes: int) -> int:
    """CPU threads per worker when `num_nodes` emulated nodes share this machine: its cores
    split between them, at least one each. (A torch pool with more threads than the CPU time
    it gets waits at every op's barrier for a descheduled thread: on 2 loaded cores, a
    2-thread decode ran 9x slower than a 1-thread one; docs/BENCHMARKS.md.)"""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, num_nodes))


def scheduler_argv(args: argparse.Namespace, *, nats_url: str, database_url: str,
                   storage_url: str) -> list[str]:
    return ["-m", "services.scheduler", "--nats", nats_url, "--database-url", database_url,
            "--storage-url", storage_url, "--policy", args.policy,
            "--max-endpoints", str(args.max_endpoints)]


def node_agent_argv(args: argparse.Namespace, index: int, *, state: Path, nats_url: str,
                    storage_url: str) -> list[str]:
    """Emulated node `index`'s agent: its memory, NIC cap, work dir, launcher and workers'
    threads (the cores split between the nodes unless --worker-threads)."""
    node = f"node-{index}"
    threads = args.worker_threads or worker_threads(args.nodes)
    return ["-m", "services.prefetcher", "--node-id", node,
            "--gpu-memory-gb", str(args.gpu_memory_gb), "--nic-gbps", str(args.nic_gbps),
            "--storage-url", storage_url, "--nats", nats_url,
            "--work-dir", str(state / "nodes" / node), "--launcher", args.launcher,
            f"--worker-arg=--threads={threads}"]


def _start_services(supervisor: Supervisor, args: argparse.Namespace, *, state: Path,
                    nats_url: str, database_url: str, admin_key: str) -> str:
    storage_url = f"http://127.0.0.1:{free_port('127.0.0.1')}"
    env = {"HYDRASERVE_NATS__URL": nats_url, "HYDRASERVE_DATABASE__URL": database_url}
    supervisor.start("storage", ["-m", "services.storage", "--root", str(state / "storage"),
                                 "--port", storage_url.rsplit(":", 1)[1]], env)
    _wait_http(f"{storage_url}/models", "storage", supervisor)
    api = f"http://{args.host}:{args.port}"
    supervisor.start("gateway", ["-m", "services.gateway"], {
        **env, "HYDRASERVE_GATEWAY__HOST": args.host, "HYDRASERVE_GATEWAY__PORT": str(args.port),
        "HYDRASERVE_GATEWAY__ADMIN_KEY": admin_key,
        "HYDRASERVE_GATEWAY__STORAGE_URL": storage_url,
    })
    _wait_http(f"{api}/health", "gateway", supervisor)
    if args.demo:
        _register_demo(api, admin_key, state, keep_alive_s=args.keep_alive)
    supervisor.start("scheduler", scheduler_argv(args, nats_url=nats_url,
                                                 database_url=database_url,
                                                 storage_url=storage_url), env)
    for i in range(args.nodes):
        supervisor.start(f"node-{i}", node_agent_argv(args, i, state=state, nats_url=nats_url,
                                                      storage_url=storage_url), env)
    _wait_for_nodes(api, admin_key, args.nodes, supervisor)
    return api


def _wait_for_nodes(api: str, admin_key: str, num_nodes: int, supervisor: Supervisor,
                    timeout: float = 120.0) -> None:
    """Ready when the scheduler has recorded every node as up: it is consuming events then,
    so a request sent after the banner is seen (a new scheduler starts at new events)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = supervisor.first_exited()
        if exited is not None:
            raise RuntimeError(f"{exited.name} exited with {exited.process.returncode} "
                               f"(see {exited.log})")
        response = httpx.get(f"{api}/admin/nodes", timeout=5,
                             headers={"Authorization": f"Bearer {admin_key}"})
        if response.status_code == 200:
            up = [n for n in response.json()["data"] if n["state"] == "up"]
            if len(up) >= num_nodes:
                return
        time.sleep(0.3)
    raise TimeoutError(f"the scheduler did not see {num_nodes} nodes within {timeout:.0f}s")


def _register_demo(api: str, admin_key: str, state: Path, *, keep_alive_s: float) -> None:
    from services.worker.demo_model import write_demo_model

    folder = state / "demo-model"
    if not (folder / "config.json").is_file():
        write_demo_model(folder)
    response = httpx.post(f"{api}/admin/models", timeout=60, headers={
        "Authorization": f"Bearer {admin_key}"}, json={
        "name": DEMO_MODEL, "path": str(folder), "ttft_slo_ms": 10_000, "tpot_slo_ms": 200,
        "keep_alive_s": keep_alive_s,
    })
    if response.status_code == 409:
        return  # registered by an earlier `up` on the same state
    if response.status_code != 201:
        raise RuntimeError(f"registering the demo model failed: {response.text}")
    _say(f"registered model {DEMO_MODEL!r} from {folder}")


def _supervise(supervisor: Supervisor) -> int:
    try:
        while True:
            exited = supervisor.first_exited()
            if exited is not None:
                _say(f"{exited.name} exited with {exited.process.returncode}; see {exited.log}")
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        _say("stopping ...")
        return 0


def _install_signal_handlers() -> None:
    """SIGTERM (docker stop, kill) shuts down like Ctrl-C; SIGINT is handled even when the
    shell started us with it ignored (a background job)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


@contextmanager
def _embedded_nats(store: Path) -> Iterator[str]:
    from libs.common.embedded import EmbeddedNats

    with EmbeddedNats(store) as server:
        yield server.url


@contextmanager
def _embedded_postgres(data: Path) -> Iterator[str]:
    from libs.common.embedded import EmbeddedPostgres

    with EmbeddedPostgres(data) as server:
        yield server.url


def _wait_http(url: str, name: str, supervisor: Supervisor, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = supervisor.first_exited()
        if exited is not None:
            raise RuntimeError(f"{exited.name} exited with {exited.process.returncode} "
                               f"(see {exited.log})")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} did not answer at {url} within {timeout:.0f}s")


def _admin_key(state: Path) -> str:
    """The admin key: from the environment, else one generated once per state folder."""
    if key := os.environ.get("HYDRASERVE_GATEWAY__ADMIN_KEY"):
        return key
    path = state / "admin_key"
    if not path.is_file():
        path.write_text(f"sk-admin-{secrets.token_urlsafe(24)}")
        path.chmod(0o600)
    return path.read_text().strip()


def _banner(api: str, admin_key: str, state: Path, *, demo: bool) -> None:
    model = DEMO_MODEL if demo else "<your model>"
    _say(f"""
HydraServe is up.
  API        {api}/v1   (OpenAI-compatible)
  admin key  {admin_key}
  logs       {state / 'logs'}

Try it (the first request cold-starts the model):
  curl {api}/v1/completions -H "Authorization: Bearer {admin_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "prompt": "Once upon a time", "max_tokens": 16}}'

{BANNER_END}""")


# the banner's last line: a program running `hydraserve up` reads its output up to here
BANNER_END = "Ctrl-C stops everything."


def read_banner(process: subprocess.Popen[str], *, timeout_s: float) -> str:
    """The output of a `hydraserve up` child (text stdout, stderr merged) up to the end of its
    banner; RuntimeError if it exits first, TimeoutError if the banner takes longer."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"hydraserve up exited: {''.join(lines)}")
        lines.append(line)
        if BANNER_END in line:
            return "".join(lines)
    raise TimeoutError(f"hydraserve up printed no banner within {timeout_s:.0f}s: "
                       f"{''.join(lines)}")


def _say(message: str) -> None:
    print(message, flush=True)
