"""Async engines and sessions from a database URL, and a transaction helper."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as _create_async_engine

from libs.common.errors import HydraError

T = TypeVar("T")

ASYNC_DRIVER = "postgresql+asyncpg"


class DatabaseConfigError(HydraError):
    """A database URL HydraServe cannot use."""

    code = "database_config_error"


def async_database_url(database_url: str) -> str:
    """`database_url` with the asyncpg driver (`postgresql://` and `postgres://` accepted)."""
    url = make_url(database_url)
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise DatabaseConfigError(f"not a PostgreSQL URL: {url.render_as_string()}")
    return url.set(drivername=ASYNC_DRIVER).render_as_string(hide_password=False)


def create_engine(database_url: str, **engine_kwargs: Any) -> AsyncEngine:
    """An asyncpg engine for `database_url`; `engine_kwargs` go to SQLAlchemy unchanged."""
    engine_kwargs.setdefault("pool_pre_ping", True)
    return _create_async_engine(async_database_url(database_url), **engine_kwargs)


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # Objects stay readable after commit: callers turn rows into frozen values afterwards.
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session inside one transaction: committed on exit, rolled back on an exception."""
    async with sessionmaker() as session, session.begin():
        yield session


async def run_in_transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
    work: Callable[[AsyncSession], Awaitable[T]],
) -> T:
    """`await work(session)` in one transaction and return its result."""
    async with transaction(sessionmaker) as session:
        return await work(session)
