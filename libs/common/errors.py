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


class ConflictError(HydraError):
    """The request clashes with existing state (a model name already taken)."""

    code = "conflict"
    http_status = 409


class RangeNotSatisfiableError(HydraError):
    """A byte range that starts past the end of the file or partition asked for."""

    code = "range_not_satisfiable"
    http_status = 416


class FetchFailedError(HydraError):
    """A node agent could not pull a partition or file from storage."""

    code = "fetch_failed"
    http_status = 502


class AuthenticationError(HydraError):
    """A request without an API key, or with one that is not valid."""

    code = "invalid_api_key"
    http_status = 401


class ModelNotFoundError(NotFoundError):
    """A request names a model that is not served."""

    code = "model_not_found"
