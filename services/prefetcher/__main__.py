"""`python -m services.prefetcher --node-id N --gpu-memory-gb G --nic-gbps B --storage-url URL
[--nats URL] [--work-dir DIR] [--launcher local|forkserver|kubernetes [--k8s-...]]`: the node
agent of one (possibly emulated) GPU node. Workers are local processes, processes forked from a
zygote with their imports done (`--launcher forkserver`), or pods (`--launcher kubernetes`,
the agent itself in a pod; see docs/KUBERNETES.md).

Runs until SIGTERM/SIGINT, then stops its workers. Exit codes: 0 after a clean shutdown, 2 if
it could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from nats.errors import Error as NatsError

from libs.common.errors import HydraError
from libs.common.logging import configure_logging
from libs.common.metrics import serve_metrics
from libs.common.settings import Settings
from libs.common.tracing import configure_tracing
from services.prefetcher.agent import AgentConfig
from services.prefetcher.launcher import Launcher, LocalLauncher
from services.prefetcher.service import NodeAgentService, NodeConfig

logger = logging.getLogger("services.prefetcher")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.prefetcher",
                                     description="The node agent of one GPU node.")
    parser.add_argument("--node-id", required=True)
    parser.add_argument("--gpu-memory-gb", type=float, required=True)
    parser.add_argument("--nic-gbps", type=float, required=True,
                        help="the NIC bandwidth fetches on this node may use, Gbit/s")
    parser.add_argument("--storage-url", required=True, help="the model store's base URL")
    parser.add_argument("--nats", help="NATS URL (default: HYDRASERVE_NATS__URL)")
    parser.add_argument("--work-dir", type=Path,
                        help="where partitions go (default: /dev/shm/hydraserve-<node id>)")
    parser.add_argument("--gpu-type", default="cpu")
    parser.add_argument("--heartbeat-interval", type=float, default=2.0)
    parser.add_argument("--worker-arg", action="append", default=[],
                        help="an extra flag for every worker, e.g. --worker-arg=--capacity=4")
    parser.add_argument("--cache-gb", type=float, default=0.0,
                        help="host-memory model cache: keep fetched partitions up to this "
                             "many GB after their workers stop (0: off)")
    parser.add_argument("--launcher", choices=["local", "forkserver", "kubernetes"],
                        default="local",
                        help="workers as processes here; forked here from a process with "
                             "their imports (torch) done; or as pods on this node")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics on this port (default 0: off)")
    k8s = parser.add_argument_group("--launcher kubernetes")
    k8s.add_argument("--k8s-namespace", default="default", help="where worker pods go")
    k8s.add_argument("--k8s-node-name", help="the node worker pods are pinned to "
                     "(default: --node-id)")
    k8s.add_argument("--k8s-pod-name", help="this agent's pod: owns the worker pods and "
                     "gives their image unless --k8s-image")
    k8s.add_argument("--k8s-image", default="", help="the worker pods' image")
    k8s.add_argument("--k8s-worker-memory-gb", type=float, default=4.0,
                     help="host memory each worker pod requests")
    k8s.add_argument("--k8s-config-map", help="a ConfigMap of HYDRASERVE_* settings for workers")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace) -> NodeConfig:
    work_dir = args.work_dir or Path("/dev/shm") / f"hydraserve-{args.node_id}"
    agent = AgentConfig(node_id=args.node_id, storage_url=args.storage_url,
                        nats_url=args.nats or Settings().nats.url, work_dir=work_dir,
                        worker_args=tuple(args.worker_arg),
                        cache_bytes=int(args.cache_gb * (1 << 30)))
    return NodeConfig(agent=agent, gpu_memory_bytes=int(args.gpu_memory_gb * (1 << 30)),
                      nic_bandwidth_bytes_per_s=int(args.nic_gbps * 1e9 / 8),
                      gpu_type=args.gpu_type, heartbeat_interval_s=args.heartbeat_interval)


def build_launcher(args: argparse.Namespace, config: NodeConfig) -> Launcher:
    if args.launcher == "local":
        return LocalLauncher()
    if args.launcher == "forkserver":
        from services.prefetcher.forkserver import ForkServerLauncher

        return ForkServerLauncher(log_path=config.agent.work_dir / "logs" / "zygote.log")
    # imported here only: the kubernetes client stays out of every other process
    from services.prefetcher.k8s_launcher import KubernetesLauncher, PodTemplate

    template = PodTemplate(
        namespace=args.k8s_namespace, image=args.k8s_image,
        node_name=args.k8s_node_name or args.node_id,
        shm_host_path=str(config.agent.work_dir), gpu_type=config.gpu_type,
        memory_bytes=int(args.k8s_worker_memory_gb * (1 << 30)),
        config_map=args.k8s_config_map)
    return KubernetesLauncher.in_cluster(template, pod_name=args.k8s_pod_name)


def _log_start_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("the worker launcher did not start: %r", exc)


async def serve(config: NodeConfig, settings: Settings, launcher: Launcher) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nats_settings = settings.nats.model_copy(update={"url": config.agent.nats_url})
    # alongside the agent's start (a fork server imports the worker's modules meanwhile); a
    # failure is logged here and raised again by the first launch
    starting = asyncio.create_task(launcher.start())
    starting.add_done_callback(_log_start_failure)
    return await NodeAgentService(config, nats=nats_settings, bus=settings.bus,
                                  launcher=launcher).run(stop)


def main(argv: list[str] | None = None) -> int:
    configure_logging("prefetcher")
    configure_tracing("prefetcher")
    args = parse_args(argv)
    try:
        serve_metrics(args.metrics_port)
        settings = Settings()
        config = build_config(args)
        return asyncio.run(serve(config, settings, build_launcher(args, config)))
    except (HydraError, NatsError, OSError, ValueError) as exc:
        logger.error("node agent failed: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
