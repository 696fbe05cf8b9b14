"""The models the gateway serves.

Two sources behind the same two async methods: `ModelRegistry`, a list given in the settings
(or by tests) for a gateway without a database, and `DatabaseModelRegistry`, the `models`
table that the admin API writes, read on every lookup so every gateway replica sees a
registration at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db.models import Model
from libs.common.errors import ModelNotFoundError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    # unix time (s) the model was registered, OpenAI's `created`
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "hydraserve"


class Registry(Protocol):
    async def list(self) -> list[ModelEntry]: ...

    async def get(self, name: str) -> ModelEntry: ...


def not_found(name: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"The model `{name}` does not exist or you do not have access to it.", param="model")


class ModelRegistry:
    """A fixed list of models, from the settings."""

    def __init__(self, names: list[str] | None = None) -> None:
        self._models: dict[str, ModelEntry] = {}
        for name in names or []:
            self.add(name)

    def add(self, name: str) -> ModelEntry:
        return self._models.setdefault(name, ModelEntry(name))

    async def list(self) -> list[ModelEntry]:
        return sorted(self._models.values(), key=lambda entry: entry.name)

    async def get(self, name: str) -> ModelEntry:
        """The model called `name`; ModelNotFoundError if it is not served."""
        entry = self._models.get(name)
        if entry is None:
            raise not_found(name)
        return entry


class DatabaseModelRegistry:
    """The registered models, from the `models` table."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def list(self) -> list[ModelEntry]:
        async with self._sessionmaker() as session:
            rows = await session.scalars(select(Model).order_by(Model.name))
            return [_entry(row) for row in rows]

    async def get(self, name: str) -> ModelEntry:
        async with self._sessionmaker() as session:
            row = await session.scalar(select(Model).where(Model.name == name))
        if row is None:
            raise not_found(name)
        return _entry(row)


def _entry(row: Model) -> ModelEntry:
    return ModelEntry(row.name, created=int(row.created_at.timestamp()))
