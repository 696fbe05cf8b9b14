"""Scale-out end to end: workers of one slot (`--capacity=1`), two requests at once through
the gateway with the `openai` client. The scheduler cold-starts one endpoint; when it is ready
with two requests for its one slot (its `worker.ready` reports the capacity), it places a
second endpoint of the same model (its `worker.placed` says `scale_out`). Then one request at
a time: one of the two endpoints is scaled in after the keep-alive while the model keeps
serving, and the other scales to zero after the last request. Every answer is the greedy
one. Real NATS, PostgreSQL and processes. (Not replayed: see docs/EVENTS.md on ticks.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from libs.common.messages import EventKind
from tests.conftest import temporary_database
from tests.e2e.cluster import ColdStack, cluster, greedy_text, kinds, wait_for_events
from tests.e2e.conftest import USER_KEY

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e

PROMPT = "Once upon a time"
MAX_TOKENS = 48
KEEP_ALIVE_S = 3.0


@pytest.fixture(scope="module")
def scale_stack(nats_url: str, database_url: str, demo_model_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ColdStack]:
    with temporary_database(database_url, "hs_scale") as url, cluster(
            nats_url=nats_url, database_url=url, model_dir=demo_model_dir,
            workspace=tmp_path_factory.mktemp("scale"), name="demo-scale",
            scheduler_args=["--keep-alive", str(KEEP_ALIVE_S), "--max-endpoints", "2"],
            worker_args=("--capacity=1",)) as stack:
        yield stack


def test_two_requests_for_a_one_slot_endpoint_scale_out_then_the_extra_endpoint_scales_in(
    scale_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    client = openai.OpenAI(base_url=f"{scale_stack.base_url}/v1", api_key=USER_KEY,
                           max_retries=0, timeout=120)
    expected = greedy_text(reference_engine, PROMPT, MAX_TOKENS)

    def stream() -> str:
        chunks = client.completions.create(model=scale_stack.model, prompt=PROMPT,
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True)
        return "".join(chunk.choices[0].text for chunk in chunks)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: stream(), range(2)))
    assert answers == [expected] * 2

    # one request at a time from now on: one endpoint is enough, so one of the two goes
    # (after the keep-alive) while the model keeps serving
    stop_trickle = threading.Event()
    trickled: list[str] = []

    def trickle() -> None:
        while not stop_trickle.is_set():
            trickled.append(stream())
            time.sleep(0.3)

    with ThreadPoolExecutor(1) as pool:
        trickling = pool.submit(trickle)
        events = wait_for_events(scale_stack, lambda es: bool(
            kinds(es, EventKind.WORKER_STOP_REQUESTED)) or trickling.done())
        stop_trickle.set()
        trickling.result()
    assert trickled and trickled == [expected] * len(trickled)

    first, extra = kinds(events, EventKind.WORKER_PLACED)
    assert first.endpoint_id != extra.endpoint_id
    assert (first.data["scale_out"], extra.data["scale_out"]) == (False, True)
    # the second endpoint came when the first was ready with its one slot
    ready = next(e for e in kinds(events, EventKind.WORKER_READY)
                 if e.worker_id == first.worker_id)
    assert ready.data["capacity"] == 1
    assert extra.time >= ready.time
    (scaled_in,) = kinds(events, EventKind.WORKER_STOP_REQUESTED)
    assert scaled_in.worker_id in {first.worker_id, extra.worker_id}

    # the other one serves, then scales to zero after the model's keep-alive
    assert stream() == expected
    events = wait_for_events(scale_stack, lambda es: len(kinds(
        es, EventKind.WORKER_STOPPED, by="node_agent")) == 2)
    scaled_in, to_zero = kinds(events, EventKind.WORKER_STOP_REQUESTED)
    assert {scaled_in.worker_id, to_zero.worker_id} == {first.worker_id, extra.worker_id}
    last_done = max(e.time for e in kinds(events, EventKind.REQUEST_DONE))
    # the scale-in came while the model still had requests; the scale to zero, after them
    assert scaled_in.time < last_done <= to_zero.time - KEEP_ALIVE_S
    assert len(kinds(events, EventKind.REQUEST_DONE)) == 3 + len(trickled)
