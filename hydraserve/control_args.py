"""The arguments of `hydraserve events` and `hydraserve models`.

Argparse only: building the CLI's parser must not import NATS, httpx or the settings, so
that `hydraserve generate` stays lean; the commands import those when they run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DEFAULT_API = "http://127.0.0.1:8000"

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


def add_events_parser(commands: SubParsers) -> argparse.ArgumentParser:
    events: argparse.ArgumentParser = commands.add_parser(
        "events", help="tail, filter and replay HydraServe events",
        description="Read the HS_EVENTS stream with an ephemeral ordered consumer.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--nats", default=None,
                        help="NATS URL (default: HYDRASERVE_NATS__URL from the settings)")
    sub = events.add_subparsers(dest="events_command", required=True, metavar="SUBCOMMAND")
    for name, help_text in (("tail", "follow new events, one line each"),
                            ("show", "print the stored events and exit")):
        command = sub.add_parser(name, help=help_text, parents=[common])
        command.add_argument("--model")
        command.add_argument("--kind", help="<entity>.<verb>, e.g. worker.ready")
        command.add_argument("--request", help="request id")
        command.add_argument("--endpoint", help="endpoint id")
        command.add_argument("--since", help="start this long ago: 30s, 10m, 2h, 1d")
        if name == "tail":
            command.add_argument("--count", type=int, default=None,
                                 help="exit after printing this many events")
    line = sub.add_parser("timeline", help="the phases of one request's cold start",
                          parents=[common])
    line.add_argument("request_id")
    line.add_argument("--since", help="read only events this recent (faster on a long stream)")
    line.add_argument("--png", type=Path, default=None, metavar="PATH",
                      help="also draw the cold start's stages as a Gantt chart into PATH")
    replay = sub.add_parser(
        "replay", parents=[common],
        help="feed the stored events to the scheduler's policy; check its decisions match",
        description="Replay the stored events (from a scheduler's start on a fresh database) "
                    "through the policy; exit 1 at the first decision that differs.")
    replay.add_argument("--policy", default="hydraserve",
                        choices=["hydraserve", "serverless_vllm", "single_worker"],
                        help="the scheduler's --policy (default: %(default)s)")
    replay.add_argument("--degree", type=int, choices=[1, 2, 3, 4],
                        help="the scheduler's --degree (with --policy hydraserve)")
    replay.add_argument("--tick", type=float, default=1.0,
                        help="the scheduler's tick period in seconds (default: %(default)s)")
    replay.add_argument("--heartbeat-timeout", type=float, default=15.0,
                        help="the scheduler's --heartbeat-timeout (default: %(default)s)")
    replay.add_argument("--max-endpoints", type=int, default=4,
                        help="the scheduler's --max-endpoints (default: %(default)s)")
    replay.add_argument("--capacity", type=int, default=8,
                        help="the workers' HYDRASERVE_WORKER__CAPACITY (default: %(default)s)")
    replay.add_argument("--since", help="start this long ago: 30s, 10m, 2h, 1d")
    replay.add_argument("--model", help="compare only the decisions about this model")
    return events


def add_models_parser(commands: SubParsers) -> argparse.ArgumentParser:
    models: argparse.ArgumentParser = commands.add_parser(
        "models", help="register and manage models (admin API)",
        description="Call the gateway's admin API (/admin/models) with the admin key.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=os.environ.get("HYDRASERVE_API_URL", DEFAULT_API),
                        help="gateway URL (default: HYDRASERVE_API_URL or %(default)s)")
    common.add_argument("--admin-key", default=os.environ.get("HYDRASERVE_ADMIN_KEY")
                        or os.environ.get("HYDRASERVE_GATEWAY__ADMIN_KEY"),
                        help="admin key (default: HYDRASERVE_ADMIN_KEY)")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    sub.add_parser("list", help="list the registered models", parents=[common])
    register = sub.add_parser("register", help="import an HF folder and register it",
                              parents=[common])
    register.add_argument("name")
    register.add_argument("path", help="HF model folder, as the storage service sees it")
    register.add_argument("--ttft-slo-ms", type=int, required=True)
    register.add_argument("--tpot-slo-ms", type=int, required=True)
    register.add_argument("--max-pipeline-degree", type=int, default=4, choices=[1, 2, 3, 4])
    register.add_argument("--keep-alive-s", type=float, default=60.0)
    register.add_argument("--kv-cache-gb", type=float, default=0.0,
                          help="KV-cache memory a whole-model worker reserves next to the "
                               "weights (default: %(default)s)")
    register.add_argument("--owner-tenant", metavar="TENANT",
                          help="make the model private to this (existing) tenant: only its "
                               "keys see and use it (default: public)")
    for name, help_text in (("describe", "show one model and its partitions"),
                            ("delete", "delete a model")):
        sub.add_parser(name, help=help_text, parents=[common]).add_argument("name")
    return models
