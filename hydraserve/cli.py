"""The `hydraserve` command. Each subcommand imports what it needs when it runs, so a command
that only touches the engine never imports the web or database stacks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from hydraserve.control_args import add_events_parser, add_models_parser
from hydraserve.workload.cli import add_workload_parser

Handler = Callable[[argparse.Namespace], int]


def _generate(args: argparse.Namespace) -> int:
    from hydraserve.generate import run_generate

    return run_generate(args)


def _demo_model(args: argparse.Namespace) -> int:
    from services.worker.demo_model import main as demo_main

    return demo_main([str(args.out_dir), "--size", args.size, "--seed", str(args.seed)])


def _events(args: argparse.Namespace) -> int:
    from hydraserve.events import run_events

    return run_events(args)


def _models(args: argparse.Namespace) -> int:
    from hydraserve.models_cli import run_models

    return run_models(args)


def _workload(args: argparse.Namespace) -> int:
    from hydraserve.workload.cli import run_workload

    return run_workload(args)


def _db_upgrade(args: argparse.Namespace) -> int:
    from libs.common.db.migrate import upgrade
    from libs.common.settings import Settings

    upgrade(args.database_url or Settings().database.url)
    print("database schema is up to date")
    return 0


# `hydraserve <service> ...` runs one service: the module's own command line
SERVICES: dict[str, str] = {
    "gateway": "services.gateway",
    "scheduler": "services.scheduler",
    "node-agent": "services.prefetcher",
    "storage": "services.storage",
    "worker": "services.worker",
    # not a service: the cluster simulator, with the same pass-through of its arguments
    "simulate": "hydraserve.sim",
}


def _run_service(name: str, service_args: list[str]) -> int:
    import runpy

    sys.argv = [f"hydraserve {name}", *service_args]
    runpy.run_module(SERVICES[name], run_name="__main__", alter_sys=True)
    return 0


def _up(args: argparse.Namespace) -> int:
    from hydraserve.up import run_up

    return run_up(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hydraserve", description="HydraServe: serverless LLM serving with fast cold starts."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for name, module in SERVICES.items():
        service = commands.add_parser(
            name, add_help=False,
            help=("simulate a workload on a cluster with the scheduler's policies "
                  "(python -m hydraserve.sim)") if name == "simulate"
            else f"run the {name} service alone (python -m {module})",
            description=f"Run {module}; every argument goes to it (try --help).")
        # listed for --help; main() hands the arguments to the module before argparse
        service.add_argument("service_args", nargs=argparse.REMAINDER)

    up = commands.add_parser(
        "up", help="run the whole system on this machine",
        description="Start NATS and PostgreSQL (embedded, unless HYDRASERVE_NATS__URL / "
                    "HYDRASERVE_DATABASE__URL name servers), storage, the gateway, the "
                    "scheduler and emulated GPU nodes; register the demo model. Ctrl-C stops "
                    "everything.",
    )
    up.add_argument("--state-dir", type=Path, default=Path(".hydraserve"),
                    help="where data, logs and the admin key live (default: .hydraserve)")
    up.add_argument("--nodes", type=int, default=4, help="emulated GPU nodes (default: 4)")
    up.add_argument("--gpu-memory-gb", type=float, default=16.0, help="per node (default: 16)")
    up.add_argument("--nic-gbps", type=float, default=16.0,
                    help="per-node NIC bandwidth cap in Gbit/s (default: 16)")
    up.add_argument("--worker-threads", type=int,
                    help="CPU threads per worker (default: the machine's cores / --nodes, at "
                         "least 1, so the emulated nodes do not oversubscribe the CPU)")
    up.add_argument("--policy", choices=["hydraserve", "single_worker", "serverless_vllm"],
                    default="hydraserve", help="the scheduler's cold-start policy "
                                               "(default: hydraserve)")
    up.add_argument("--max-endpoints", type=int, default=4,
                    help="endpoints a busy model may scale out to (the scheduler's "
                         "--max-endpoints; 1: never scale out; default: 4)")
    up.add_argument("--launcher", choices=["local", "forkserver"], default="local",
                    help="how node agents start workers: spawned, or forked from a process "
                         "with their imports (torch) done, which takes the import out of "
                         "every cold start (default: local)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000, help="the API's port (default: 8000)")
    up.add_argument("--keep-alive", type=float, default=60.0,
                    help="idle seconds before the demo model scales to zero (default: 60)")
    up.add_argument("--no-demo", dest="demo", action="store_false",
                    help="do not register the demo model")
    up.set_defaults(handler=_up)

    gen = commands.add_parser(
        "generate", help="generate text from a model folder, streaming to the terminal",
        description="Load an HF model folder with HydraServe's engine and stream a completion.",
    )
    gen.add_argument("model_dir", type=Path, help="HF model folder (config.json, safetensors)")
    gen.add_argument("prompt", nargs="+", help="the prompt (several prompts run as one batch)")
    gen.add_argument("--chat", action="store_true",
                     help="send each prompt as a user message through the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stages", default=None,
                     help="run as a chain of stages split at these layers, e.g. 0,2,4")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16",
                                                         "bfloat16"])
    gen.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    gen.set_defaults(handler=_generate)

    demo = commands.add_parser(
        "demo-model", help="write a small random-weight Llama-family model folder",
        description="Write an HF-format Llama folder with random weights, a BPE tokenizer "
                    "trained on bundled text and a chat template (no download needed).",
    )
    demo.add_argument("out_dir", type=Path)
    demo.add_argument("--size", default="tiny", choices=["tiny", "small", "100m"])
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=_demo_model)

    db = commands.add_parser("db", help="database schema",
                             description="Manage HydraServe's PostgreSQL schema.")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    db_upgrade = db_commands.add_parser("upgrade", help="migrate to the latest schema")
    db_upgrade.add_argument("--database-url", default=None,
                            help="default: HYDRASERVE_DATABASE__URL from the settings")
    db_upgrade.set_defaults(handler=_db_upgrade)

    add_events_parser(commands).set_defaults(handler=_events)
    add_models_parser(commands).set_defaults(handler=_models)
    add_workload_parser(commands).set_defaults(handler=_workload)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SERVICES:
        return _run_service(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
