"""The worker's metrics and trace spans, recorded after the fact from a request's timings.

A finished request adds its `worker.request` span (from the gateway's acceptance to the last
chunk; a child of the gateway's span when the message carried a `traceparent`) with
`queue_wait`, `prefill` and `decode` children, counts itself and its tokens. A ready worker
adds its `worker.startup` span (process start -> ready, with `imports` and `load` children), a
child of the current context: the node agent's launch span, when it set TRACEPARENT (see
`__main__`). No transport here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context

from libs.common.messages import TokenChunk
from libs.common.metrics import GENERATED_TOKENS, STARTUP_PHASE, WORKER_REQUESTS
from libs.common.tracing import record_span, tracer
from services.worker.protocol import RequestProgress

_tracer = tracer(__name__)


def record_request(progress: RequestProgress, last: TokenChunk, *,
                   context: Context | None) -> None:
    """Count a finished request (and its tokens) and record its spans."""
    model = progress.request.model
    WORKER_REQUESTS.labels(model=model, finish_reason=last.finish_reason or "unknown").inc()
    if last.usage is not None:
        GENERATED_TOKENS.labels(model=model).inc(last.usage.completion_tokens)
    created = progress.request.created
    finished = progress.finished_at or time.time()
    span = _tracer.start_span("worker.request", context=context, start_time=_ns(created),
                              attributes={"hydraserve.request_id": progress.request_id,
                                          "hydraserve.model": model,
                                          "hydraserve.worker_id": progress.worker_id,
                                          "hydraserve.attempt": progress.attempt,
                                          "hydraserve.finish_reason": last.finish_reason or ""})
    inner = trace.set_span_in_context(span)
    record_span(_tracer, "queue_wait", start=created, end=progress.pulled_at, context=inner)
    if progress.first_token_at is not None:
        record_span(_tracer, "prefill", start=progress.pulled_at,
                    end=progress.first_token_at, context=inner)
        record_span(_tracer, "decode", start=progress.first_token_at, end=finished,
                    context=inner)
    span.end(end_time=_ns(max(created, finished)))


def record_startup(phases: Mapping[str, float], *, load_s: float) -> None:
    """Cold-start phases: imports, load, and total (process start -> ready); and their span."""
    started = phases.get("process_started_at")
    imports_done = phases.get("imports_done_at")
    ready = phases.get("ready_at")
    if started is not None and imports_done is not None:
        STARTUP_PHASE.labels(phase="imports").observe(max(0.0, imports_done - started))
    STARTUP_PHASE.labels(phase="load").observe(load_s)
    if started is None or ready is None:
        return
    STARTUP_PHASE.labels(phase="total").observe(max(0.0, ready - started))
    span = _tracer.start_span("worker.startup", start_time=_ns(started))
    inner = trace.set_span_in_context(span)
    if imports_done is not None:
        record_span(_tracer, "imports", start=started, end=imports_done, context=inner)
    load_started, loaded = phases.get("load_started_at"), phases.get("loaded_at")
    if load_started is not None and loaded is not None:
        record_span(_tracer, "load", start=load_started, end=loaded, context=inner)
    span.end(end_time=_ns(max(started, ready)))


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
