"""The single-worker cold start end to end: storage (demo model imported), scheduler, two node
agents and the gateway as real processes over real NATS and PostgreSQL; the `openai` client
asks for a model no worker serves -> placed -> fetched while the worker starts -> answered;
then warm; then scaled to zero after its keep-alive, and cold-started again from the node's
host-memory cache."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from libs.common.messages import EventKind
from tests.conftest import temporary_database
from tests.e2e.cluster import ColdStack, cluster, greedy_text, kinds, timeline, wait_for_events
from tests.e2e.conftest import USER_KEY

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
KEEP_ALIVE_S = 3.0
NODE_IDS = ("node-a", "node-b")
COLD_START_ORDER = [EventKind.REQUEST_RECEIVED, EventKind.WORKER_PLACED,
                    EventKind.FETCH_STARTED, EventKind.WORKER_STARTED, EventKind.WORKER_READY,
                    EventKind.REQUEST_FIRST_TOKEN]


@pytest.fixture(scope="module")
def cold_database_url(database_url: str) -> Iterator[str]:
    with temporary_database(database_url, "hs_cold") as url:
        yield url


@pytest.fixture(scope="module")
def cold_stack(nats_url: str, cold_database_url: str, demo_model_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ColdStack]:
    with cluster(nats_url=nats_url, database_url=cold_database_url, model_dir=demo_model_dir,
                 workspace=tmp_path_factory.mktemp("cold"), name="demo-cold",
                 node_names=NODE_IDS, scheduler_args=["--keep-alive", str(KEEP_ALIVE_S)],
                 cache_gb=1.0) as stack:
        yield stack


@pytest.fixture
def client(cold_stack: ColdStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cold_stack.base_url}/v1", api_key=USER_KEY,
                         max_retries=0, timeout=60)


def complete(client: openai.OpenAI, stack: ColdStack) -> tuple[str, float]:
    started = time.monotonic()
    response = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=12,
                                         temperature=0)
    return response.choices[0].text, time.monotonic() - started


def test_a_request_for_a_model_without_workers_cold_starts_one_and_gets_the_greedy_answer(
    client: openai.OpenAI, cold_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    text, seconds = complete(client, cold_stack)

    assert text == greedy_text(reference_engine, PROMPT, 12)
    events = wait_for_events(cold_stack, lambda es: bool(kinds(es, EventKind.REQUEST_DONE)))
    firsts = [next(i for i, e in enumerate(events) if e.kind == kind)
              for kind in COLD_START_ORDER]
    assert firsts == sorted(firsts), [events[i].kind for i in firsts]
    assert len(kinds(events, EventKind.WORKER_PLACED)) == 1
    print(f"\ncold start: {seconds:.2f}s to the answer; timeline:\n{timeline(events)}")


def test_a_second_request_is_served_warm_without_a_new_placement(
    client: openai.OpenAI, cold_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    text, seconds = complete(client, cold_stack)

    assert text == greedy_text(reference_engine, PROMPT, 12)
    events = wait_for_events(cold_stack,
                             lambda es: len(kinds(es, EventKind.REQUEST_DONE)) == 2)
    assert len(kinds(events, EventKind.WORKER_PLACED)) == 1
    print(f"warm: {seconds:.2f}s to the answer")


def test_an_idle_worker_stops_after_its_keep_alive_and_the_next_request_cold_starts_again(
    client: openai.OpenAI, cold_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    events = wait_for_events(cold_stack, lambda es: bool(
        kinds(es, EventKind.WORKER_STOPPED, by="node_agent")))
    (launched,) = kinds(events, EventKind.WORKER_LAUNCHED)
    with pytest.raises(ProcessLookupError):
        os.kill(launched.data["pid"], 0)
    assert [p for d in cold_stack.work_dirs for p in d.glob("w*")] == []

    text, _ = complete(client, cold_stack)

    assert text == greedy_text(reference_engine, PROMPT, 12)
    events = wait_for_events(cold_stack,
                             lambda es: len(kinds(es, EventKind.REQUEST_DONE)) == 3)
    first, second = kinds(events, EventKind.WORKER_PLACED)
    # the first worker's node kept the model in its host-memory cache and got the second
    assert second.node_id == first.node_id
    assert [e.data["cached"] for e in kinds(events, EventKind.FETCH_DONE)] == [False, True]
