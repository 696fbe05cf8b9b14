"""Tenants end to end: a real gateway with keys in PostgreSQL, a real storage service and NATS,
and the real `openai` client.

Tenant A may send 2 requests a minute: its third gets a 429 with `Retry-After`, while tenant B
goes on. A model private to A is listed and usable for A and does not exist for B. No worker
runs: an admitted request waits in the queue until the gateway's (short) first-token timeout
answers 503, a refused one is answered 429 before it is queued.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.cluster import admin_gateway, audit_events

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-admin-tenants-e2e-0123456789"


@dataclass(frozen=True)
class TenantStack:
    base_url: str
    nats_url: str
    # tenant name -> its key
    keys: dict[str, str]
    public_model: str
    # private to tenant "a"
    private_model: str


def admin(stack_url: str, method: str, path: str, body: Any = None) -> httpx.Response:
    response = httpx.request(method, f"{stack_url}{path}", json=body, timeout=120,
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.is_success, response.text
    return response


@pytest.fixture(scope="module")
def tenant_stack(nats_url: str, database_url: str, demo_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[TenantStack]:
    with admin_gateway(nats_url=nats_url, database_url=database_url,
                       workspace=tmp_path_factory.mktemp("tenants"), admin_key=ADMIN_KEY,
                       env={"HYDRASERVE_GATEWAY__FIRST_TOKEN_TIMEOUT_S": "1"}) as gateway:
        base_url = gateway.base_url
        suffix = uuid.uuid4().hex[:6]
        admin(base_url, "POST", "/admin/tenants", {"name": "a", "max_requests_per_minute": 2})
        admin(base_url, "POST", "/admin/tenants", {"name": "b"})
        keys = {tenant: admin(base_url, "POST", f"/admin/tenants/{tenant}/keys",
                              {"name": "e2e"}).json()["key"] for tenant in ("a", "b")}
        models = {"public": f"tenants/public-{suffix}", "private": f"tenants/a-only-{suffix}"}
        for kind, model in models.items():
            admin(base_url, "POST", "/admin/models", {
                "name": model, "path": str(demo_model_dir), "ttft_slo_ms": 2000,
                "tpot_slo_ms": 100, "max_pipeline_degree": 1,
                **({"owner_tenant": "a"} if kind == "private" else {})})
        yield TenantStack(base_url, nats_url, keys, models["public"], models["private"])


def client(stack: TenantStack, tenant: str) -> openai.AsyncOpenAI:
    # no retries: each call is exactly one request against the limits
    return openai.AsyncOpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.keys[tenant],
                              max_retries=0)


async def outcomes(stack: TenantStack, tenant: str, model: str, count: int) -> list[Any]:
    """`count` completions at once; each one's status code (503: admitted, nobody served
    it within the timeout) or the error object raised."""
    async with client(stack, tenant) as openai_client:
        results = await asyncio.gather(*(
            openai_client.completions.create(model=model, prompt="Hi", max_tokens=1)
            for _ in range(count)), return_exceptions=True)
    return [result.status_code if isinstance(result, openai.InternalServerError) else result
            for result in results]


def test_the_third_request_in_a_minute_of_a_tenant_limited_to_two_gets_429_and_others_go_on(
    tenant_stack: TenantStack,
) -> None:
    admitted = asyncio.run(outcomes(tenant_stack, "a", tenant_stack.public_model, 2))
    [refused] = asyncio.run(outcomes(tenant_stack, "a", tenant_stack.public_model, 1))
    others = asyncio.run(outcomes(tenant_stack, "b", tenant_stack.public_model, 3))

    assert admitted == [503, 503]
    assert isinstance(refused, openai.RateLimitError)
    assert refused.status_code == 429
    assert 1 <= int(refused.response.headers["retry-after"]) <= 60
    assert (refused.code, refused.type) == ("rate_limit_exceeded", "requests")
    assert others == [503, 503, 503]


def test_a_private_model_is_listed_and_served_for_its_tenant_only(
    tenant_stack: TenantStack,
) -> None:
    async def run() -> dict[str, Any]:
        async with client(tenant_stack, "a") as a, client(tenant_stack, "b") as b:
            results: dict[str, Any] = {
                "listed_a": [model.id async for model in a.models.list()],
                "listed_b": [model.id async for model in b.models.list()]}
            for name, model in (("hidden", tenant_stack.private_model),
                                ("missing", "tenants/no-such-model")):
                try:
                    await b.completions.create(model=model, prompt="Hi", max_tokens=1)
                except openai.NotFoundError as exc:
                    results[name] = exc
            try:
                await b.models.retrieve(tenant_stack.private_model)
            except openai.NotFoundError as exc:
                results["retrieved"] = exc
            return results

    results = asyncio.run(run())

    assert sorted(results["listed_a"]) == sorted([tenant_stack.public_model,
                                                  tenant_stack.private_model])
    assert results["listed_b"] == [tenant_stack.public_model]
    hidden, missing = results["hidden"], results["missing"]
    assert (hidden.status_code, hidden.code, hidden.param) == (404, "model_not_found", "model")
    # word for word the answer about a model that does not exist
    assert hidden.message.replace(tenant_stack.private_model, "M") == \
        missing.message.replace("tenants/no-such-model", "M")
    assert (results["retrieved"].status_code, results["retrieved"].code) == (
        404, "model_not_found")


def test_tenant_changes_are_audited_and_admins_see_the_owner(
    tenant_stack: TenantStack,
) -> None:
    admin(tenant_stack.base_url, "PATCH", "/admin/tenants/b", {"max_tokens_per_minute": 5000})
    described = admin(tenant_stack.base_url, "GET",
                      f"/admin/models/{tenant_stack.private_model}").json()

    events = asyncio.run(audit_events(tenant_stack.nats_url))
    mine = [(event.kind, event.data.get("tenant"), event.data.get("max_tokens_per_minute"))
            for event in events if event.data.get("tenant") in ("a", "b")
            and event.kind.startswith("admin.tenant_")]

    assert described["owner_tenant"] == "a"
    assert ("admin.tenant_created", "a", None) in mine
    assert ("admin.tenant_updated", "b", 5000) in mine
    registered = [event for event in events if event.kind == "admin.model_registered"
                  and event.model == tenant_stack.private_model]
    assert [event.data["owner_tenant"] for event in registered] == ["a"]
