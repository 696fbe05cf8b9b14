"""Alembic environment: migrations run on an asyncpg connection through `run_sync`.

Two ways in: `libs.common.db.migrate` hands over an open connection in
`config.attributes["connection"]`; the `alembic` command line passes the URL with
`-x database_url=...` (or `sqlalchemy.url` in the ini file).
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from libs.common.db.models import Base
from libs.common.db.session import DatabaseConfigError, async_database_url

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _database_url() -> str:
    url = (context.get_x_argument(as_dictionary=True).get("database_url")
           or config.get_main_option("sqlalchemy.url"))
    if not url:
        raise DatabaseConfigError("no database URL: pass -x database_url=postgresql://...")
    return async_database_url(url)


def _run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_migrations_online() -> None:
    engine = create_async_engine(_database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_migrations)
    finally:
        await engine.dispose()


def _run_migrations_offline() -> None:
    context.configure(url=_database_url(), target_metadata=target_metadata,
                      literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_migrations_offline()
elif (shared_connection := config.attributes.get("connection")) is not None:
    _run_migrations(shared_connection)
else:
    asyncio.run(_run_migrations_online())
