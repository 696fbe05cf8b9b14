"""The node agent's metrics and fetch spans. No transport here."""

from __future__ import annotations

import time
from collections.abc import Iterable

from libs.common.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    FETCH_BANDWIDTH,
    FETCH_BYTES,
    FETCH_DURATION,
    NODE_WORKERS,
)
from libs.common.tracing import record_span, tracer

# a worker on the node: fetching (not launched yet), running, or stopping
WORKER_STATES = ("fetching", "running", "stopping")

_tracer = tracer(__name__)


def record_fetch(node_id: str, *, model: str, worker_id: str, num_bytes: int,
                 started_at: float, bytes_per_s: float | None, is_cached: bool) -> None:
    """A partition is in place: fetched from the store, or restored from the host cache."""
    finished_at = time.time()
    FETCH_DURATION.labels(node=node_id, cached=str(is_cached).lower()).observe(
        max(0.0, finished_at - started_at))
    if not is_cached:
        FETCH_BYTES.labels(node=node_id).inc(num_bytes)
        if bytes_per_s is not None:
            FETCH_BANDWIDTH.labels(node=node_id).set(bytes_per_s)
    record_span(_tracer, "prefetcher.fetch", start=started_at, end=finished_at,
                attributes={"hydraserve.node_id": node_id, "hydraserve.model": model,
                            "hydraserve.worker_id": worker_id,
                            "hydraserve.num_bytes": num_bytes, "hydraserve.cached": is_cached})


def record_cache_lookup(node_id: str, *, is_hit: bool) -> None:
    (CACHE_HITS if is_hit else CACHE_MISSES).labels(node=node_id).inc()


def record_workers(node_id: str, states: Iterable[str]) -> None:
    counts = dict.fromkeys(WORKER_STATES, 0)
    for state in states:
        counts[state] += 1
    for state, count in counts.items():
        NODE_WORKERS.labels(node=node_id, state=state).set(count)
