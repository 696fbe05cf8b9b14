"""The storage service's HTTP API: thin handlers over ModelStore and the range logic.

Partition data is served as the bytes of a safetensors file that exists nowhere on disk: the
manifest says which source-file ranges make up each range of it. Responses that carry data go
through one egress token bucket per process, so a benchmark can give the store a NIC. A
request that carries a `traceparent` is traced (`storage.read`, `services.storage.observe`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from libs.common.errors import HydraError, RangeNotSatisfiableError
from services.storage.observe import ReadSpanMiddleware
from services.storage.ranges import (
    ByteRange,
    Segment,
    file_segments,
    parse_range,
    partition_segments,
)
from services.storage.schemas import ErrorBody, ErrorResponse, ImportRequest, Manifest, ModelInfo
from services.storage.store import ModelStore
from services.storage.streaming import stream_segments
from services.storage.throttle import TokenBucket

logger = logging.getLogger(__name__)

router = APIRouter()


def get_store(request: Request) -> ModelStore:
    store: ModelStore = request.app.state.store
    return store


StoreDep = Annotated[ModelStore, Depends(get_store)]
RangeHeader = Annotated[str | None, Header(alias="Range")]
# (start, end) -> the segments that make up those bytes of the resource
SegmentsOf = Callable[[int, int], list[Segment]]


@router.post("/models", status_code=201)
def import_model(body: ImportRequest, store: StoreDep) -> ModelInfo:
    return store.import_model(body.path, body.name)


@router.get("/models")
def list_models(store: StoreDep) -> list[ModelInfo]:
    return store.list_models()


@router.get("/models/{name}")
def describe_model(name: str, store: StoreDep) -> ModelInfo:
    return store.describe(name)


@router.delete("/models/{name}", status_code=204)
def delete_model(name: str, store: StoreDep) -> Response:
    store.delete(name)
    return Response(status_code=204)


@router.get("/models/{name}/partitions/{degree}/{stage}/manifest")
def partition_manifest(name: str, degree: int, stage: int, store: StoreDep) -> Manifest:
    return store.manifest(name, degree, stage)


@router.get("/models/{name}/partitions/{degree}/{stage}/data")
async def partition_data(name: str, degree: int, stage: int, request: Request,
                         store: StoreDep, range_header: RangeHeader = None) -> Response:
    manifest = await run_in_threadpool(store.manifest, name, degree, stage)
    files_dir = store.files_dir(name)

    def segments(start: int, end: int) -> list[Segment]:
        return partition_segments(manifest, files_dir, start, end)

    return ranged_response(request, manifest.num_bytes, range_header, segments)


@router.get("/models/{name}/files/{path:path}")
async def model_file(name: str, path: str, request: Request, store: StoreDep,
                     range_header: RangeHeader = None) -> Response:
    file_path = await run_in_threadpool(store.file_path, name, path)
    size = file_path.stat().st_size

    def segments(start: int, end: int) -> list[Segment]:
        return file_segments(file_path, start, end)

    return ranged_response(request, size, range_header, segments)


def ranged_response(request: Request, size: int, range_header: str | None,
                    segments_of: SegmentsOf) -> Response:
    """200 with the whole resource, 206 with one range of it, or 416."""
    try:
        byte_range = parse_range(range_header, size)
    except RangeNotSatisfiableError as exc:
        return error_response(exc, headers={"Content-Range": f"bytes */{size}"})
    served = byte_range or ByteRange(0, size, size)
    headers = {"Accept-Ranges": "bytes", "Content-Length": str(served.length)}
    if byte_range is not None:
        headers["Content-Range"] = byte_range.content_range
    body = stream_segments(segments_of(served.start, served.end),
                           egress=request.app.state.egress)
    return StreamingResponse(body, status_code=206 if byte_range else 200, headers=headers,
                             media_type="application/octet-stream")


def error_response(exc: HydraError, *, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=exc.code, message=exc.message, param=exc.param))
    return JSONResponse(body.model_dump(), status_code=exc.http_status, headers=headers)


async def _hydra_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HydraError)
    if exc.http_status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(part) for part in first.get("loc", ()))
    body = ErrorBody(code="invalid_request_error", message=f"{where}: {first.get('msg')}",
                     param=where or None)
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = ErrorBody(code=code, message=str(exc.detail))
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=exc.status_code)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = ErrorBody(code=HydraError.code, message=f"{type(exc).__name__}: {exc}")
    return JSONResponse(ErrorResponse(error=body).model_dump(), status_code=500)


def create_app(store: ModelStore, *, egress: TokenBucket | None = None) -> FastAPI:
    app = FastAPI(title="HydraServe storage")
    app.state.store = store
    # one bucket for every data response of the process: the emulated NIC of the store
    app.state.egress = egress
    app.add_exception_handler(HydraError, _hydra_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(router)
    # around the routes and their error handlers: an error answer is traced too
    app.add_middleware(ReadSpanMiddleware)
    return app
