"""The storage service's trace spans (ASGI middleware).

A request that carries a trace context (a node agent's fetch sends its `prefetcher.fetch`
span's `traceparent`) gets a `storage.read` span in that trace, from the request to the
response's last byte: the path, the Range asked for, the status and the bytes sent. Its
parent is the HTTP server span where the framework makes one (FastAPI's own telemetry, in
recent versions, itself a child of the fetch span), else the fetch span itself. A request
without a trace context (a health check, an import, a scrape) gets no `storage.read`.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.tracing import TRACEPARENT_HEADER, extract_context, tracer

_tracer = tracer(__name__)


class ReadSpanMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # ASGI header names are lower-case bytes
        headers = {name.decode("latin-1"): value.decode("latin-1")
                   for name, value in scope["headers"]}
        if TRACEPARENT_HEADER not in headers:
            await self.app(scope, receive, send)
            return
        attributes = {"http.method": scope["method"], "http.target": scope["path"]}
        if "range" in headers:
            attributes["hydraserve.range"] = headers["range"]
        # 500 unless a response starts: an error escaping the app
        status, num_bytes = [500], [0]

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                num_bytes[0] += len(message.get("body", b""))
            await send(message)

        is_in_server_span = trace.get_current_span().get_span_context().is_valid
        parent = None if is_in_server_span else extract_context(headers)
        # the app returns once the (streamed) body is sent: the span ends at the last byte
        with _tracer.start_as_current_span(
                "storage.read", context=parent,
                kind=SpanKind.INTERNAL if is_in_server_span else SpanKind.SERVER,
                attributes=attributes) as span:
            try:
                await self.app(scope, receive, send_counted)
            finally:
                span.set_attribute("http.status_code", status[0])
                span.set_attribute("hydraserve.num_bytes", num_bytes[0])
                if status[0] >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status[0]}"))
