"""Metrics definitions, the Grafana dashboard, JSON log lines and trace context propagation."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import Counter
from prometheus_client.metrics import MetricWrapperBase

from libs.common import metrics
from libs.common.logging import JsonFormatter, RequestContextFilter, set_request_id
from libs.common.messages import GenerateRequest, TokenChunk, Usage
from libs.common.tracing import TRACEPARENT_HEADER, extract_context, inject_headers, traceparent
from services.worker.observe import record_request
from services.worker.protocol import RequestProgress

pytestmark = pytest.mark.unit

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "hydraserve-dashboard.json"


def _defined_metrics() -> dict[str, MetricWrapperBase]:
    """Exposed family name -> metric object, for every metric libs/common/metrics.py defines."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            name = f"{family.name}_total" if isinstance(value, Counter) else family.name
            found[name] = value
    return found


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider, exporting to memory (set once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def test_every_metric_is_listed_and_prefixed() -> None:
    defined = _defined_metrics()
    assert set(defined) == metrics.METRIC_NAMES
    assert all(name.startswith("hydraserve_") for name in defined)


def test_dashboard_queries_use_only_defined_metrics_and_plot_them_all() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = set().union(*(metrics.exposed_names(name) for name in metrics.METRIC_NAMES))
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"\bhydraserve_[a-z0-9_]+\b", expr)}
    assert exprs and used <= exposed, sorted(used - exposed)
    plotted = {name for name in metrics.METRIC_NAMES if metrics.exposed_names(name) & used}
    assert plotted == metrics.METRIC_NAMES


def test_dashboard_is_a_grafana_10_dashboard_with_unique_panel_ids() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] == "hydraserve-overview"
    assert len(ids) == len(set(ids))
    assert all(panel["datasource"]["type"] == "prometheus" for panel in dashboard["panels"]
               if panel["type"] != "row")


def test_json_log_lines_carry_the_request_id_of_their_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter("worker"))
    logger = logging.getLogger("test_metrics.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        set_request_id("cmpl-abc")
        logger.warning("handing back %s", "cmpl-abc")
        set_request_id(None)
        logger.warning("no request")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["request_id"] == "cmpl-abc" and first["message"] == "handing back cmpl-abc"
    assert first["level"] == "WARNING" and first["service"] == "worker"
    assert first["logger"] == "test_metrics.json"
    assert second["request_id"] is None


def test_without_a_span_no_trace_context_is_injected() -> None:
    assert inject_headers({"Nats-Msg-Id": "x"}) == {"Nats-Msg-Id": "x"}


def test_trace_context_survives_inject_and_extract(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("gateway.request") as gateway_span:
        headers = inject_headers({"Nats-Msg-Id": "cmpl-1"})
        assert traceparent() == headers[TRACEPARENT_HEADER]
    gateway_context = gateway_span.get_span_context()
    assert headers[TRACEPARENT_HEADER].startswith(
        f"00-{gateway_context.trace_id:032x}-{gateway_context.span_id:016x}-")
    with tracer.start_as_current_span("worker", context=extract_context(headers)) as child:
        assert child.get_span_context().trace_id == gateway_context.trace_id
    assert child.parent is not None and child.parent.span_id == gateway_context.span_id


def test_a_finished_request_records_queue_prefill_and_decode_spans_under_the_gateway_span(
        spans: InMemorySpanExporter) -> None:
    spans.clear()
    with trace.get_tracer("test").start_as_current_span("gateway.request") as gateway_span:
        headers = inject_headers()
    request = GenerateRequest(request_id="cmpl-2", model="m", prompt="hi", created=100.0)
    progress = RequestProgress(request, worker_id="w1", pulled_at=100.5,
                               first_token_at=101.0, finished_at=102.0)
    last = TokenChunk(request_id="cmpl-2", seq=3, finish_reason="length",
                      usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5))
    before = metrics.GENERATED_TOKENS.labels(model="m")._value.get()
    record_request(progress, last, context=extract_context(headers))
    by_name = {span.name: span for span in spans.get_finished_spans()}
    request_span = by_name["worker.request"]
    trace_id = gateway_span.get_span_context().trace_id
    assert request_span.parent.span_id == gateway_span.get_span_context().span_id
    assert {name: (span.start_time, span.end_time) for name, span in by_name.items()
            if name in ("queue_wait", "prefill", "decode")} == {
        "queue_wait": (100_000_000_000, 100_500_000_000),
        "prefill": (100_500_000_000, 101_000_000_000),
        "decode": (101_000_000_000, 102_000_000_000)}
    assert all(span.context.trace_id == trace_id for span in by_name.values())
    assert all(by_name[name].parent.span_id == request_span.context.span_id
               for name in ("queue_wait", "prefill", "decode"))
    assert metrics.GENERATED_TOKENS.labels(model="m")._value.get() == before + 3


def test_a_decision_counts_its_cold_start_and_sets_the_queue_depth() -> None:
    from services.scheduler import events as policy_events
    from services.scheduler.observe import record_decision
    from services.scheduler.state import ClusterState, ModelSpec, Request

    model = "m-observe"
    before = ClusterState()
    spec = ModelSpec(model, size_bytes=1, num_layers=2, kv_cache_bytes=0, ttft_slo_s=1.0,
                     tpot_slo_s=1.0, max_pipeline_degree=2, keep_alive_s=1.0)
    after = ClusterState(models={model: spec},
                         requests={"r1": Request("r1", model, 1.0),
                                   "r2": Request("r2", model, 2.0, worker_id=7)})
    place = policy_events.PlaceWorker(
        worker_id=1, endpoint_id=1, node_id="n-observe", model=model, pipeline_degree=2,
        stage=0, start_layer=0, end_layer=2, gpu_memory_bytes=1, is_full_size=True)
    cold_starts = metrics.COLD_STARTS.labels(policy="hydraserve", degree="2")
    scale_outs = metrics.SCALE_OUTS.labels(policy="hydraserve", degree="2")
    placements = metrics.PLACEMENTS.labels(node="n-observe")
    cold_before, scaled_before = cold_starts._value.get(), scale_outs._value.get()
    placed_before = placements._value.get()
    extra = dataclasses.replace(place, worker_id=3, endpoint_id=2, is_scale_out=True)
    record_decision(before, after, [place, dataclasses.replace(place, stage=1), extra],
                    policy="hydraserve")
    assert cold_starts._value.get() == cold_before + 1
    assert scale_outs._value.get() == scaled_before + 1
    assert placements._value.get() == placed_before + 3
    assert metrics.QUEUED_REQUESTS.labels(model=model)._value.get() == 1
