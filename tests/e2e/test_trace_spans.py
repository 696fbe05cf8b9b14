"""One request, one trace across every service: the real cluster (storage, scheduler, a node
agent, the gateway; the worker the agent launches) writes its spans to one file
(HYDRASERVE_TRACE_FILE), the `openai` client sends one cold-start request, and every
HydraServe span of every process is in that request's trace, each under the parent the path
implies (FastAPI's own HTTP spans, where it makes them, sit in between and are skipped)."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from libs.common.tracing import TRACE_FILE_ENV
from services.prefetcher.fetch import MODEL_FILES
from tests.conftest import temporary_database
from tests.e2e.cluster import ColdStack, cluster, logs_of
from tests.e2e.conftest import USER_KEY

pytestmark = pytest.mark.e2e

SPANS_TIMEOUT_S = 30.0
# (service, span, parent span) of one cold start, storage reads apart
COLD_START_TREE = Counter([
    ("hydraserve-gateway", "gateway.request", None),
    ("hydraserve-scheduler", "scheduler.decide", "gateway.request"),
    ("hydraserve-prefetcher", "prefetcher.fetch", "scheduler.decide"),
    ("hydraserve-prefetcher", "prefetcher.launch", "scheduler.decide"),
    ("hydraserve-worker", "worker.startup", "prefetcher.launch"),
    ("hydraserve-worker", "imports", "worker.startup"),
    ("hydraserve-worker", "load", "worker.startup"),
    ("hydraserve-worker", "worker.request", "gateway.request"),
    ("hydraserve-worker", "queue_wait", "worker.request"),
    ("hydraserve-worker", "prefill", "worker.request"),
    ("hydraserve-worker", "decode", "worker.request"),
])
OUR_SPANS = {name for _, name, _ in COLD_START_TREE} | {"storage.read"}


@pytest.fixture(scope="module")
def traced_stack(nats_url: str, database_url: str, demo_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ColdStack, Path]]:
    workspace = tmp_path_factory.mktemp("traced")
    spans_file = workspace / "spans.jsonl"
    with (temporary_database(database_url, "hs_trace") as db_url,
          pytest.MonkeyPatch.context() as env):
        # every process of the cluster inherits it (the worker, from its node agent)
        env.setenv(TRACE_FILE_ENV, str(spans_file))
        with cluster(nats_url=nats_url, database_url=db_url, model_dir=demo_model_dir,
                     workspace=workspace, name="demo-trace",
                     node_names=("node-a",)) as stack:
            yield stack, spans_file


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for_spans(stack: ColdStack, path: Path, names: set[str]) -> list[dict[str, Any]]:
    """The file's spans once every one of `names` is among them."""
    deadline = time.monotonic() + SPANS_TIMEOUT_S
    while True:
        spans = read_spans(path)
        missing = names - {span["name"] for span in spans}
        if not missing:
            return spans
        if time.monotonic() > deadline:
            pytest.fail(f"spans {missing} not written; logs:\n{logs_of(stack)}")
        time.sleep(0.1)


def service_of(span: dict[str, Any]) -> str:
    return span["resource"]["attributes"]["service.name"]


def our_parent(span: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str | None:
    """The name of the nearest ancestor that is a HydraServe span, past the framework's own
    (FastAPI traces its HTTP requests itself: `POST /v1/completions`, `fastapi.endpoint`)."""
    while (parent := by_id.get(span["parent_id"] or "")) is not None:
        if parent["name"] in OUR_SPANS:
            return str(parent["name"])
        span = parent
    return None


def test_a_cold_start_request_is_one_trace_through_gateway_scheduler_agent_storage_and_worker(
    traced_stack: tuple[ColdStack, Path], demo_model_dir: Path,
) -> None:
    stack, spans_file = traced_stack
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=USER_KEY, max_retries=0,
                           timeout=60)

    client.completions.create(model=stack.model, prompt="Once upon a time", max_tokens=4,
                              temperature=0)

    spans = wait_for_spans(stack, spans_file, {name for _, name, _ in COLD_START_TREE})
    (request_trace,) = {s["context"]["trace_id"] for s in spans if s["name"] == "gateway.request"}
    assert {service_of(s) for s in spans if s["context"]["trace_id"] == request_trace} == {
        "hydraserve-gateway", "hydraserve-scheduler", "hydraserve-prefetcher",
        "hydraserve-storage", "hydraserve-worker"}
    ours = [s for s in spans if s["name"] in OUR_SPANS]
    # nothing of ours was traced apart: every HydraServe span is in the request's trace
    assert {s["context"]["trace_id"] for s in ours} == {request_trace}
    by_id = {s["context"]["span_id"]: s for s in spans}
    reads = [s for s in ours if s["name"] == "storage.read"]
    tree = Counter((service_of(s), s["name"], our_parent(s, by_id)) for s in ours)
    assert tree == COLD_START_TREE + Counter(
        {("hydraserve-storage", "storage.read", "prefetcher.fetch"): len(reads)})

    # the storage reads are the whole fetch: description, manifest, model files, then the
    # partition's data in ranges that tile it after the header
    model = stack.model
    (fetch,) = (s for s in ours if s["name"] == "prefetcher.fetch")
    data_path = f"/models/{model}/partitions/1/0/data"
    files = {f"/models/{model}/files/{name}" for name in MODEL_FILES
             if (demo_model_dir / name).exists()}
    assert {r["attributes"]["http.target"] for r in reads} == {
        f"/models/{model}", f"/models/{model}/partitions/1/0/manifest", data_path, *files}
    assert {r["attributes"]["http.status_code"] for r in reads} <= {200, 206}
    data_reads = [r["attributes"] for r in reads if r["attributes"]["http.target"] == data_path]
    ranges = sorted(tuple(int(x) for x in r["hydraserve.range"].removeprefix("bytes=")
                          .split("-")) for r in data_reads)
    assert all(end + 1 == start for (_, end), (start, _) in itertools.pairwise(ranges))
    assert ranges[-1][1] + 1 == fetch["attributes"]["hydraserve.num_bytes"]
    assert sum(r["hydraserve.num_bytes"] for r in data_reads) == ranges[-1][1] + 1 - ranges[0][0]
