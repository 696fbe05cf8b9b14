"""Tenants and their limits: the limiter's exact outcomes on a hand-driven clock, the
completion service's lease on every way a request ends, and limits stored in PostgreSQL that a
restarted gateway enforces."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from libs.common.db.migrate import upgrade
from libs.common.errors import HydraError, ServiceUnavailableError
from libs.common.messages import ErrorInfo, GenerateRequest, TokenChunk, Usage
from services.gateway.auth import Identity
from services.gateway.completions import CompletionService
from services.gateway.errors import error_response
from services.gateway.ratelimit import Limits, RateLimiter, RateLimitError
from services.gateway.registry import ModelRegistry
from services.gateway.schemas import CompletionRequest
from tests.processes import free_port, spawn, stop, wait_for_http

pytestmark = pytest.mark.service

ADMIN_KEY = "sk-admin-tenants-0123456789"
TENANT = Identity(key_id="0123456789abcdef", tenant_id=7)
SUBJECT = "tenant:7"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> Clock:
    return Clock()


def refusal(limiter: RateLimiter, limits: Limits, *, prompt_tokens: int = 0) -> RateLimitError:
    with pytest.raises(RateLimitError) as refused:
        limiter.admit(SUBJECT, limits, prompt_tokens=prompt_tokens)
    return refused.value


# --- the limiter ---------------------------------------------------------------------------


def test_n_requests_in_a_minute_pass_and_the_next_waits_for_the_oldest_to_leave_the_window(
    clock: Clock,
) -> None:
    limiter = RateLimiter(Limits(), clock=clock)
    limits = Limits(max_requests_per_minute=3)
    for at in (0.0, 10.0, 20.0):
        clock.now = 1000.0 + at
        limiter.admit(SUBJECT, limits, prompt_tokens=1).release()

    clock.now = 1030.0
    refused = refusal(limiter, limits)
    clock.now = 1060.0
    admitted = limiter.admit(SUBJECT, limits, prompt_tokens=1)

    assert (refused.http_status, refused.code, refused.limit_type, refused.retry_after_s) == (
        429, "rate_limit_exceeded", "requests", 30)
    assert not admitted.is_released


def test_a_refused_request_does_not_count_against_the_window(clock: Clock) -> None:
    limiter = RateLimiter(Limits(), clock=clock)
    limits = Limits(max_requests_per_minute=1)
    limiter.admit(SUBJECT, limits, prompt_tokens=0).release()
    for _ in range(5):
        refusal(limiter, limits)
    clock.now += 60.0
    limiter.admit(SUBJECT, limits, prompt_tokens=0)


def test_prompt_and_completion_tokens_count_against_tokens_per_minute(clock: Clock) -> None:
    limiter = RateLimiter(Limits(), clock=clock)
    limits = Limits(max_tokens_per_minute=100)
    lease = limiter.admit(SUBJECT, limits, prompt_tokens=40)
    clock.now += 5.0
    lease.charge(50)  # the completion, as it streams in
    lease.release()

    clock.now += 5.0
    refused = refusal(limiter, limits, prompt_tokens=20)  # 40 + 50 + 20 > 100
    fits = limiter.admit(SUBJECT, limits, prompt_tokens=10)  # 40 + 50 + 10 = 100

    assert (refused.limit_type, refused.retry_after_s) == ("tokens", 50)
    assert not fits.is_released


def test_a_prompt_larger_than_the_tokens_per_minute_is_refused_even_in_an_empty_window(
    clock: Clock,
) -> None:
    limiter = RateLimiter(Limits(), clock=clock)
    refused = refusal(limiter, Limits(max_tokens_per_minute=10), prompt_tokens=11)
    assert (refused.limit_type, refused.retry_after_s) == ("tokens", 60)
    assert "Request too large" in refused.message


def test_the_concurrency_quota_frees_a_slot_when_a_request_ends_and_only_once(
    clock: Clock,
) -> None:
    limiter = RateLimiter(Limits(), clock=clock)
    limits = Limits(max_concurrent_requests=2)
    first = limiter.admit(SUBJECT, limits, prompt_tokens=0)
    limiter.admit(SUBJECT, limits, prompt_tokens=0)
    refused = refusal(limiter, limits)
    first.release()
    first.release()
    third = limiter.admit(SUBJECT, limits, prompt_tokens=0)

    assert (refused.limit_type, refused.retry_after_s) == ("requests", 1)
    assert not third.is_released
    assert limiter.in_flight(SUBJECT) == 2
    refusal(limiter, limits)


def test_unset_limits_take_the_defaults_and_the_admin_key_is_never_limited(
    clock: Clock,
) -> None:
    limiter = RateLimiter(Limits(max_requests_per_minute=1), clock=clock)
    limiter.admit(SUBJECT, Limits(max_tokens_per_minute=1000), prompt_tokens=1)
    refused = refusal(limiter, Limits(max_tokens_per_minute=1000), prompt_tokens=1)
    for _ in range(10):
        limiter.admit(None, None, prompt_tokens=10**6)
    assert refused.limit_type == "requests"


def test_a_rate_limit_error_answers_429_with_retry_after_and_the_openai_error_object() -> None:
    response = error_response(RateLimitError("slow down", retry_after_s=17,
                                             limit_type="requests"), retry_after_s=5)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "17"
    assert response.body == (b'{"error":{"message":"slow down","type":"requests",'
                             b'"param":null,"code":"rate_limit_exceeded"}}')


# --- the completion service's lease --------------------------------------------------------


class FakeAnswer:
    """An AnswerStream that yields given chunks, optionally raising after them."""

    def __init__(self, chunks: list[TokenChunk], error: Exception | None = None) -> None:
        self._chunks = list(chunks)
        self._error = error
        self.is_closed = False

    def __aiter__(self) -> FakeAnswer:
        return self

    async def __anext__(self) -> TokenChunk:
        if self._chunks:
            return self._chunks.pop(0)
        if self._error is not None:
            raise self._error
        await asyncio.Event().wait()  # a worker that never answers again
        raise AssertionError

    async def close(self) -> None:
        self.is_closed = True


class FakeBroker:
    first_token_timeout_s = 60.0

    def __init__(self, answer: FakeAnswer) -> None:
        self.answer = answer

    async def submit(self, request: GenerateRequest) -> Any:
        return self.answer


def chunks(request_id: str = "r", *, failed: bool = False) -> list[TokenChunk]:
    last = (TokenChunk(request_id=request_id, seq=2, finish_reason="error",
                       error=ErrorInfo(code="internal_error", message="worker crashed"))
            if failed else
            TokenChunk(request_id=request_id, seq=2, text="c", token_ids=[3],
                       finish_reason="length",
                       usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)))
    return [TokenChunk(request_id=request_id, seq=0, text="a", token_ids=[1]),
            TokenChunk(request_id=request_id, seq=1, text="b", token_ids=[2]), last]


def service_with(answer: FakeAnswer, limiter: RateLimiter) -> CompletionService:
    return CompletionService(FakeBroker(answer), ModelRegistry(["m"]),  # type: ignore[arg-type]
                             limiter=limiter)


def body(*, stream: bool) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "12345678",
                                             "max_tokens": 3, "stream": stream})


async def consume(events: AsyncIterator[str] | None, *, stop_after: int | None = None) -> None:
    assert events is not None
    received = 0
    async for _ in events:
        received += 1
        if stop_after is not None and received == stop_after:
            break
    await events.aclose()  # type: ignore[attr-defined]


LIMITED = Limits(max_concurrent_requests=1, max_tokens_per_minute=1000)
IDENTITY = Identity(key_id=TENANT.key_id, tenant_id=7, limits=LIMITED)


@pytest.mark.parametrize("ending", ["answered", "streamed", "failed", "failed while streaming",
                                    "client hung up", "timed out"])
@pytest.mark.anyio
async def test_the_concurrency_slot_is_freed_however_the_request_ends(ending: str) -> None:
    limiter = RateLimiter(Limits())
    failed = ending.startswith("failed")
    error = (ServiceUnavailableError("no first token in time") if ending == "timed out"
             else None)
    answer = FakeAnswer(chunks(failed=failed) if error is None else [], error)
    service = service_with(answer, limiter)
    stream = ending in ("streamed", "failed while streaming", "client hung up")

    async with asyncio.timeout(10):
        try:
            reply = await service.complete(body(stream=stream), IDENTITY, request_id="r")
        except HydraError:  # the failure itself is not under test
            reply = None
        if reply is not None and reply.events is not None:
            assert limiter.in_flight(SUBJECT) == 1
            await consume(reply.events, stop_after=1 if ending == "client hung up" else None)

    assert answer.is_closed
    assert limiter.in_flight(SUBJECT) == 0


@pytest.mark.anyio
async def test_an_answer_charges_its_completion_tokens_and_the_prompt_beyond_its_estimate(
) -> None:
    clock = Clock()
    limiter = RateLimiter(Limits(), clock=clock)
    limits = Limits(max_tokens_per_minute=10)
    identity = Identity(key_id=TENANT.key_id, tenant_id=7, limits=limits)
    service = service_with(FakeAnswer(chunks()), limiter)

    # prompt "12345678" is estimated at 2 tokens; the answer has 3: 5 of 10 used
    await service.complete(body(stream=False), identity, request_id="r")
    limiter.admit(SUBJECT, limits, prompt_tokens=5).release()
    refused = refusal(limiter, limits, prompt_tokens=1)

    assert refused.limit_type == "tokens"


@pytest.mark.anyio
async def test_a_refused_request_is_never_queued() -> None:
    answer = FakeAnswer(chunks())
    limiter = RateLimiter(Limits())
    identity = Identity(key_id=TENANT.key_id, tenant_id=7,
                        limits=Limits(max_requests_per_minute=1))
    service = service_with(answer, limiter)
    await service.complete(body(stream=False), identity, request_id="r1")
    answer.is_closed = False

    with pytest.raises(RateLimitError):
        await service.complete(body(stream=False), identity, request_id="r2")
    assert not answer.is_closed


# --- limits stored in PostgreSQL, across a gateway restart ---------------------------------


def start_gateway(tmp_path: Path, nats_url: str, db_url: str, log: str
                  ) -> tuple[str, Any]:
    base_url = f"http://127.0.0.1:{free_port()}"
    process = spawn([sys.executable, "-m", "services.gateway"], tmp_path / log, env={
        "HYDRASERVE_NATS__URL": nats_url, "HYDRASERVE_DATABASE__URL": db_url,
        "HYDRASERVE_GATEWAY__PORT": base_url.rsplit(":", 1)[1],
        "HYDRASERVE_GATEWAY__ADMIN_KEY": ADMIN_KEY,
        "HYDRASERVE_GATEWAY__DEFAULT_MAX_REQUESTS_PER_MINUTE": "100"})
    wait_for_http(f"{base_url}/health", process, tmp_path / log)
    return base_url, process


@pytest.fixture
def migrated_database(fresh_database_url: str) -> Iterator[str]:
    upgrade(fresh_database_url)
    yield fresh_database_url


def add_model(db_url: str, name: str) -> None:
    import asyncpg

    async def insert() -> None:
        dsn = make_url(db_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        connection = await asyncpg.connect(dsn, timeout=10)
        try:
            await connection.execute(
                "INSERT INTO models (name, architecture, family, num_layers, size_bytes, "
                "storage_path, ttft_slo_ms, tpot_slo_ms, keep_alive_s) VALUES "
                "($1, 'LlamaForCausalLM', 'llama', 2, 1000, 'nowhere', 1000, 100, 30)", name)
        finally:
            await connection.close()

    asyncio.run(insert())


def test_tenant_limits_set_through_the_admin_api_survive_a_gateway_restart(
    tmp_path: Path, nats_url: str, migrated_database: str,
) -> None:
    add_model(migrated_database, "tiny")
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    base_url, gateway = start_gateway(tmp_path, nats_url, migrated_database, "first.log")
    try:
        created = httpx.post(f"{base_url}/admin/tenants", headers=admin, json={
            "name": "acme", "max_requests_per_minute": 5, "max_concurrent_requests": 2})
        updated = httpx.patch(f"{base_url}/admin/tenants/acme", headers=admin,
                              json={"max_tokens_per_minute": 10,
                                    "max_concurrent_requests": None})
        issued = httpx.post(f"{base_url}/admin/tenants/acme/keys", headers=admin,
                            json={"name": "ci"})
        duplicate = httpx.post(f"{base_url}/admin/tenants", headers=admin,
                               json={"name": "acme"})
        missing = httpx.post(f"{base_url}/admin/tenants/nobody/keys", headers=admin, json={})
    finally:
        stop(gateway)
    base_url, gateway = start_gateway(tmp_path, nats_url, migrated_database, "second.log")
    try:
        described = httpx.get(f"{base_url}/admin/tenants/acme", headers=admin)
        # about 25 tokens of prompt against a limit of 10 a minute: refused before queueing
        refused = httpx.post(f"{base_url}/v1/completions", json={
            "model": "tiny", "prompt": "x" * 100, "max_tokens": 1},
            headers={"Authorization": f"Bearer {issued.json()['key']}"})
    finally:
        stop(gateway)

    assert created.status_code == 201, created.text
    assert updated.status_code == 200, updated.text
    assert (issued.status_code, issued.json()["tenant"]) == (201, "acme")
    assert (duplicate.status_code, duplicate.json()["error"]["code"]) == (409, "conflict")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")
    limits = {key: value for key, value in described.json().items()
              if key.startswith("max_")}
    assert limits == {"max_requests_per_minute": 5, "max_tokens_per_minute": 10,
                      "max_concurrent_requests": None}
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    assert {key: refused.json()["error"][key] for key in ("type", "code", "param")} == {
        "type": "tokens", "code": "rate_limit_exceeded", "param": None}
