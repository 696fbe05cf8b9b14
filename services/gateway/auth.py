"""API keys: `Authorization: Bearer <key>`.

Accepted keys: the admin key, the keys given in the settings, and, when the gateway has a
database, the unrevoked keys issued through the admin API (found by their SHA-256). A key is
never logged or put on the bus: requests carry the key's id, a short hash.

A database key brings its tenant's limits, read with the key on every request, so a change
made through the admin API applies at once on every replica. A settings key is limited on its
own by the gateway's defaults; the admin key is never limited.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db.api_keys import find_active_api_key_and_tenant
from libs.common.errors import AuthenticationError, HydraError
from services.gateway.ratelimit import Limits


class PermissionDeniedError(HydraError):
    """A valid key that may not use this route (a tenant key on the admin API)."""

    code = "permission_denied"
    http_status = 403


@dataclass(frozen=True)
class Identity:
    """Who sent a request."""

    # "admin" or the first 16 hex digits of the key's SHA-256
    key_id: str
    is_admin: bool = False
    # the tenant of a key issued through the admin API
    tenant_id: int | None = None
    # the tenant's own limits (unset ones: the gateway's defaults)
    limits: Limits | None = None

    @property
    def limit_subject(self) -> str | None:
        """Whose limits a request counts against; None: unlimited (the admin key)."""
        if self.is_admin:
            return None
        return f"tenant:{self.tenant_id}" if self.tenant_id is not None else f"key:{self.key_id}"


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKeyAuth:
    def __init__(self, *, admin_key: SecretStr | None, api_keys: list[SecretStr],
                 sessionmaker: async_sessionmaker[AsyncSession] | None = None) -> None:
        self._admin_key = admin_key.get_secret_value() if admin_key else None
        self._keys = [key.get_secret_value() for key in api_keys]
        # the database of issued keys; None: settings only
        self._sessionmaker = sessionmaker

    @property
    def has_keys(self) -> bool:
        return (self._admin_key is not None or bool(self._keys)
                or self._sessionmaker is not None)

    async def authenticate(self, authorization: str | None) -> Identity:
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
        if self._sessionmaker is not None:
            async with self._sessionmaker() as session:
                found = await find_active_api_key_and_tenant(session, key)
            if found is not None:
                _, tenant = found
                return Identity(key_id=key_id(key), tenant_id=tenant.id, limits=Limits(
                    max_requests_per_minute=tenant.max_requests_per_minute,
                    max_tokens_per_minute=tenant.max_tokens_per_minute,
                    max_concurrent_requests=tenant.max_concurrent_requests))
        raise AuthenticationError(f"Incorrect API key provided: {_redact(key)}.")

    async def authenticate_admin(self, authorization: str | None) -> Identity:
        """As `authenticate`, and PermissionDeniedError unless it is the admin key."""
        identity = await self.authenticate(authorization)
        if not identity.is_admin:
            raise PermissionDeniedError("This route needs the admin key.")
        return identity


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _redact(key: str) -> str:
    return f"{key[:3]}...{key[-4:]}" if len(key) > 10 else "***"
