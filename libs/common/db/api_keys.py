"""API keys: issued once in plaintext, stored only as their SHA-256.

A key is 32 random bytes, so a plain (unsalted) SHA-256 is safe against guessing and lets the
gateway find a key with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.db.models import ApiKey, Tenant

KEY_PREFIX = "hs-"


@dataclass(frozen=True)
class IssuedApiKey:
    """A new key: `key` is shown to the user once and is not stored anywhere."""

    api_key_id: int
    key: str


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Lowercase hex SHA-256 of the key, the form stored in `api_keys.key_hash`."""
    return hashlib.sha256(key.encode()).hexdigest()


async def issue_api_key(session: AsyncSession, *, tenant_id: int, name: str) -> IssuedApiKey:
    """Store a new key of `tenant_id` (its hash only) and return the plaintext once."""
    key = generate_api_key()
    row = ApiKey(tenant_id=tenant_id, key_hash=hash_api_key(key), name=name)
    session.add(row)
    await session.flush()
    return IssuedApiKey(api_key_id=row.id, key=key)


async def find_active_api_key(session: AsyncSession, key: str) -> ApiKey | None:
    """The unrevoked key row matching the plaintext `key`, or None."""
    statement = select(ApiKey).where(ApiKey.key_hash == hash_api_key(key),
                                     ApiKey.revoked_at.is_(None))
    return (await session.execute(statement)).scalar_one_or_none()


async def find_active_api_key_and_tenant(session: AsyncSession,
                                         key: str) -> tuple[ApiKey, Tenant] | None:
    """The unrevoked key row matching `key` and its tenant (with its limits), or None."""
    statement = (select(ApiKey, Tenant).join(Tenant, ApiKey.tenant_id == Tenant.id)
                 .where(ApiKey.key_hash == hash_api_key(key), ApiKey.revoked_at.is_(None)))
    row = (await session.execute(statement)).one_or_none()
    return (row[0], row[1]) if row is not None else None
