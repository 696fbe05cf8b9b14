"""OpenTelemetry tracing, optional: without an SDK configured every call here is a no-op.

One request's trace, across every service it touches:

- gateway: `gateway.request` (the HTTP request). Its context rides in the `traceparent`
  header of the request's NATS message and in the `request.received` event's data.
- scheduler: `scheduler.decide`, a child of the gateway span, for the decision the arrival
  triggered. The commands that decision publishes (`PlaceWorkerCommand`,
  `ConsolidateCommand`, ...) carry the decide span's context in their `traceparent` header.
- node agent: `prefetcher.fetch` (a partition into shared memory, from the store or the host
  cache) and `prefetcher.launch` (starting the worker process), children of the decide span.
  Its HTTP requests to the store carry the fetch span's `traceparent`; the launched worker
  gets the launch span's context in its `TRACEPARENT` environment variable.
- storage: `storage.read` per request that carried a `traceparent`, ending when the last byte
  of the response is sent: a child of the fetch span (through FastAPI's own server span, in
  FastAPI versions that trace requests themselves).
- worker: `worker.startup` (process start -> ready, with `imports` and `load` children), a
  child of the launch span; `worker.request` (a child of the gateway span, from the request
  message's header) with `queue_wait`, `prefill` and `decode` children.

`configure_tracing` (called by each service's `__main__`) installs the SDK only when the
environment asks for an exporter (the standard OTEL_* settings, or HYDRASERVE_TRACE_FILE for
one JSON span per line in a file); otherwise the API's no-op tracer stays and a span costs a
function call.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.context import Context

if TYPE_CHECKING:  # the SDK is imported only when tracing is configured
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter

logger = logging.getLogger(__name__)

TRACEPARENT_HEADER = "traceparent"
# a file to append every span to, one JSON object a line (tests, debugging)
TRACE_FILE_ENV = "HYDRASERVE_TRACE_FILE"


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


def environment_carrier(context: Context | None = None) -> dict[str, str]:
    """The current (or `context`'s) trace context as a child process's environment
    (TRACEPARENT, ...: the header names upper-cased); empty without a span."""
    return {key.upper(): value for key, value in inject_headers(context=context).items()}


def context_from_environment(environ: Mapping[str, str]) -> Context:
    """The trace context a parent process passed in `environment_carrier`'s variables."""
    fields = propagate.get_global_textmap().fields
    return extract_context({field: environ[field.upper()] for field in fields
                            if field.upper() in environ})


def configure_tracing(service_name: str) -> bool:
    """Install the SDK with an exporter if the environment asks for one; True if it did.

    OTEL_TRACES_EXPORTER=console prints spans; OTEL_EXPORTER_OTLP_ENDPOINT (or
    OTEL_TRACES_EXPORTER=otlp) sends them over OTLP, which needs the
    opentelemetry-exporter-otlp package. HYDRASERVE_TRACE_FILE=PATH appends each span to
    PATH as one JSON line as it ends (processes may share the file: a span is one write).
    Nothing set: tracing stays a no-op.
    """
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "")
    trace_file = os.environ.get(TRACE_FILE_ENV, "")
    wants_exporter = exporter_name != "none" and bool(
        exporter_name or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if not wants_exporter and not trace_file:
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )
    except ImportError:
        logger.warning("OTEL_* tracing settings ignored: opentelemetry-sdk is not installed")
        return False
    processors: list[SpanProcessor] = []
    # what the spans go to, for the log line
    sinks: list[str] = []
    if trace_file:
        # a buffer larger than any span, flushed after each: one append per span
        out = open(trace_file, "a", buffering=1 << 20, encoding="utf-8")
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter(out=out,
                                                                  formatter=_json_line)))
        sinks.append(trace_file)
    if wants_exporter:
        exporter = _exporter(exporter_name)
        if exporter is not None:
            processors.append(BatchSpanProcessor(exporter))
            sinks.append(exporter_name or "otlp")
    if not processors:
        return False
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME",
                                                             f"hydraserve-{service_name}")})
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    logger.info("tracing on: spans to %s", ", ".join(sinks))
    return True


def _exporter(name: str) -> SpanExporter | None:
    """The SpanExporter OTEL_TRACES_EXPORTER names (OTLP unless `console`); None if missing."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        logger.warning("OTLP tracing asked for, but opentelemetry-exporter-otlp is not "
                       "installed; no OTLP export")
        return None
    return OTLPSpanExporter()


def _json_line(span: ReadableSpan) -> str:
    return span.to_json(indent=None) + "\n"


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
