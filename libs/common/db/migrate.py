"""Run the schema migrations from code: `upgrade(database_url)` is `alembic upgrade head`."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from libs.common.db.session import async_database_url
from libs.common.errors import HydraError

ALEMBIC_INI = Path(__file__).with_name("alembic.ini")


def alembic_config() -> Config:
    """The Alembic configuration of the package, without touching the caller's logging."""
    config = Config(str(ALEMBIC_INI))
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str:
    """The revision `upgrade` brings a database to."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "the migrations folder has no revision"
    return head


async def upgrade_async(database_url: str, revision: str = "head") -> None:
    """Migrate the database at `database_url` to `revision` in one transaction."""
    engine = create_async_engine(async_database_url(database_url), poolclass=pool.NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade_on, revision)
    finally:
        await engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade <revision>` on `database_url`; from async code use `upgrade_async`."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(upgrade_async(database_url, revision))
        return
    raise HydraError("upgrade() called inside a running event loop; await upgrade_async()")


def _upgrade_on(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
