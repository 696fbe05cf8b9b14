"""Errors -> OpenAI error objects, in one place.

Every error the gateway answers with has the OpenAI shape
`{"error": {"message", "type", "param", "code"}}`: `type` is "invalid_request_error" for 4xx
and "server_error" for 5xx (as OpenAI does, 401 and 404 included), `code` is the HydraError's
code ("context_length_exceeded", "model_not_found", "invalid_api_key", ...). A rate limit
is a 429 with OpenAI's `type` ("requests" or "tokens"), code "rate_limit_exceeded" and a
`Retry-After` header.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from libs.common.errors import HydraError, InvalidRequestError
from services.gateway.ratelimit import RateLimitError

logger = logging.getLogger(__name__)


def to_openai(error: HydraError) -> dict[str, Any]:
    """The OpenAI error object for `error` (also what a failed stream's last event holds)."""
    error_type = "server_error" if error.http_status >= 500 else "invalid_request_error"
    if isinstance(error, RateLimitError):
        error_type = error.limit_type
    return {"error": {
        "message": error.message,
        "type": error_type,
        "param": error.param,
        # the plain 400 has no code of its own in OpenAI's answers
        "code": None if error.code == error_type else error.code,
    }}


def error_response(error: HydraError, *, retry_after_s: int) -> JSONResponse:
    headers = {}
    if error.http_status == 503:
        headers["Retry-After"] = str(retry_after_s)
    if isinstance(error, RateLimitError):
        headers["Retry-After"] = str(error.retry_after_s)
    if error.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(to_openai(error), status_code=error.http_status, headers=headers)


def from_validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """A 400 that names the first offending field (FastAPI's default is a 422 list)."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return InvalidRequestError(
            "We could not parse the JSON body of your request: "
            f"{first.get('ctx', {}).get('error', 'invalid JSON')}")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request"))
    # pydantic prefixes the text of a ValueError raised in a validator
    message = message.removeprefix("Value error, ")
    if param and first.get("type") == "missing":
        message = f"'{param}' is a required property"
    elif param:
        message = f"{message} (at '{param}')"
    return InvalidRequestError(message, param=param)


def is_data_exception(exc: Exception) -> bool:
    """PostgreSQL's class 22 "data exception" (NUL in text, integer out of range): the
    request's values, not the server, are at fault: a 400, not a 500."""
    from sqlalchemy.exc import DBAPIError

    return isinstance(exc, DBAPIError) and str(
        getattr(exc.orig, "sqlstate", None) or "").startswith("22")


def install_error_handlers(app: FastAPI, *, retry_after_s: int) -> None:
    """Route every error the app can raise through `to_openai`."""

    async def hydra_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HydraError)
        return error_response(exc, retry_after_s=retry_after_s)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(from_validation_error(exc), retry_after_s=retry_after_s)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        error = HydraError(str(exc.detail))
        error.code, error.http_status = "http_error", exc.status_code
        return error_response(error, retry_after_s=retry_after_s)

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        if is_data_exception(exc):
            return error_response(InvalidRequestError(
                "The request holds a value the database cannot take (a NUL character, or a "
                "number out of range)."), retry_after_s=retry_after_s)
        logger.exception("unhandled error on %s %s", request.method, request.url.path,
                         exc_info=exc)
        return error_response(HydraError("The server had an error processing your request."),
                              retry_after_s=retry_after_s)

    app.add_exception_handler(HydraError, hydra_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
