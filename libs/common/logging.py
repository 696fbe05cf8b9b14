"""Logging set-up for every service: text for humans (default) or one JSON object a line.

`HYDRASERVE_LOG_FORMAT=json` switches a service to JSON lines, each with the request id
(`request_id`, set per request by the gateway and by the worker) and, while a span is
recording, its `trace_id`. `configure_logging` is called once, by each service's `__main__`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextvars import ContextVar

from opentelemetry import trace

# the request being handled in this task (gateway: per HTTP request; worker: per request)
request_id_var: ContextVar[str | None] = ContextVar("hydraserve_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMAT_ENV = "HYDRASERVE_LOG_FORMAT"


def set_request_id(request_id: str | None) -> None:
    request_id_var.set(request_id)


class RequestContextFilter(logging.Filter):
    """Puts the task's request id (and trace id) on every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = (format(span_context.trace_id, "032x") if span_context.is_valid
                           else None)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        if self._service is not None:
            line["service"] = self._service
        if (trace_id := getattr(record, "trace_id", None)) is not None:
            line["trace_id"] = trace_id
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(service: str, *, level: int = logging.INFO, log_format: str | None = None,
                      text_format: str = TEXT_FORMAT) -> None:
    """Root logging for a service: `log_format` "json" or "text" (default: the env's)."""
    chosen = (log_format or os.environ.get(LOG_FORMAT_ENV, "text")).lower()
    handler = logging.StreamHandler()
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter(service) if chosen == "json"
                         else logging.Formatter(text_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)
