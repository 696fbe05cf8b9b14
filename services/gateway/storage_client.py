"""The gateway's client of the storage service (HTTP): import, describe, manifests, delete.

The storage service answers errors as `{"error": {"code", "message", "param"}}` with the
HydraError's status; they are raised here again as HydraErrors with the same code and
status, so the admin API reports the store's named reason unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from libs.common.errors import HydraError, ServiceUnavailableError
from services.storage.schemas import Manifest, ModelInfo

logger = logging.getLogger(__name__)

# an import hard-links (or copies) the folder and writes every partition manifest
_IMPORT_TIMEOUT_S = 600.0
_TIMEOUT_S = 30.0


class StorageClient:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=_TIMEOUT_S)

    def model_url(self, name: str) -> str:
        """Where the store serves model `name` (the `models.storage_path` convention)."""
        return f"{self.base_url}/models/{name}"

    async def close(self) -> None:
        await self._client.aclose()

    async def import_model(self, *, path: str, name: str) -> ModelInfo:
        body = await self._call("POST", "/models", json={"path": path, "name": name},
                                timeout=_IMPORT_TIMEOUT_S)
        return ModelInfo.model_validate(body)

    async def manifest(self, name: str, degree: int, stage: int) -> Manifest:
        body = await self._call("GET", f"/models/{name}/partitions/{degree}/{stage}/manifest")
        return Manifest.model_validate(body)

    async def delete_model(self, name: str) -> None:
        await self._call("DELETE", f"/models/{name}")

    async def _call(self, method: str, path: str, *, json: Any = None,
                    timeout: float = _TIMEOUT_S) -> Any:
        try:
            response = await self._client.request(method, path, json=json, timeout=timeout)
        except httpx.HTTPError as exc:
            logger.error("storage %s %s failed: %r", method, path, exc)
            raise ServiceUnavailableError(f"The storage service is unreachable: {exc}") \
                from exc
        if response.is_success:
            return response.json() if response.content else None
        raise _storage_error(response)


def _storage_error(response: httpx.Response) -> HydraError:
    try:
        body = response.json()["error"]
        error = HydraError(str(body["message"]), param=body.get("param"))
        error.code = str(body["code"])
    except (ValueError, KeyError, TypeError):
        error = HydraError(f"storage answered {response.status_code}: {response.text[:200]}")
        error.code = "storage_error"
    # a 5xx of the store is a bad gateway from the client's point of view
    error.http_status = response.status_code if response.status_code < 500 else 502
    return error
