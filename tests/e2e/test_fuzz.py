"""Property-based fuzzing of the gateway's whole HTTP API with schemathesis: requests generated
from the gateway's own OpenAPI schema (`/openapi.json`: the OpenAI routes and the admin API),
sent with the admin key to a real gateway process (PostgreSQL for keys, tenants and models,
a storage service, NATS). Whatever the input, the gateway answers with a 2xx or 4xx; never a
5xx, never a crash. Bounded: a few examples per operation, well under a minute in all.

Completions go to models the database does not know (the generator's names), so they are
refused (404) before the bus; the first-token timeout is short in case one is queued.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.e2e.cluster import admin_gateway
from tests.processes import tail

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-admin-fuzz-0123456789"
EXAMPLES_PER_OPERATION = 50


@pytest.fixture(scope="module")
def fuzz_gateway(nats_url: str, database_url: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[str, Path]]:
    """A gateway with a database and a storage service; its base URL and log."""
    with admin_gateway(nats_url=nats_url, database_url=database_url,
                       workspace=tmp_path_factory.mktemp("fuzz"), admin_key=ADMIN_KEY,
                       env={"HYDRASERVE_GATEWAY__FIRST_TOKEN_TIMEOUT_S": "1",
                            "HYDRASERVE_GATEWAY__INTER_TOKEN_TIMEOUT_S": "1"}) as gateway:
        yield gateway.base_url, gateway.log


def test_no_generated_request_gets_a_server_error(fuzz_gateway: tuple[str, Path]) -> None:
    """Every operation of the schema, EXAMPLES_PER_OPERATION generated cases each (the Python
    API rather than schemathesis' pytest plugin, whose lazy schema does not run on pytest 9)."""
    base_url, log = fuzz_gateway
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: dict[str, str] = {}
    num_operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        num_operations += 1

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                                   checks=[not_a_server_error], timeout=10)

        try:
            fuzz()
        # schemathesis' FailureGroup is a BaseExceptionGroup; one per operation is enough
        except (Exception, BaseExceptionGroup) as exc:
            failures[operation.label] = repr(exc)[:2000]
    assert num_operations >= 15
    assert not failures, f"{failures}\n{tail(log)}"


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/admin/tenants", {"name": "big", "max_concurrent_requests": 2**40}),
    ("DELETE", f"/admin/keys/{2**40}", None),
    ("POST", "/admin/keys", {"tenant": "nul\u0000"}),
    ("POST", "/v1/completions", {"model": "nul\u0000", "prompt": "hi"}),
    ("GET", "/v1/models/nul%00", None),
], ids=["int-overflow-body", "int-overflow-path", "nul-admin-body", "nul-model", "nul-path"])
def test_values_the_database_cannot_take_are_refused_with_a_400(
    fuzz_gateway: tuple[str, Path], method: str, path: str, body: dict[str, object] | None,
) -> None:
    """The 500s the fuzzer found, kept as cases: each is the client's error, named as such."""
    base_url, log = fuzz_gateway
    response = httpx.request(method, f"{base_url}{path}", json=body, timeout=10,
                             headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    assert response.status_code == 400, f"{response.text}\n{tail(log)}"
    assert response.json()["error"]["type"] == "invalid_request_error"
