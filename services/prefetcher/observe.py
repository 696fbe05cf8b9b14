"""The node agent's metrics and trace spans. No transport here.

A command's trace context (from its `traceparent` header: the scheduler's decision) is the
parent of the spans it leads to: `prefetcher.fetch` per partition fetched (current while it
runs, so the storage requests carry it) and `prefetcher.launch` per worker process started
(whose context the worker inherits through its environment).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Status, StatusCode

from libs.common.metrics import (
    CACHE_HITS,
    CACHE_MISSES,
    FETCH_BANDWIDTH,
    FETCH_BYTES,
    FETCH_DURATION,
    NODE_WORKERS,
)
from libs.common.tracing import environment_carrier, tracer

# a worker on the node: fetching (not launched yet), running, or stopping
WORKER_STATES = ("fetching", "running", "stopping")

_tracer = tracer(__name__)


@contextmanager
def fetch_span(node_id: str, *, model: str, worker_id: str, degree: int, stage: int,
               context: Context | None) -> Iterator[None]:
    """`prefetcher.fetch`, the current span while one partition is put in place."""
    with _tracer.start_as_current_span(
            "prefetcher.fetch", context=context,
            attributes={"hydraserve.node_id": node_id, "hydraserve.model": model,
                        "hydraserve.worker_id": worker_id, "hydraserve.degree": degree,
                        "hydraserve.stage": stage}):
        yield


@contextmanager
def launch_span(node_id: str, *, model: str, worker_id: str,
                context: Context | None) -> Iterator[dict[str, str]]:
    """`prefetcher.launch` around starting a worker process; yields the environment that
    makes the worker's own spans its children (TRACEPARENT)."""
    with _tracer.start_as_current_span(
            "prefetcher.launch", context=context,
            attributes={"hydraserve.node_id": node_id, "hydraserve.model": model,
                        "hydraserve.worker_id": worker_id}):
        yield environment_carrier()


def record_fetch(node_id: str, *, num_bytes: int, started_at: float,
                 bytes_per_s: float | None, is_cached: bool) -> None:
    """A partition is in place: fetched from the store, or restored from the host cache.
    Called inside `fetch_span`."""
    finished_at = time.time()
    FETCH_DURATION.labels(node=node_id, cached=str(is_cached).lower()).observe(
        max(0.0, finished_at - started_at))
    if not is_cached:
        FETCH_BYTES.labels(node=node_id).inc(num_bytes)
        if bytes_per_s is not None:
            FETCH_BANDWIDTH.labels(node=node_id).set(bytes_per_s)
    trace.get_current_span().set_attributes({"hydraserve.num_bytes": num_bytes,
                                             "hydraserve.cached": is_cached})


def record_fetch_failed(error: str) -> None:
    """The fetch in progress (inside `fetch_span`) failed with `error`."""
    trace.get_current_span().set_status(Status(StatusCode.ERROR, error))


def record_cache_lookup(node_id: str, *, is_hit: bool) -> None:
    (CACHE_HITS if is_hit else CACHE_MISSES).labels(node=node_id).inc()


def record_workers(node_id: str, states: Iterable[str]) -> None:
    counts = dict.fromkeys(WORKER_STATES, 0)
    for state in states:
        counts[state] += 1
    for state, count in counts.items():
        NODE_WORKERS.labels(node=node_id, state=state).set(count)
