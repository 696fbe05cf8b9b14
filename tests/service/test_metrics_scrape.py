"""Metrics and tracing against real NATS: a real worker process (`--metrics-port`) and a real
gateway answer one completion from the `openai` client, and both count it exactly once; the
gateway's request message carries its span's trace context to whoever pulls it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import openai
import pytest
from nats.js.api import DeliverPolicy
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.parser import text_string_to_metric_families

from libs.common.bus import ensure_request_consumer, ensure_streams
from libs.common.messages import Event, EventKind, GenerateRequest
from libs.common.settings import BusSettings
from libs.common.subjects import REQUESTS_STREAM, event_subject
from libs.common.tracing import TRACEPARENT_HEADER, extract_context
from services.gateway.broker import RequestBroker
from tests.processes import START_TIMEOUT_S, free_port, spawn, stop, tail, wait_for_http

pytestmark = pytest.mark.service

API_KEY = "sk-metrics-test-0123456789"
MAX_TOKENS = 5


@dataclass(frozen=True)
class Stack:
    base_url: str
    worker_metrics_url: str
    model: str


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) -> value of every sample `url` exposes."""
    text = httpx.get(url, timeout=5.0).raise_for_status().text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def wait_for_sample(url: str, name: str, expected: float, **labels: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while (value := sample(scrape(url), name, **labels)) != expected:
        assert time.monotonic() < deadline, f"{name}{labels} is {value}, not {expected}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(nats_url: str, demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    logs = tmp_path_factory.mktemp("metrics-logs")
    model = f"hydra/metrics-{uuid.uuid4().hex[:6]}"
    worker_port, gateway_port = free_port(), free_port()
    worker = spawn([sys.executable, "-m", "services.worker", "--model-dir", str(demo_model_dir),
                    "--model", model, "--nats", nats_url, "--capacity", "2",
                    "--metrics-port", str(worker_port)], logs / "worker.log",
                   env={"HYDRASERVE_LOG_FORMAT": "json"})
    gateway = spawn([sys.executable, "-m", "services.gateway"], logs / "gateway.log", env={
        "HYDRASERVE_NATS__URL": nats_url,
        "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
        "HYDRASERVE_GATEWAY__PORT": str(gateway_port),
        "HYDRASERVE_GATEWAY__API_KEYS": json.dumps([API_KEY]),
        "HYDRASERVE_GATEWAY__MODELS": json.dumps([model]),
        "HYDRASERVE_LOG_FORMAT": "json",
    })
    result = Stack(base_url=f"http://127.0.0.1:{gateway_port}",
                   worker_metrics_url=f"http://127.0.0.1:{worker_port}/metrics", model=model)
    try:
        wait_for_http(result.worker_metrics_url, worker, logs / "worker.log")
        # ready once its start-up phases are recorded
        wait_for_sample(result.worker_metrics_url, "hydraserve_worker_startup_phase_seconds_count",
                        1.0, phase="total")
        wait_for_http(f"{result.base_url}/health", gateway, logs / "gateway.log")
        yield result
    finally:
        stop(gateway)
        stop(worker)
        print(tail(logs / "gateway.log"), tail(logs / "worker.log"), sep="\n")


def test_one_completion_is_counted_once_by_the_gateway_and_the_worker(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=API_KEY, max_retries=0)
    completion = client.completions.create(model=stack.model, prompt="the cat",
                                           max_tokens=MAX_TOKENS, temperature=0.0)
    assert completion.usage is not None and completion.usage.completion_tokens == MAX_TOKENS

    # /metrics is open: no API key
    gateway = scrape(f"{stack.base_url}/metrics")
    assert sample(gateway, "hydraserve_requests_total", model=stack.model, status="200") == 1.0
    assert sample(gateway, "hydraserve_ttft_seconds_count", model=stack.model) == 1.0
    assert sample(gateway, "hydraserve_tpot_seconds_count", model=stack.model) == 1.0
    assert sample(gateway, "hydraserve_e2e_latency_seconds_count", model=stack.model) == 1.0
    assert sample(gateway, "hydraserve_requests_in_flight") == 0.0

    # the worker counts it after acking, which may come after the gateway has answered
    wait_for_sample(stack.worker_metrics_url, "hydraserve_worker_requests_total", 1.0,
                    model=stack.model, finish_reason="length")
    worker = scrape(stack.worker_metrics_url)
    assert sample(worker, "hydraserve_generated_tokens_total", model=stack.model) == MAX_TOKENS
    # one prefill step and one decode step per generated token after the first
    assert sample(worker, "hydraserve_engine_step_duration_seconds_count") == MAX_TOKENS
    assert {phase for (name, labels) in worker
            if name == "hydraserve_worker_startup_phase_seconds_count"
            for key, phase in labels if key == "phase"} == {"imports", "load", "total"}


def test_a_request_refused_before_queueing_is_counted_without_a_model(stack: Stack) -> None:
    before = sample(scrape(f"{stack.base_url}/metrics"), "hydraserve_requests_total",
                    model="", status="401") or 0.0
    response = httpx.post(f"{stack.base_url}/v1/completions",
                          json={"model": "made-up", "prompt": "x"},
                          headers={"Authorization": "Bearer sk-wrong"})
    assert response.status_code == 401
    after = scrape(f"{stack.base_url}/metrics")
    assert sample(after, "hydraserve_requests_total", model="", status="401") == before + 1
    assert sample(after, "hydraserve_requests_total", model="made-up", status="401") is None


@pytest.mark.anyio
async def test_the_queued_request_carries_the_gateway_span_to_the_worker_and_scheduler(
        nats_url: str) -> None:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    model = f"hydra/traced-{uuid.uuid4().hex[:6]}"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, BusSettings())
        events = await js.subscribe(event_subject(EventKind.REQUEST_RECEIVED, model),
                                    ordered_consumer=True, deliver_policy=DeliverPolicy.NEW)
        # pulled as a worker pulls it
        requests = await js.pull_subscribe_bind(
            durable=await ensure_request_consumer(js, model, ack_wait_s=30.0, max_deliver=1),
            stream=REQUESTS_STREAM)
        broker = RequestBroker(nc, first_token_timeout_s=5.0, inter_token_timeout_s=5.0)
        with trace.get_tracer("test").start_as_current_span("gateway.request") as span:
            answer = await broker.submit(GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex}",
                                                         model=model, prompt="hi"))
        await answer.close()
        trace_id = span.get_span_context().trace_id
        async with asyncio.timeout(10):
            (queued,) = await requests.fetch(1, timeout=10)
            received = Event.model_validate_json((await events.next_msg(timeout=10)).data)
        assert queued.headers is not None
        pulled_context = trace.get_current_span(extract_context(queued.headers))
        assert pulled_context.get_span_context().trace_id == trace_id
        assert pulled_context.get_span_context().span_id == span.get_span_context().span_id
        assert received.data[TRACEPARENT_HEADER] == queued.headers[TRACEPARENT_HEADER]
        await queued.term()
    finally:
        await nc.close()
