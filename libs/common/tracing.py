"""OpenTelemetry tracing, optional: without an SDK configured every call here is a no-op.

A request's trace: the gateway's `gateway.request` span -> its context rides in the
`traceparent` header of the request's NATS message (and in the `request.received` event's
data) -> the worker's `worker.request` span with `queue_wait`, `prefill` and `decode`
children, and the scheduler's `scheduler.decide` span for the decision the arrival triggers.
The node agent traces its fetches (`prefetcher.fetch`).

`configure_tracing` (called by each service's `__main__`) installs the SDK only when the
standard OTEL_* environment asks for an exporter; otherwise the API's no-op tracer stays and
a span costs a function call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

logger = logging.getLogger(__name__)

TRACEPARENT_HEADER = "traceparent"


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None, *,
                   context: Context | None = None) -> dict[str, str]:
    """`headers` plus the current (or `context`'s) trace context; unchanged without a span."""
    carrier: dict[str, str] = dict(headers or {})
    propagate.inject(carrier, context=context)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> Context:
    """The trace context a message's headers carry (an empty context if none)."""
    return propagate.extract(dict(headers or {}))


def traceparent() -> str | None:
    """The current span's `traceparent`, to carry in an event's data; None without a span."""
    return inject_headers().get(TRACEPARENT_HEADER)


def record_span(tracer_: trace.Tracer, name: str, *, start: float, end: float,
                context: Context | None = None, attributes: Mapping[str, Any] | None = None
                ) -> trace.Span:
    """A finished span over [start, end] (unix seconds), after the fact."""
    span = tracer_.start_span(name, context=context, start_time=_ns(start),
                              attributes=dict(attributes or {}))
    span.end(end_time=_ns(max(start, end)))
    return span


def configure_tracing(service_name: str) -> bool:
    """Install the SDK with an exporter if the environment asks for one; True if it did.

    OTEL_TRACES_EXPORTER=console prints spans; OTEL_EXPORTER_OTLP_ENDPOINT (or
    OTEL_TRACES_EXPORTER=otlp) sends them over OTLP, which needs the
    opentelemetry-exporter-otlp package. Nothing set: tracing stays a no-op.
    """
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    if exporter_name in ("", "none") and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return False
    if exporter_name == "none":
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        logger.warning("OTEL_* tracing settings ignored: opentelemetry-sdk is not installed")
        return False
    exporter: Any
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            logger.warning("OTLP tracing asked for, but opentelemetry-exporter-otlp is not "
                           "installed; tracing stays off")
            return False
        exporter = OTLPSpanExporter()
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME",
                                                             f"hydraserve-{service_name}")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    logger.info("tracing on: %s exporter", exporter_name or "otlp")
    return True


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
