"""The models the gateway serves.

Two sources behind the same two async methods: `ModelRegistry`, a list given in the settings
(or by tests) for a gateway without a database, and `DatabaseModelRegistry`, the `models`
table that the admin API writes, read on every lookup so every gateway replica sees a
registration at once.

A model may be private to a tenant (`models.owner_tenant_id`): only that tenant's keys (and
the admin key) see it; to everyone else it does not exist (404 `model_not_found`, never a 403
that would tell them it does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from sqlalchemy import Select, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.db.models import Model
from libs.common.errors import ModelNotFoundError
from services.gateway.auth import Identity


@dataclass(frozen=True)
class ModelEntry:
    name: str
    # unix time (s) the model was registered, OpenAI's `created`
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "hydraserve"
    # None: public; else the only tenant that may see and use it
    owner_tenant_id: int | None = None

    def is_visible_to(self, viewer: Identity | None) -> bool:
        return (self.owner_tenant_id is None or viewer is None or viewer.is_admin
                or viewer.tenant_id == self.owner_tenant_id)


class Registry(Protocol):
    """`viewer`: the identity asking (only the models it may see); None: the gateway itself
    (every model)."""

    async def list(self, *, viewer: Identity | None = None) -> list[ModelEntry]: ...

    async def get(self, name: str, *, viewer: Identity | None = None) -> ModelEntry: ...


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

    async def list(self, *, viewer: Identity | None = None) -> list[ModelEntry]:
        return sorted((entry for entry in self._models.values() if entry.is_visible_to(viewer)),
                      key=lambda entry: entry.name)

    async def get(self, name: str, *, viewer: Identity | None = None) -> ModelEntry:
        """The model called `name`; ModelNotFoundError if it is not served to `viewer`."""
        entry = self._models.get(name)
        if entry is None or not entry.is_visible_to(viewer):
            raise not_found(name)
        return entry


class DatabaseModelRegistry:
    """The registered models, from the `models` table."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def list(self, *, viewer: Identity | None = None) -> list[ModelEntry]:
        statement = _visible(select(Model), viewer).order_by(Model.name)
        async with self._sessionmaker() as session:
            rows = await session.scalars(statement)
            return [_entry(row) for row in rows]

    async def get(self, name: str, *, viewer: Identity | None = None) -> ModelEntry:
        statement = _visible(select(Model).where(Model.name == name), viewer)
        async with self._sessionmaker() as session:
            row = await session.scalar(statement)
        if row is None:
            raise not_found(name)
        return _entry(row)


def _visible(statement: Select[tuple[Model]], viewer: Identity | None) -> Select[tuple[Model]]:
    if viewer is None or viewer.is_admin:
        return statement
    if viewer.tenant_id is None:
        return statement.where(Model.owner_tenant_id.is_(None))
    return statement.where(or_(Model.owner_tenant_id.is_(None),
                               Model.owner_tenant_id == viewer.tenant_id))


def _entry(row: Model) -> ModelEntry:
    return ModelEntry(row.name, created=int(row.created_at.timestamp()),
                      owner_tenant_id=row.owner_tenant_id)
