"""The admin API's logic: model registration through the storage service into Postgres,
the cluster's state, tenants with their limits, and API keys. Knows nothing of HTTP; every
change publishes an audit event (`admin.<verb>`) naming the key that made it.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

from nats.errors import Error as NatsError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import EventPublisher
from libs.common.db.api_keys import issue_api_key
from libs.common.db.models import ApiKey, Endpoint, Model, Node, Partition, Tenant, Worker
from libs.common.db.session import transaction
from libs.common.errors import ConflictError, HydraError, NotFoundError
from libs.common.subjects import encode_token
from services.gateway.admin_schemas import (
    CreateTenant,
    EndpointOut,
    IssuedKey,
    IssueKey,
    IssueTenantKey,
    ModelOut,
    NodeOut,
    PartitionOut,
    RegisterModel,
    TenantLimits,
    TenantOut,
    UpdateTenant,
    WorkerOut,
)
from services.gateway.storage_client import StorageClient

logger = logging.getLogger(__name__)

# the storage service's rule for model names
_STORAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdminService:
    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], storage: StorageClient,
                 events: EventPublisher) -> None:
        self._sessionmaker = sessionmaker
        self._storage = storage
        self._events = events

    # --- models ------------------------------------------------------------------------------
    async def register_model(self, body: RegisterModel, *, actor: str) -> ModelOut:
        async with self._sessionmaker() as session:
            if await session.scalar(select(Model.id).where(Model.name == body.name)):
                raise ConflictError(f"model {body.name!r} is already registered", param="name")
            owner = (await _tenant_row(session, body.owner_tenant, param="owner_tenant")
                     if body.owner_tenant is not None else None)
        storage_name = storage_name_of(body.name)
        info = await self._storage.import_model(path=body.path, name=storage_name)
        try:
            model = Model(
                name=body.name, architecture=info.architecture, family=info.family,
                num_layers=info.num_layers, size_bytes=info.num_bytes,
                kv_cache_bytes=body.kv_cache_bytes,
                storage_path=self._storage.model_url(storage_name),
                ttft_slo_ms=body.ttft_slo_ms, tpot_slo_ms=body.tpot_slo_ms,
                max_pipeline_degree=min(body.max_pipeline_degree, info.max_degree),
                keep_alive_s=body.keep_alive_s,
                owner_tenant_id=owner.id if owner is not None else None)
            partitions: list[Partition] = []
            for degree in range(1, model.max_pipeline_degree + 1):
                for stage in info.partitions[str(degree)]:
                    manifest = await self._storage.manifest(storage_name, degree, stage.stage)
                    partitions.append(Partition(
                        degree=degree, stage=stage.stage, start_layer=stage.start_layer,
                        end_layer=stage.end_layer, num_bytes=stage.num_bytes,
                        manifest=manifest.model_dump(mode="json")))
            async with transaction(self._sessionmaker) as session:
                session.add(model)
                await session.flush()
                for partition in partitions:
                    partition.model_id = model.id
                session.add_all(partitions)
        except Exception as exc:
            # the import succeeded but the rows did not: leave no orphan in the store
            await self._forget_import(storage_name)
            if isinstance(exc, IntegrityError):
                raise ConflictError(f"model {body.name!r} is already registered",
                                    param="name") from exc
            raise
        await self._audit("admin.model_registered", actor, model=body.name,
                          architecture=info.architecture, size_bytes=info.num_bytes,
                          owner_tenant=body.owner_tenant)
        return await self.describe_model(body.name)

    async def list_models(self) -> list[ModelOut]:
        async with self._sessionmaker() as session:
            rows = await session.execute(
                select(Model, Tenant.name).outerjoin(Tenant, Model.owner_tenant_id == Tenant.id)
                .order_by(Model.name))
            return [_model_out(row, owner, []) for row, owner in rows]

    async def describe_model(self, name: str) -> ModelOut:
        async with self._sessionmaker() as session:
            row = await _model_row(session, name)
            owner = (await session.get(Tenant, row.owner_tenant_id)
                     if row.owner_tenant_id is not None else None)
            parts = await session.scalars(select(Partition).where(Partition.model_id == row.id)
                                          .order_by(Partition.degree, Partition.stage))
            return _model_out(row, owner.name if owner is not None else None, list(parts))

    async def delete_model(self, name: str, *, actor: str) -> None:
        async with transaction(self._sessionmaker) as session:
            row = await _model_row(session, name)
            num_endpoints = await session.scalar(
                select(func.count()).select_from(Endpoint).where(Endpoint.model_id == row.id))
            if num_endpoints:
                raise ConflictError(f"model {name!r} still has {num_endpoints} endpoint(s) "
                                    "on record", param="name")
            storage_name = row.storage_path.rstrip("/").rsplit("/", 1)[-1]
            await session.delete(row)
        await self._forget_import(storage_name)
        await self._audit("admin.model_deleted", actor, model=name)

    # --- cluster state -----------------------------------------------------------------------
    async def list_nodes(self) -> list[NodeOut]:
        async with self._sessionmaker() as session:
            rows = await session.scalars(select(Node).order_by(Node.id))
            return [NodeOut.model_validate(row, from_attributes=True) for row in rows]

    async def list_endpoints(self) -> list[EndpointOut]:
        async with self._sessionmaker() as session:
            rows = await session.execute(select(Endpoint, Model.name).join(Model)
                                         .order_by(Endpoint.id))
            return [EndpointOut(id=row.id, model=model, state=row.state,
                                pipeline_degree=row.pipeline_degree,
                                last_request_at=row.last_request_at, created_at=row.created_at)
                    for row, model in rows]

    async def list_workers(self) -> list[WorkerOut]:
        async with self._sessionmaker() as session:
            rows = await session.scalars(select(Worker).order_by(Worker.id))
            return [WorkerOut.model_validate(row, from_attributes=True) for row in rows]

    # --- tenants -----------------------------------------------------------------------------
    async def create_tenant(self, body: CreateTenant, *, actor: str) -> TenantOut:
        try:
            async with transaction(self._sessionmaker) as session:
                if await session.scalar(select(Tenant.id).where(Tenant.name == body.name)):
                    raise ConflictError(f"tenant {body.name!r} already exists", param="name")
                tenant = Tenant(name=body.name, **_limits_of(body))
                session.add(tenant)
                await session.flush()
                await session.refresh(tenant)
                out = _tenant_out(tenant)
        except IntegrityError as exc:  # created meanwhile by another request
            raise ConflictError(f"tenant {body.name!r} already exists", param="name") from exc
        await self._audit("admin.tenant_created", actor, tenant=out.name, tenant_id=out.id,
                          **_limits_of(out))
        return out

    async def list_tenants(self) -> list[TenantOut]:
        async with self._sessionmaker() as session:
            rows = await session.scalars(select(Tenant).order_by(Tenant.name))
            return [_tenant_out(row) for row in rows]

    async def describe_tenant(self, name: str) -> TenantOut:
        async with self._sessionmaker() as session:
            return _tenant_out(await _tenant_row(session, name))

    async def update_tenant(self, name: str, body: UpdateTenant, *, actor: str) -> TenantOut:
        changed = {field: getattr(body, field) for field in body.model_fields_set}
        async with transaction(self._sessionmaker) as session:
            tenant = await _tenant_row(session, name)
            for field, value in changed.items():
                setattr(tenant, field, value)
            await session.flush()
            out = _tenant_out(tenant)
        await self._audit("admin.tenant_updated", actor, tenant=name, tenant_id=out.id,
                          **changed)
        return out

    # --- keys --------------------------------------------------------------------------------
    async def issue_tenant_key(self, tenant: str, body: IssueTenantKey, *,
                               actor: str) -> IssuedKey:
        """A key for an existing tenant; NotFoundError if there is none of that name."""
        async with transaction(self._sessionmaker) as session:
            row = await _tenant_row(session, tenant)
            issued = await issue_api_key(session, tenant_id=row.id, name=body.name)
        await self._audit("admin.key_issued", actor, api_key_id=issued.api_key_id,
                          tenant=tenant)
        return IssuedKey(id=issued.api_key_id, tenant=tenant, tenant_id=row.id,
                         name=body.name, key=issued.key)

    async def issue_key(self, body: IssueKey, *, actor: str) -> IssuedKey:
        async with transaction(self._sessionmaker) as session:
            tenant = await session.scalar(select(Tenant).where(Tenant.name == body.tenant))
            is_new_tenant = tenant is None
            if tenant is None:
                tenant = Tenant(name=body.tenant)
                session.add(tenant)
                await session.flush()
            issued = await issue_api_key(session, tenant_id=tenant.id, name=body.name)
        if is_new_tenant:
            await self._audit("admin.tenant_created", actor, tenant=body.tenant,
                              tenant_id=tenant.id)
        await self._audit("admin.key_issued", actor, api_key_id=issued.api_key_id,
                          tenant=body.tenant)
        return IssuedKey(id=issued.api_key_id, tenant=body.tenant, tenant_id=tenant.id,
                         name=body.name, key=issued.key)

    async def revoke_key(self, api_key_id: int, *, actor: str) -> None:
        async with transaction(self._sessionmaker) as session:
            row = await session.get(ApiKey, api_key_id)
            if row is None or row.revoked_at is not None:
                raise NotFoundError(f"no active API key with id {api_key_id}", param="id")
            row.revoked_at = datetime.now(UTC)
        await self._audit("admin.key_revoked", actor, api_key_id=api_key_id)

    # --- helpers -----------------------------------------------------------------------------
    async def _forget_import(self, storage_name: str) -> None:
        try:
            await self._storage.delete_model(storage_name)
        except NotFoundError:
            logger.info("storage already lacks model %s", storage_name)
        except HydraError as exc:
            logger.error("could not delete %s from storage: %s", storage_name, exc.message)

    async def _audit(self, kind: str, actor: str, *, model: str | None = None,
                     **data: Any) -> None:
        try:
            await self._events.publish(kind, model=model, actor=actor, **data)
        except NatsError as exc:
            logger.error("audit event %s not published: %s", kind, exc)


def storage_name_of(model: str) -> str:
    """The model's name in the store: itself where the store's naming rules allow it (as the
    scheduler's own registration assumes), else its subject-token encoding (`org/m` ->
    `org_2Fm`)."""
    return model if _STORAGE_NAME.match(model) else encode_token(model)


async def _model_row(session: AsyncSession, name: str) -> Model:
    row = await session.scalar(select(Model).where(Model.name == name))
    if row is None:
        raise NotFoundError(f"model {name!r} is not registered", param="name")
    return row


async def _tenant_row(session: AsyncSession, name: str, *, param: str = "name") -> Tenant:
    row = await session.scalar(select(Tenant).where(Tenant.name == name))
    if row is None:
        raise NotFoundError(f"tenant {name!r} does not exist", param=param)
    return row


def _limits_of(limits: TenantLimits | TenantOut) -> dict[str, int | None]:
    return {field: getattr(limits, field) for field in TenantLimits.model_fields}


def _tenant_out(row: Tenant) -> TenantOut:
    return TenantOut(id=row.id, name=row.name, created_at=row.created_at,
                     max_requests_per_minute=row.max_requests_per_minute,
                     max_tokens_per_minute=row.max_tokens_per_minute,
                     max_concurrent_requests=row.max_concurrent_requests)


def _model_out(row: Model, owner_tenant: str | None, partitions: list[Partition]) -> ModelOut:
    return ModelOut(
        name=row.name, architecture=row.architecture, family=row.family,
        num_layers=row.num_layers, size_bytes=row.size_bytes, kv_cache_bytes=row.kv_cache_bytes,
        storage_path=row.storage_path, ttft_slo_ms=row.ttft_slo_ms, tpot_slo_ms=row.tpot_slo_ms,
        max_pipeline_degree=row.max_pipeline_degree, keep_alive_s=row.keep_alive_s,
        created_at=row.created_at, owner_tenant=owner_tenant,
        partitions=[PartitionOut(degree=p.degree, stage=p.stage, start_layer=p.start_layer,
                                 end_layer=p.end_layer, num_bytes=p.num_bytes)
                    for p in partitions])
