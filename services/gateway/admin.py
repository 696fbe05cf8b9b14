"""The admin API (`/admin/*`): the admin key only; a tenant key gets 403.

Thin handlers over `AdminService`; a gateway without a database answers 503 here.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response

from libs.common.errors import ServiceUnavailableError
from services.gateway.admin_schemas import (
    EndpointOut,
    IssuedKey,
    IssueKey,
    ModelOut,
    NodeOut,
    RegisterModel,
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


@router.post("/keys", status_code=201)
async def issue_key(body: IssueKey, admin: Admin, service: Service) -> IssuedKey:
    return await service.issue_key(body, actor=admin.key_id)


@router.delete("/keys/{api_key_id}", status_code=204)
async def revoke_key(api_key_id: int, admin: Admin, service: Service) -> Response:
    await service.revoke_key(api_key_id, actor=admin.key_id)
    return Response(status_code=204)
