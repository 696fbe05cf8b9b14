"""`python -m services.scheduler --nats URL --database-url URL --storage-url URL
[--policy hydraserve|single_worker|serverless_vllm] [--register-model NAME ...]
[--keep-alive S] [--ttft-slo S] [--tpot-slo S]`: the control plane.

Runs the migrations, rebuilds its view from Postgres, registers the named models (reading
their size and layers from the model store) and schedules until SIGTERM/SIGINT. Exit codes:
0 after a clean shutdown, 1 if a loop failed, 2 if it could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from nats.errors import Error as NatsError
from sqlalchemy.exc import SQLAlchemyError

from libs.common.errors import HydraError
from libs.common.logging import configure_logging
from libs.common.metrics import serve_metrics
from libs.common.settings import Settings
from libs.common.tracing import configure_tracing
from services.scheduler.policy import DEFAULT_POLICY, POLICIES, PolicyConfig, build_policy
from services.scheduler.registration import ModelRegistration
from services.scheduler.service import SchedulerConfig, SchedulerService

logger = logging.getLogger("services.scheduler")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.scheduler",
                                     description="The HydraServe control plane.")
    parser.add_argument("--nats", help="NATS URL (default: HYDRASERVE_NATS__URL)")
    parser.add_argument("--database-url", help="default: HYDRASERVE_DATABASE__URL")
    parser.add_argument("--storage-url", required=True, help="the model store's base URL")
    parser.add_argument("--policy", choices=sorted(POLICIES), default=DEFAULT_POLICY,
                        help="the cold-start policy (DESIGN.md's baselines); default: "
                             f"{DEFAULT_POLICY}")
    parser.add_argument("--degree", type=int, choices=[1, 2, 3, 4],
                        help="with --policy hydraserve: always this pipeline degree instead of "
                             "the SLO-aware choice (experiments and benchmarks)")
    parser.add_argument("--no-consolidate", dest="consolidate", action="store_false",
                        help="with --policy hydraserve: pipelines stay pipelines (an "
                             "experiment knob: the pipeline's steady state, alone)")
    parser.add_argument("--no-evict", dest="evict", action="store_false",
                        help="a cold start with no GPU memory waits for idle endpoints' "
                             "keep-alive instead of stopping them")
    parser.add_argument("--max-endpoints", type=int, default=PolicyConfig.max_endpoints_per_model,
                        help="endpoints one model may scale out to while its queued requests "
                             "outnumber its free slots (each endpoint runs "
                             "HYDRASERVE_WORKER__CAPACITY requests); 1: never scale out "
                             "(default %(default)s)")
    parser.add_argument("--register-model", action="append", default=[], metavar="NAME",
                        help="register (or update) a model imported into the store")
    parser.add_argument("--keep-alive", type=float, default=60.0,
                        help="idle seconds before a registered model scales to zero")
    parser.add_argument("--ttft-slo", type=float, default=10.0)
    parser.add_argument("--tpot-slo", type=float, default=0.2)
    parser.add_argument("--kv-cache-gb", type=float, default=0.0)
    parser.add_argument("--tick", type=float, default=1.0, help="seconds between ticks")
    parser.add_argument("--heartbeat-timeout", type=float, default=15.0)
    parser.add_argument("--consumer", default="scheduler",
                        help="durable consumer name on the events stream")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus metrics on this port (default 0: off)")
    return parser.parse_args(argv)


def build_config(args: argparse.Namespace, settings: Settings) -> SchedulerConfig:
    registrations = [
        ModelRegistration(name=name, ttft_slo_s=args.ttft_slo, tpot_slo_s=args.tpot_slo,
                          keep_alive_s=args.keep_alive,
                          kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)))
        for name in args.register_model]
    return SchedulerConfig(database_url=args.database_url or settings.database.url,
                           storage_url=args.storage_url, registrations=registrations,
                           tick_s=args.tick, consumer=args.consumer, policy_name=args.policy)


async def serve(args: argparse.Namespace, settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    nats_settings = settings.nats.model_copy(update={"url": args.nats} if args.nats else {})
    try:
        policy = build_policy(args.policy, degree=args.degree,
                              heartbeat_timeout_s=args.heartbeat_timeout,
                              max_endpoints=args.max_endpoints,
                              capacity=settings.worker.capacity,
                              consolidate=args.consolidate, evict=args.evict)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    service = SchedulerService(build_config(args, settings), nats=nats_settings,
                               bus=settings.bus, policy=policy)
    return await service.run(stop)


def main(argv: list[str] | None = None) -> int:
    configure_logging("scheduler")
    configure_tracing("scheduler")
    args = parse_args(argv)
    try:
        serve_metrics(args.metrics_port)
        return asyncio.run(serve(args, Settings()))
    except (HydraError, NatsError, OSError, ValueError, SQLAlchemyError) as exc:
        logger.error("scheduler failed: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
