"""`python -m services.storage --root DIR --port N [--egress-mbps X]`: the storage service."""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn

from libs.common.logging import configure_logging
from libs.common.metrics import serve_metrics
from libs.common.tracing import configure_tracing
from services.storage.app import create_app
from services.storage.settings import StorageSettings
from services.storage.store import ModelStore
from services.storage.throttle import TokenBucket


def parse_args(argv: list[str] | None = None) -> StorageSettings:
    defaults = StorageSettings()
    parser = argparse.ArgumentParser(prog="python -m services.storage",
                                     description="HydraServe model store")
    parser.add_argument("--root", type=Path, default=defaults.root,
                        required=defaults.root is None, help="store folder")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--egress-mbps", type=float, default=defaults.egress_mbps,
                        help="cap on all data responses together, in megabits per second")
    parser.add_argument("--metrics-port", type=int, default=defaults.metrics_port,
                        help="serve Prometheus metrics on this port (default 0: off)")
    args = parser.parse_args(argv)
    return StorageSettings(root=args.root, host=args.host, port=args.port,
                           egress_mbps=args.egress_mbps, metrics_port=args.metrics_port)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    assert settings.root is not None, "argparse requires --root when HS_STORAGE_ROOT is unset"
    configure_logging("storage", text_format="%(asctime)s %(name)s %(message)s")
    configure_tracing("storage")
    serve_metrics(settings.metrics_port)
    rate = settings.egress_bytes_per_s
    egress = TokenBucket(rate) if rate is not None else None
    app = create_app(ModelStore(settings.root), egress=egress)
    # no access log: one fetch is hundreds of range requests
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False)


if __name__ == "__main__":
    main()
