"""The gateway app: wiring and lifespan.

`create_app(settings)` builds the FastAPI app; its lifespan connects to NATS, makes sure the
streams exist, and builds the services the routes use. Every response carries an
`x-request-id` header: the completion's id (`cmpl-...`, `chatcmpl-...`) on completion routes,
a `req-...` id elsewhere.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from nats.errors import Error as NatsError
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from libs.common.bus import EventPublisher, connect, ensure_streams
from libs.common.db.session import create_engine, create_sessionmaker
from libs.common.settings import Settings
from services.gateway.admin import router as admin_router
from services.gateway.admin_service import AdminService
from services.gateway.auth import ApiKeyAuth
from services.gateway.broker import RequestBroker
from services.gateway.completions import CompletionService
from services.gateway.errors import install_error_handlers
from services.gateway.observability import ObservabilityMiddleware, add_metrics_route
from services.gateway.progress import ProgressWatcher
from services.gateway.ratelimit import RateLimiter
from services.gateway.registry import DatabaseModelRegistry, ModelRegistry, Registry
from services.gateway.routes import GatewayServices, router
from services.gateway.storage_client import StorageClient

logger = logging.getLogger(__name__)


class RequestIdMiddleware:
    """Gives each request an id in `request.state.request_id` (a route may replace it) and
    returns it as `x-request-id`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = f"req-{uuid.uuid4().hex}"

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["x-request-id"] = state["request_id"]
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(settings: Settings, *, registry: Registry | None = None) -> FastAPI:
    gateway = settings.gateway
    database = _Database(settings.database.url) if settings.database.is_configured else None
    if registry is None:
        registry = (DatabaseModelRegistry(database.sessionmaker) if database is not None
                    else ModelRegistry(gateway.models))
    auth = ApiKeyAuth(admin_key=gateway.admin_key, api_keys=gateway.api_keys,
                      sessionmaker=database.sessionmaker if database is not None else None)
    if not auth.has_keys:
        logger.warning("no API keys configured (HYDRASERVE_GATEWAY__ADMIN_KEY / __API_KEYS): "
                       "every request will be refused with 401")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nc = await connect(settings.nats, name="gateway")
        storage = StorageClient(gateway.storage_url)
        try:
            await ensure_streams(nc.jetstream(), settings.bus)
            broker = RequestBroker(nc, first_token_timeout_s=gateway.first_token_timeout_s,
                                   inter_token_timeout_s=gateway.inter_token_timeout_s)
            admin = (AdminService(database.sessionmaker, storage, EventPublisher(nc))
                     if database is not None else None)
            app.state.services = GatewayServices(
                auth=auth, registry=registry,
                completions=CompletionService(broker, registry, progress=ProgressWatcher(nc),
                                              limiter=RateLimiter.from_settings(gateway)),
                admin=admin)
            logger.info("gateway serving %d model(s) over NATS at %s (models from %s)",
                        len(await registry.list()), settings.nats.url,
                        "the database" if database is not None else "the settings")
            yield
        finally:
            await storage.close()
            if database is not None:
                await database.engine.dispose()
            try:
                await nc.drain()
            except NatsError as exc:
                logger.warning("closing the NATS connection failed: %s", exc)

    app = FastAPI(title="HydraServe gateway", lifespan=lifespan)
    app.include_router(router)
    app.include_router(admin_router)
    add_metrics_route(app)
    app.add_middleware(ObservabilityMiddleware)
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app, retry_after_s=gateway.retry_after_s)
    return app


class _Database:
    """The engine and sessions of the gateway's database (keys, models, cluster state)."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.sessionmaker = create_sessionmaker(self.engine)
