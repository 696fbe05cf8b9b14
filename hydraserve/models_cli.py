"""`hydraserve models list|register|describe|delete`: the gateway's admin API over HTTP."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import httpx

_TIMEOUT_S = 600.0


class AdminApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    if not args.admin_key:
        raise AdminApiError(0, "no admin key: pass --admin-key or set HYDRASERVE_ADMIN_KEY")
    response = httpx.request(method, f"{args.api.rstrip('/')}/admin{path}", json=body,
                             timeout=_TIMEOUT_S,
                             headers={"Authorization": f"Bearer {args.admin_key}"})
    if response.is_success:
        return response.json() if response.content else None
    try:
        error = response.json()["error"]
        message = f"{error['message']} ({error.get('code') or error.get('type')})"
    except (ValueError, KeyError, TypeError):
        message = response.text[:300]
    raise AdminApiError(response.status_code, message)


def run_models(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        if args.models_command == "list":
            models = _call(args, "GET", "/models")["data"]
            print(f"{'NAME':<40} {'ARCHITECTURE':<22} {'LAYERS':>6} {'SIZE_MB':>9} "
                  f"{'TTFT_MS':>8} {'MAX_P':>5}", file=out)
            for m in models:
                print(f"{m['name']:<40} {m['architecture']:<22} {m['num_layers']:>6} "
                      f"{m['size_bytes'] / 1e6:>9.1f} {m['ttft_slo_ms']:>8} "
                      f"{m['max_pipeline_degree']:>5}", file=out)
        elif args.models_command == "register":
            body = {"name": args.name, "path": args.path, "ttft_slo_ms": args.ttft_slo_ms,
                    "tpot_slo_ms": args.tpot_slo_ms, "keep_alive_s": args.keep_alive_s,
                    "max_pipeline_degree": args.max_pipeline_degree,
                    "kv_cache_bytes": int(args.kv_cache_gb * (1 << 30)),
                    "owner_tenant": args.owner_tenant}
            print(json.dumps(_call(args, "POST", "/models", body), indent=2), file=out)
        elif args.models_command == "describe":
            print(json.dumps(_call(args, "GET", f"/models/{args.name}"), indent=2), file=out)
        else:
            _call(args, "DELETE", f"/models/{args.name}")
            print(f"deleted {args.name}", file=out)
    except AdminApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the admin API at {args.api}: {exc}", file=sys.stderr)
        return 1
    return 0
