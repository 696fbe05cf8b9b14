"""The engine's errors: the shared hierarchy, re-exported so engine code imports one place."""

from libs.common.errors import (
    ContextLengthError,
    HydraError,
    InvalidRequestError,
    ModelFormatError,
    UnsupportedModelError,
)

__all__ = [
    "ContextLengthError",
    "HydraError",
    "InvalidRequestError",
    "ModelFormatError",
    "UnsupportedModelError",
]
