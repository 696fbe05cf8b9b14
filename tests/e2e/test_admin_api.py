"""The admin API end to end: a real storage service, PostgreSQL, NATS and gateway process.

Registration imports a model folder into storage and writes its `models` and `partitions`
rows; bad registrations are refused with a named OpenAI error object; keys issued through the
API work on `/v1/*` until revoked; every admin change leaves an audit event.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from hydraserve.cli import main
from tests.e2e.cluster import admin_gateway, audit_events

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-admin-admin-api-0123456789"


@dataclass(frozen=True)
class AdminStack:
    base_url: str
    nats_url: str
    # asyncpg DSN of the gateway's database
    dsn: str
    model: str


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _sql(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await connection.fetch(sql, *args))
    finally:
        await connection.close()



@pytest.fixture(scope="module")
def admin_stack(nats_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[AdminStack]:
    with admin_gateway(nats_url=nats_url, database_url=database_url,
                       workspace=tmp_path_factory.mktemp("admin-api"),
                       admin_key=ADMIN_KEY) as gateway:
        yield AdminStack(gateway.base_url, nats_url, _dsn(gateway.database_url),
                         f"hydra/demo-{uuid.uuid4().hex[:6]}")


def call(stack: AdminStack, method: str, path: str, body: Any = None, *,
         key: str = ADMIN_KEY) -> httpx.Response:
    return httpx.request(method, f"{stack.base_url}{path}", json=body, timeout=120,
                         headers={"Authorization": f"Bearer {key}"})


def registration(name: str, path: Path | str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "path": str(path), "ttft_slo_ms": 2000, "tpot_slo_ms": 100,
            "max_pipeline_degree": 2, "keep_alive_s": 30, **fields}


def error_of(response: httpx.Response) -> tuple[int, str | None, str | None]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return response.status_code, error["code"], error["param"]


@pytest.fixture(scope="module")
def registered(admin_stack: AdminStack, demo_model_dir: Path) -> httpx.Response:
    return call(admin_stack, "POST", "/admin/models",
                registration(admin_stack.model, demo_model_dir))


def test_registering_the_demo_model_answers_201_and_writes_its_rows(
    admin_stack: AdminStack, registered: httpx.Response,
) -> None:
    assert registered.status_code == 201, registered.text
    body = registered.json()
    assert (body["name"], body["architecture"], body["family"]) == (
        admin_stack.model, "LlamaForCausalLM", "llama")
    assert [(p["degree"], p["stage"]) for p in body["partitions"]] == [(1, 0), (2, 0), (2, 1)]
    # `/` is not allowed in a store name: the store keeps it under its encoded name
    assert body["storage_path"].endswith("/models/" + admin_stack.model.replace("/", "_2F"))
    models = asyncio.run(_sql(admin_stack.dsn, "SELECT id, ttft_slo_ms, max_pipeline_degree "
                              "FROM models WHERE name = $1", admin_stack.model))
    assert [(m["ttft_slo_ms"], m["max_pipeline_degree"]) for m in models] == [(2000, 2)]
    parts = asyncio.run(_sql(admin_stack.dsn, "SELECT degree, stage, manifest FROM partitions "
                             "WHERE model_id = $1 ORDER BY degree, stage", models[0]["id"]))
    assert [(p["degree"], p["stage"]) for p in parts] == [(1, 0), (2, 0), (2, 1)]
    assert json.loads(parts[0]["manifest"])["tensors"]


@pytest.mark.parametrize(("case", "expected"), [
    ("missing folder", (422, "model_format_error", "path")),
    ("unsupported architecture", (422, "unsupported_model", None)),
    ("duplicate", (409, "conflict", "name")),
    ("max_pipeline_degree 5", (400, None, "max_pipeline_degree")),
])
def test_a_bad_registration_is_refused_with_a_named_error(
    admin_stack: AdminStack, registered: httpx.Response, demo_model_dir: Path,
    tmp_path: Path, case: str, expected: tuple[int, str | None, str | None],
) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    body = registration(name, demo_model_dir)
    if case == "missing folder":
        body["path"] = str(tmp_path / "nowhere")
    elif case == "unsupported architecture":
        folder = shutil.copytree(demo_model_dir, tmp_path / "gpt2")
        config = json.loads((folder / "config.json").read_text())
        config["architectures"] = ["GPT2LMHeadModel"]
        (folder / "config.json").write_text(json.dumps(config))
        body["path"] = str(folder)
    elif case == "duplicate":
        body["name"] = admin_stack.model
    else:
        body["max_pipeline_degree"] = 5

    response = call(admin_stack, "POST", "/admin/models", body)

    assert error_of(response) == expected
    if case == "unsupported architecture":
        assert "GPT2LMHeadModel" in response.json()["error"]["message"]
    listed = call(admin_stack, "GET", "/admin/models").json()["data"]
    assert name not in [model["name"] for model in listed]


def test_models_are_listed_described_and_deleted(
    admin_stack: AdminStack, demo_model_dir: Path,
) -> None:
    name = f"hydra/short-lived-{uuid.uuid4().hex[:6]}"
    assert call(admin_stack, "POST", "/admin/models",
                registration(name, demo_model_dir)).status_code == 201

    listed = [model["name"] for model in call(admin_stack, "GET", "/admin/models").json()["data"]]
    described = call(admin_stack, "GET", f"/admin/models/{name}")
    deleted = call(admin_stack, "DELETE", f"/admin/models/{name}")
    after = call(admin_stack, "GET", f"/admin/models/{name}")

    assert name in listed
    assert (described.status_code, described.json()["name"]) == (200, name)
    assert deleted.status_code == 204
    assert error_of(after) == (404, "not_found", "name")


def test_cluster_state_routes_answer_empty_lists_without_a_scheduler(
    admin_stack: AdminStack,
) -> None:
    for route in ("nodes", "endpoints", "workers"):
        response = call(admin_stack, "GET", f"/admin/{route}")
        assert (response.status_code, response.json()) == (200, {"data": []})


def test_an_issued_key_sees_the_registered_model_until_it_is_revoked(
    admin_stack: AdminStack, registered: httpx.Response,
) -> None:
    issued = call(admin_stack, "POST", "/admin/keys", {"tenant": "team-a", "name": "ci"})
    assert issued.status_code == 201
    key, key_id = issued.json()["key"], issued.json()["id"]

    models = call(admin_stack, "GET", "/v1/models", key=key)
    on_admin = call(admin_stack, "GET", "/admin/models", key=key)
    revoked = call(admin_stack, "DELETE", f"/admin/keys/{key_id}")
    after = call(admin_stack, "GET", "/v1/models", key=key)

    assert models.status_code == 200
    assert admin_stack.model in [model["id"] for model in models.json()["data"]]
    assert error_of(on_admin) == (403, "permission_denied", None)
    assert revoked.status_code == 204
    assert error_of(after) == (401, "invalid_api_key", None)
    hashes = asyncio.run(_sql(admin_stack.dsn, "SELECT key_hash FROM api_keys WHERE id = $1",
                              key_id))
    assert key not in hashes[0]["key_hash"] and len(hashes[0]["key_hash"]) == 64


def test_every_admin_change_publishes_an_audit_event(
    admin_stack: AdminStack, demo_model_dir: Path,
) -> None:
    name = f"hydra/audited-{uuid.uuid4().hex[:6]}"
    call(admin_stack, "POST", "/admin/models", registration(name, demo_model_dir))
    call(admin_stack, "DELETE", f"/admin/models/{name}")
    key_id = call(admin_stack, "POST", "/admin/keys", {"tenant": "audited"}).json()["id"]
    call(admin_stack, "DELETE", f"/admin/keys/{key_id}")

    events = asyncio.run(audit_events(admin_stack.nats_url))

    mine = [(e.kind, e.model, e.data.get("api_key_id"), e.data["actor"]) for e in events
            if e.model == name or e.data.get("api_key_id") == key_id]
    assert mine == [("admin.model_registered", name, None, "admin"),
                    ("admin.model_deleted", name, None, "admin"),
                    ("admin.key_issued", None, key_id, "admin"),
                    ("admin.key_revoked", None, key_id, "admin")]


def test_the_models_cli_registers_lists_describes_and_deletes_through_the_api(
    admin_stack: AdminStack, demo_model_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    name = f"hydra/cli-{uuid.uuid4().hex[:6]}"
    api = ["--api", admin_stack.base_url, "--admin-key", ADMIN_KEY]

    assert main(["models", "register", name, str(demo_model_dir), "--ttft-slo-ms", "1500",
                 "--tpot-slo-ms", "80", "--max-pipeline-degree", "1", *api]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert main(["models", "list", *api]) == 0
    listed = capsys.readouterr().out
    assert main(["models", "describe", name, *api]) == 0
    described = json.loads(capsys.readouterr().out)
    assert main(["models", "delete", name, *api]) == 0
    capsys.readouterr()
    assert main(["models", "describe", name, *api]) == 1

    assert (registered["name"], registered["max_pipeline_degree"]) == (name, 1)
    assert name in listed.split()
    assert [(p["degree"], p["stage"]) for p in described["partitions"]] == [(1, 0)]
    assert f"model {name!r} is not registered (not_found)" in capsys.readouterr().err


def test_the_models_cli_registers_a_model_private_to_a_tenant_and_refuses_an_unknown_one(
    admin_stack: AdminStack, demo_model_dir: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = f"cli-team-{uuid.uuid4().hex[:6]}"
    call(admin_stack, "POST", "/admin/keys", {"tenant": tenant, "name": "ci"})
    name = f"hydra/private-{uuid.uuid4().hex[:6]}"
    api = ["--api", admin_stack.base_url, "--admin-key", ADMIN_KEY]
    register = ["models", "register", name, str(demo_model_dir), "--ttft-slo-ms", "1500",
                "--tpot-slo-ms", "80", "--max-pipeline-degree", "1", "--kv-cache-gb", "0.5"]

    assert main([*register, "--owner-tenant", "no-such-team", *api]) == 1
    refused = capsys.readouterr().err
    assert main([*register, "--owner-tenant", tenant, *api]) == 0
    registered = json.loads(capsys.readouterr().out)
    assert main(["models", "delete", name, *api]) == 0

    assert "tenant 'no-such-team' does not exist" in refused
    assert (registered["owner_tenant"], registered["kv_cache_bytes"]) == (tenant, 1 << 29)
