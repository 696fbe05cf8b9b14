"""Event replay of a real cluster: a single-worker cold start and its scale to zero, recorded
in HS_EVENTS by real processes, replay through the policy with the same decisions
(`hydraserve events replay` exits 0); the same log with a node's heartbeats altered diverges
at the placement."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from hydraserve.event_view import EventFilter
from hydraserve.events import collect
from hydraserve.replay import replay
from libs.common.messages import Event, EventKind
from services.scheduler.policy import build_policy
from tests.conftest import temporary_database
from tests.e2e.cluster import ColdStack, cluster, kinds, logs_of, wait_for_events
from tests.e2e.conftest import USER_KEY

pytestmark = pytest.mark.e2e

KEEP_ALIVE_S = 3.0
NODE_KINDS = (EventKind.NODE_REGISTERED, EventKind.NODE_HEARTBEAT)


@pytest.fixture(scope="module")
def replay_stack(nats_url: str, database_url: str, demo_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ColdStack, float]]:
    """The cluster, and when it started: replay reads the events since then, as the session's
    NATS server may hold earlier tests' clusters' events (replay needs a log that starts
    before its scheduler, on a fresh database)."""
    with temporary_database(database_url, "hs_replay") as url:
        started = time.time()
        with cluster(nats_url=nats_url, database_url=url, model_dir=demo_model_dir,
                     workspace=tmp_path_factory.mktemp("replay"), name="demo-replay",
                     scheduler_args=["--policy", "single_worker",
                                     "--keep-alive", str(KEEP_ALIVE_S)]) as stack:
            yield stack, started


@pytest.fixture(scope="module")
def scaled_to_zero(replay_stack: tuple[ColdStack, float]) -> tuple[ColdStack, float]:
    """One request answered by a cold-started worker, which then stopped after its
    keep-alive."""
    stack, started = replay_stack
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=USER_KEY, max_retries=0,
                           timeout=60)
    client.completions.create(model=stack.model, prompt="Once upon a time", max_tokens=8,
                              temperature=0)
    wait_for_events(stack, lambda es: bool(kinds(es, EventKind.WORKER_STOPPED)))
    return stack, started


def since_arg(started: float) -> str:
    return f"{time.time() - started + 0.2:.1f}s"


def test_the_recorded_cold_start_and_scale_to_zero_replay_without_divergence(
    scaled_to_zero: tuple[ColdStack, float],
) -> None:
    stack, started = scaled_to_zero

    result = subprocess.run(
        [sys.executable, "-m", "hydraserve.cli", "events", "replay", "--nats", stack.nats_url,
         "--policy", "single_worker", "--since", since_arg(started)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"})

    print(f"\n{result.stdout}")
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{logs_of(stack)}"
    assert result.stdout.startswith("no divergence: "), result.stdout
    # the placement and the stop, at least
    decisions = int(result.stdout.split(", ")[1].split()[0])
    assert decisions >= 2, result.stdout


def test_the_same_log_with_the_chosen_node_reporting_no_gpu_memory_diverges_at_the_placement(
    scaled_to_zero: tuple[ColdStack, float],
) -> None:
    stack, started = scaled_to_zero
    events = asyncio.run(collect(stack.nats_url, EventFilter(since=started)))
    (placed,) = [e for e in events if e.kind == EventKind.WORKER_PLACED
                 and e.model == stack.model]
    (other,) = set(stack.node_ids) - {placed.node_id}

    def without_memory(event: Event) -> Event:
        if event.kind not in NODE_KINDS or event.node_id != placed.node_id:
            return event
        return event.model_copy(update={"data": {**event.data, "gpu_memory_bytes": 0}})

    result = replay([without_memory(e) for e in events], build_policy("single_worker"))

    divergence = result.divergence
    assert divergence is not None and divergence.position == 0, result.format()
    assert divergence.recorded is not None and divergence.decided is not None
    assert events[divergence.recorded.index] == placed
    assert (divergence.recorded.fields["node_id"], divergence.decided.fields["node_id"]) == (
        placed.node_id, other)
