"""The HTTP routes: authenticate, call one service method, turn its reply into a response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.gateway.auth import ApiKeyAuth, Identity
from services.gateway.completions import CompletionService, Reply
from services.gateway.formatting import CHAT, COMPLETION
from services.gateway.registry import ModelEntry, Registry
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    from services.gateway.admin_service import AdminService


@dataclass(frozen=True)
class GatewayServices:
    """What the routes use, built once by the app's lifespan."""

    auth: ApiKeyAuth
    registry: Registry
    completions: CompletionService
    # None without a database: the admin API then answers 503
    admin: AdminService | None = None


def services(request: Request) -> GatewayServices:
    gateway: GatewayServices = request.app.state.services
    return gateway


async def authenticated(request: Request,
                        authorization: Annotated[str | None, Header()] = None) -> Identity:
    return await services(request).auth.authenticate(authorization)


Authenticated = Annotated[Identity, Depends(authenticated)]
router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/models")
async def list_models(request: Request, identity: Authenticated) -> dict[str, Any]:
    models = await services(request).registry.list(viewer=identity)
    return {"object": "list", "data": [_model_object(model) for model in models]}


@router.get("/v1/models/{name:path}")
async def retrieve_model(name: str, request: Request, identity: Authenticated) -> dict[str, Any]:
    return _model_object(await services(request).registry.get(name, viewer=identity))


def _model_object(model: ModelEntry) -> dict[str, Any]:
    return {"id": model.name, "object": "model", "created": model.created,
            "owned_by": model.owned_by}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request,
                      identity: Authenticated) -> Response:
    request_id = request.state.request_id = COMPLETION.new_id()
    return _respond(await services(request).completions.complete(body, identity,
                                                                 request_id=request_id))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           identity: Authenticated) -> Response:
    request_id = request.state.request_id = CHAT.new_id()
    return _respond(await services(request).completions.chat(body, identity,
                                                             request_id=request_id))


def _respond(reply: Reply) -> Response:
    if reply.events is not None:
        return StreamingResponse(reply.events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return JSONResponse(reply.body)
