"""The admin API (`/admin/*`): the admin key only; a tenant key gets 403.

Thin handlers over `AdminService`; a gateway without a database answers 503 here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path, Request, Response

from libs.common.errors import ServiceUnavailableError
from services.gateway.admin_schemas import (
    INT32_MAX,
    CreateTenant,
    EndpointOut,
    IssuedKey,
    IssueKey,
    IssueTenantKey,
    ModelOut,
    NodeOut,
    RegisterModel,
    TenantOut,
    UpdateTenant,
    WorkerOut,
)
from services.gateway.admin_service import AdminService
from services.gateway.auth import Identity
from services.gateway.routes import services


async def admin_identity(request: Request,
                         authorization: Annotated[str | None, Header()] = None) -> Identity:
    return await services(request).auth.authenticate_admin(authorization)


def admin_service(request: Request) -> AdminService:
    admin = services(request).admin
    if admin is None:
        raise ServiceUnavailableError("The admin API needs a database "
                                      "(HYDRASERVE_DATABASE__URL).")
    return admin


Admin = Annotated[Identity, Depends(admin_identity)]
Service = Annotated[AdminService, Depends(admin_service)]
router = APIRouter(prefix="/admin")


@router.post("/models", status_code=201)
async def register_model(body: RegisterModel, admin: Admin, service: Service) -> ModelOut:
    return await service.register_model(body, actor=admin.key_id)


@router.get("/models")
async def list_models(admin: Admin, service: Service) -> dict[str, list[ModelOut]]:
    return {"data": await service.list_models()}


@router.get("/models/{name:path}")
async def describe_model(name: str, admin: Admin, service: Service) -> ModelOut:
    return await service.describe_model(name)


@router.delete("/models/{name:path}", status_code=204)
async def delete_model(name: str, admin: Admin, service: Service) -> Response:
    await service.delete_model(name, actor=admin.key_id)
    return Response(status_code=204)


@router.get("/nodes")
async def list_nodes(admin: Admin, service: Service) -> dict[str, list[NodeOut]]:
    return {"data": await service.list_nodes()}


@router.get("/endpoints")
async def list_endpoints(admin: Admin, service: Service) -> dict[str, list[EndpointOut]]:
    return {"data": await service.list_endpoints()}


@router.get("/workers")
async def list_workers(admin: Admin, service: Service) -> dict[str, list[WorkerOut]]:
    return {"data": await service.list_workers()}


@router.post("/tenants", status_code=201)
async def create_tenant(body: CreateTenant, admin: Admin, service: Service) -> TenantOut:
    return await service.create_tenant(body, actor=admin.key_id)


@router.get("/tenants")
async def list_tenants(admin: Admin, service: Service) -> dict[str, list[TenantOut]]:
    return {"data": await service.list_tenants()}


@router.get("/tenants/{name}")
async def describe_tenant(name: str, admin: Admin, service: Service) -> TenantOut:
    return await service.describe_tenant(name)


@router.patch("/tenants/{name}")
async def update_tenant(name: str, body: UpdateTenant, admin: Admin,
                        service: Service) -> TenantOut:
    return await service.update_tenant(name, body, actor=admin.key_id)


@router.post("/tenants/{name}/keys", status_code=201)
async def issue_tenant_key(name: str, body: IssueTenantKey, admin: Admin,
                           service: Service) -> IssuedKey:
    return await service.issue_tenant_key(name, body, actor=admin.key_id)


@router.post("/keys", status_code=201)
async def issue_key(body: IssueKey, admin: Admin, service: Service) -> IssuedKey:
    return await service.issue_key(body, actor=admin.key_id)


@router.delete("/keys/{api_key_id}", status_code=204)
async def revoke_key(api_key_id: Annotated[int, Path(ge=1, le=INT32_MAX)], admin: Admin,
                     service: Service) -> Response:
    await service.revoke_key(api_key_id, actor=admin.key_id)
    return Response(status_code=204)
