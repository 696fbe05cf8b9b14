"""The error hierarchy shared by every service.

Each error has a stable `code` (its name on the bus and the OpenAI error `type`/`code`) and the
HTTP status the gateway answers with. The mapping lives here, once.
"""

from __future__ import annotations


class HydraError(Exception):
    """Base of every error HydraServe raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        # the request field the error is about, as OpenAI error objects report it
        self.param = param


class InvalidRequestError(HydraError):
    code = "invalid_request_error"
    http_status = 400


class ContextLengthError(InvalidRequestError):
    """A prompt (plus the tokens asked for) does not fit the model or the KV cache."""

    code = "context_length_exceeded"


class ModelFormatError(HydraError):
    """A model folder is malformed: missing or inconsistent files."""

    code = "model_format_error"
    http_status = 422


class UnsupportedModelError(ModelFormatError):
    """A well-formed checkpoint of an architecture or variant the engine does not run."""

    code = "unsupported_model"


class NotFoundError(HydraError):
    code = "not_found"
    http_status = 404


class ServiceUnavailableError(HydraError):
    code = "service_unavailable"
    http_status = 503
