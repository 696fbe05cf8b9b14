"""API keys: `Authorization: Bearer <key>`.

For now the accepted keys are the admin key and the keys given in the settings; keys stored
(hashed) in the database come with the control plane. A key is never logged or put on the
bus: requests carry the key's id, a short hash.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pydantic import SecretStr

from libs.common.errors import AuthenticationError


@dataclass(frozen=True)
class Identity:
    """Who sent a request."""

    # "admin" or the first 16 hex digits of the key's SHA-256
    key_id: str
    is_admin: bool = False


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeyAuth:
    def __init__(self, *, admin_key: SecretStr | None, api_keys: list[SecretStr]) -> None:
        self._admin_key = admin_key.get_secret_value() if admin_key else None
        self._keys = [key.get_secret_value() for key in api_keys]

    @property
    def has_keys(self) -> bool:
        return self._admin_key is not None or bool(self._keys)

    def authenticate(self, authorization: str | None) -> Identity:
        """The identity behind an `Authorization` header; AuthenticationError if none."""
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
        if self._admin_key is not None and _same(key, self._admin_key):
            return Identity(key_id="admin", is_admin=True)
        # compare against every key, so the time taken does not tell which one nearly matched
        matches = [_same(key, candidate) for candidate in self._keys]
        if any(matches):
            return Identity(key_id=key_id(key))
        raise AuthenticationError(f"Incorrect API key provided: {_redact(key)}.")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _redact(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}" if len(key) > 10 else "***"
