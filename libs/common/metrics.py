"""Every Prometheus metric of HydraServe, defined once (names prefixed `hydraserve_`).

Each process registers all of them in prometheus_client's default registry, and exposes the
ones it records: the gateway at `GET /metrics`, the other services on `--metrics-port`
(`serve_metrics`). A metric a process never touches shows only its HELP/TYPE lines (or, with
labels, nothing). docs/grafana/hydraserve-dashboard.json plots them; docs/OBSERVABILITY.md
lists them.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)

# seconds: sub-millisecond steps up to multi-minute cold starts
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0)
_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# --- gateway ---------------------------------------------------------------------------------
REQUESTS = Counter("hydraserve_requests_total",
                   "Completion requests answered by the gateway, by model and HTTP status",
                   ["model", "status"])
REQUESTS_IN_FLIGHT = Gauge("hydraserve_requests_in_flight",
                           "Completion requests the gateway is answering now")
TTFT = Histogram("hydraserve_ttft_seconds",
                 "Time to first token, from the gateway's acceptance of the request",
                 ["model"], buckets=_LATENCY_BUCKETS)
TPOT = Histogram("hydraserve_tpot_seconds",
                 "Time per output token after the first, per request", ["model"],
                 buckets=_STEP_BUCKETS)
E2E_LATENCY = Histogram("hydraserve_e2e_latency_seconds",
                        "Time from the gateway's acceptance to the last chunk", ["model"],
                        buckets=_LATENCY_BUCKETS)

# --- scheduler -------------------------------------------------------------------------------
QUEUED_REQUESTS = Gauge("hydraserve_scheduler_queued_requests",
                        "Requests of a model that no worker has taken yet", ["model"])
COLD_STARTS = Counter("hydraserve_cold_starts_total",
                      "Endpoints started from zero (not scale-outs), by policy and pipeline degree",
                      ["policy", "degree"])
SCALE_OUTS = Counter("hydraserve_scale_outs_total",
                     "Extra endpoints started for a busy model that had one, by policy and "
                     "pipeline degree", ["policy", "degree"])
PLACEMENTS = Counter("hydraserve_placements_total",
                     "Workers placed (PlaceWorker commands sent), by node", ["node"])
ENDPOINTS = Gauge("hydraserve_endpoints", "Endpoints by state", ["state"])
WORKERS = Gauge("hydraserve_workers", "Workers by state (the scheduler's view)", ["state"])
GPU_MEMORY_ALLOCATED = Gauge("hydraserve_gpu_memory_allocated_bytes",
                             "GPU memory the node's workers hold", ["node"])
GPU_MEMORY_TOTAL = Gauge("hydraserve_gpu_memory_total_bytes", "GPU memory of the node",
                         ["node"])

# --- node agent ------------------------------------------------------------------------------
FETCH_BYTES = Counter("hydraserve_fetch_bytes_total",
                      "Partition bytes fetched from the model store (cache hits excluded)",
                      ["node"])
FETCH_BANDWIDTH = Gauge("hydraserve_fetch_bandwidth_bytes_per_second",
                        "Bandwidth of the node's last completed fetch", ["node"])
FETCH_DURATION = Histogram("hydraserve_fetch_duration_seconds",
                           "Time to have a partition in place, by node and cache hit",
                           ["node", "cached"], buckets=_LATENCY_BUCKETS)
NODE_WORKERS = Gauge("hydraserve_node_workers", "Workers on the node by state",
                     ["node", "state"])
CACHE_HITS = Counter("hydraserve_cache_hits_total", "Host-memory cache hits", ["node"])
CACHE_MISSES = Counter("hydraserve_cache_misses_total", "Host-memory cache misses", ["node"])

# --- worker ----------------------------------------------------------------------------------
WORKER_REQUESTS = Counter("hydraserve_worker_requests_total",
                          "Requests a worker finished, by model and finish reason",
                          ["model", "finish_reason"])
GENERATED_TOKENS = Counter("hydraserve_generated_tokens_total",
                           "Completion tokens a worker generated", ["model"])
STEP_DURATION = Histogram("hydraserve_engine_step_duration_seconds",
                          "Duration of one engine step (prefill or decode batch)",
                          buckets=_STEP_BUCKETS)
STARTUP_PHASE = Histogram("hydraserve_worker_startup_phase_seconds",
                          "Cold-start phases of a worker: imports (process start -> imports "
                          "done), load (engine built and weights in), total (process start "
                          "-> ready)", ["phase"], buckets=_LATENCY_BUCKETS)

METRIC_NAMES = frozenset({
    "hydraserve_requests_total", "hydraserve_requests_in_flight", "hydraserve_ttft_seconds",
    "hydraserve_tpot_seconds", "hydraserve_e2e_latency_seconds",
    "hydraserve_scheduler_queued_requests", "hydraserve_cold_starts_total",
    "hydraserve_scale_outs_total",
    "hydraserve_placements_total", "hydraserve_endpoints", "hydraserve_workers",
    "hydraserve_gpu_memory_allocated_bytes", "hydraserve_gpu_memory_total_bytes",
    "hydraserve_fetch_bytes_total", "hydraserve_fetch_bandwidth_bytes_per_second",
    "hydraserve_fetch_duration_seconds", "hydraserve_node_workers",
    "hydraserve_cache_hits_total", "hydraserve_cache_misses_total",
    "hydraserve_worker_requests_total", "hydraserve_generated_tokens_total",
    "hydraserve_engine_step_duration_seconds", "hydraserve_worker_startup_phase_seconds",
})


def exposed_names(name: str) -> set[str]:
    """The series names Prometheus scrapes for metric `name` (histograms: _bucket, ...)."""
    base = name.removesuffix("_total")
    return {name, f"{base}_bucket", f"{base}_sum", f"{base}_count", f"{base}_created"}


def serve_metrics(port: int | None) -> None:
    """Expose the default registry on `port` (a daemon thread); None or 0: not at all."""
    if not port:
        return
    start_http_server(port)
    logger.info("metrics on http://0.0.0.0:%d/metrics", port)
