"""The gateway's metrics, trace span and log request id, per HTTP request (ASGI middleware).

Completion routes are counted by model and status (`hydraserve_requests_total`) and traced
(`gateway.request`); the model label is the one `note_model` recorded when the request was
queued, so a request refused before that (bad key, unknown model, invalid body) is counted
with `model=""` and no client can invent label values. TTFT, TPOT and end-to-end latency are
recorded by the broker's answer stream, which sees the chunks.
"""

from __future__ import annotations

from contextvars import ContextVar

from fastapi import FastAPI
from fastapi.responses import Response
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.logging import set_request_id
from libs.common.metrics import REQUESTS, REQUESTS_IN_FLIGHT
from libs.common.tracing import tracer

COMPLETION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

_tracer = tracer(__name__)
# the labels of the HTTP request being answered, filled in by `note_model`; a dict shared by
# reference, so a value set deeper down (in a copied context) still reaches the middleware
_labels: ContextVar[dict[str, str] | None] = ContextVar("hydraserve_gateway_labels",
                                                        default=None)


def note_model(model: str) -> None:
    """The request being answered was queued for `model` (its metrics label)."""
    labels = _labels.get()
    if labels is not None:
        labels["model"] = model


class ObservabilityMiddleware:
    """Counts, times and traces completion requests; puts the request id on log lines.

    Inside `RequestIdMiddleware`, so `state["request_id"]` is already set.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        set_request_id(scope.get("state", {}).get("request_id"))
        if scope["path"] not in COMPLETION_PATHS:
            await self.app(scope, receive, send)
            return
        labels: dict[str, str] = {}
        _labels.set(labels)
        # 500 unless a response starts: an error escaping the app
        status = [500]

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        with _tracer.start_as_current_span("gateway.request", kind=SpanKind.SERVER,
                                           attributes={"http.route": scope["path"]}) as span:
            REQUESTS_IN_FLIGHT.inc()
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                REQUESTS_IN_FLIGHT.dec()
                model = labels.get("model", "")
                REQUESTS.labels(model=model, status=str(status[0])).inc()
                span.set_attribute("http.status_code", status[0])
                span.set_attribute("hydraserve.model", model)
                if (request_id := scope.get("state", {}).get("request_id")) is not None:
                    span.set_attribute("hydraserve.request_id", request_id)


def add_metrics_route(app: FastAPI) -> None:
    """`GET /metrics`: the Prometheus exposition; open, like /health (no API key)."""

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
