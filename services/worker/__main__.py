"""`python -m services.worker --model-dir DIR --model NAME [--nats URL] [--worker-id ID]
[--capacity N]`: serve one model's requests from NATS until SIGTERM/SIGINT.

Settings not given as flags come from the environment (`HYDRASERVE_WORKER__ACK_WAIT_S`, ...,
see libs/common/settings.py). Exit codes: 0 after a clean shutdown, 1 if the engine crashed,
2 if the worker could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

from nats.errors import Error as NatsError
from opentelemetry import context as otel_context

from libs.common.errors import HydraError
from libs.common.logging import configure_logging
from libs.common.metrics import serve_metrics
from libs.common.settings import Settings
from libs.common.tracing import configure_tracing, context_from_environment
from services.worker.config import WorkerConfig
from services.worker.service import WorkerService

IMPORTS_DONE_AT = time.time()
logger = logging.getLogger("services.worker")


def process_started_at() -> float:
    """Unix time the process was spawned (Linux /proc, 10 ms ticks since boot), else now."""
    try:
        with open("/proc/self/stat") as f:
            # field 22, counted after the parenthesised command name (which may hold spaces)
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()
    return time.time() - (since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.worker",
                                     description="Serve one model's requests from NATS.")
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="the model folder (HF format); with --partition, the folder the "
                             "node agent fills next to the partition")
    parser.add_argument("--partition", type=Path,
                        help="a partition file being filled behind its watermark (<file>.wm): "
                             "load each tensor as its bytes arrive")
    parser.add_argument("--model", required=True, help="the model name clients ask for")
    parser.add_argument("--nats", help="NATS URL (default: HYDRASERVE_NATS__URL)")
    parser.add_argument("--worker-id", help="default: <hostname>-<random>")
    parser.add_argument("--capacity", type=int, help="requests run at once")
    parser.add_argument("--ack-wait", type=float,
                        help="seconds before a silent worker's requests are redelivered")
    parser.add_argument("--node-id")
    parser.add_argument("--endpoint-id")
    parser.add_argument("--degree", type=int, default=1,
                        help="the pipeline degree of the endpoint (1: a whole-model worker)")
    parser.add_argument("--stage", type=int, default=0,
                        help="this worker's pipeline stage; 0 drives the pipeline and serves "
                             "requests, the others serve activations (needs --endpoint-id)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, help="longest prompt + completion")
    parser.add_argument("--threads", type=int,
                        help="CPU threads for the engine's ops (default: torch's, one per core). "
                             "Emulated nodes sharing a machine should split its cores: a "
                             "thread pool larger than the CPU time it gets stalls at every "
                             "op's barrier")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics on this port (default 0: off)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if not 0 <= args.stage < args.degree:
        parser.error(f"--stage {args.stage} is not a stage of a degree-{args.degree} pipeline")
    if args.degree > 1 and (args.endpoint_id is None or args.partition is None):
        parser.error("a pipeline stage needs --endpoint-id and --partition")
    return args


def build_config(args: argparse.Namespace, settings: Settings) -> WorkerConfig:
    nats_settings = settings.nats.model_copy(update={"url": args.nats} if args.nats else {})
    overrides = {name: value for name, value in
                 (("capacity", args.capacity), ("ack_wait_s", args.ack_wait))
                 if value is not None}
    worker = settings.worker.model_validate(settings.worker.model_dump() | overrides)
    engine_options: dict[str, object] = {"device": args.device, "dtype": args.dtype}
    if args.max_model_len is not None:
        engine_options["max_model_len"] = args.max_model_len
    return WorkerConfig(
        model=args.model, model_dir=args.model_dir,
        worker_id=args.worker_id or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
        nats=nats_settings, bus=settings.bus, worker=worker, node_id=args.node_id,
        endpoint_id=args.endpoint_id, engine_options=engine_options, partition=args.partition,
        stage=args.stage, degree=args.degree,
        phases={"process_started_at": process_started_at(), "imports_done_at": IMPORTS_DONE_AT},
    )


async def serve(config: WorkerConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.stage > 0:
        from services.worker.stage_service import StageService

        return await StageService(config).run(stop)
    return await WorkerService(config).run(stop)


def set_threads(threads: int) -> None:
    """The engine's intra-op thread count: torch reads OMP_NUM_THREADS when it loads, which
    here happens later, in the load thread."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    configure_logging("worker")
    configure_tracing("worker")
    # launched by a node agent: the process runs in its launch span's trace (TRACEPARENT),
    # so the start-up span joins the trace of the request that placed it
    otel_context.attach(context_from_environment(os.environ))
    args = parse_args(argv)
    if args.threads is not None:
        set_threads(args.threads)
    try:
        serve_metrics(args.metrics_port)
        config = build_config(args, Settings())
        return asyncio.run(serve(config))
    except (HydraError, NatsError, OSError, ValueError) as exc:
        logger.error("worker failed to start: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
