"""Cold-start progress on a streamed request, end to end: the real stack of
`test_cold_start.py` (storage, scheduler, two node agents, gateway over real NATS and
PostgreSQL). A streamed chat completion for a model with no worker gets SSE comments
(`: worker placed on ...`, `: fetching weights ...%`, `: worker started`, `: model loaded`)
before its first `data:` chunk; the `openai` client, which skips comments, streams a cold
model unchanged."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

from libs.common.embedded import EmbeddedNats
from libs.common.messages import EventKind
from tests.e2e import test_cold_start as cold
from tests.e2e.conftest import USER_KEY
from tests.e2e.test_openai_warm import reference

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e

# the cold-start stack of test_cold_start.py, a fresh one for this module
cold_database_url = cold.cold_database_url
cold_stack = cold.cold_stack


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    """A NATS server of this module's own. The scheduler's command ids (`place-w<worker id>`)
    start again at 1 with each database, so on a shared server JetStream would drop this
    stack's placements as duplicates of another cold stack's within its duplicate window."""
    with tempfile.TemporaryDirectory(prefix="hs-test-nats-progress-") as folder, \
            EmbeddedNats(Path(folder)) as server:
        yield server.url

CHAT = [{"role": "user", "content": "Tell me a story"}]
MAX_TOKENS = 10
# the order the first comment of each cold-start phase must come in
PHASES = ["worker placed on ", "fetching weights ", "worker started", "model loaded"]


def stream_lines(stack: cold.ColdStack) -> list[str]:
    """The non-blank SSE lines of a streamed chat completion, as they arrived."""
    body = {"model": stack.model, "messages": CHAT, "max_tokens": MAX_TOKENS,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{stack.base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {USER_KEY}"}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def wait_until_cold(stack: cold.ColdStack, stopped: int) -> None:
    """Until the node agents have stopped `stopped` workers of the model (keep-alive)."""
    cold.wait_for_events(stack, lambda es: len(
        cold.kinds(es, EventKind.WORKER_STOPPED, by="node_agent")) >= stopped)


def test_streamed_cold_start_reports_progress_comments_before_the_first_data_chunk(
    cold_stack: cold.ColdStack, reference_engine: LLMEngine,
) -> None:
    expected = reference(reference_engine, MAX_TOKENS, messages=CHAT)
    started = time.monotonic()

    lines = stream_lines(cold_stack)

    seconds = time.monotonic() - started
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    comments = [line.removeprefix(": ") for line in lines[:first_data]]
    assert all(line.startswith(":") for line in lines[:first_data]), lines
    assert not any(line.startswith(":") for line in lines[first_data:]), lines
    # "(cold start)" too once the placement came within the gateway's wait (usually)
    assert comments[0].startswith(f"queued for model {cold_stack.model}"), comments
    firsts = [next((i for i, c in enumerate(comments) if c.startswith(phase)), -1)
              for phase in PHASES]
    assert -1 not in firsts and firsts == sorted(firsts), comments
    assert any(comments[firsts[0]].endswith(node) for node in cold_stack.node_ids), comments
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[first_data:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        expected.text
    print(f"\ncold stream: {seconds:.2f}s; comments: {comments}")


def test_openai_client_streams_a_cold_model_unchanged(
    cold_stack: cold.ColdStack, reference_engine: LLMEngine,
) -> None:
    wait_until_cold(cold_stack, stopped=1)
    expected = reference(reference_engine, MAX_TOKENS, messages=CHAT)
    client = openai.OpenAI(base_url=f"{cold_stack.base_url}/v1", api_key=USER_KEY,
                           max_retries=0, timeout=60)

    chunks = list(client.chat.completions.create(
        model=cold_stack.model, messages=CHAT,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS, temperature=0, stream=True))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    events = cold.wait_for_events(cold_stack, lambda es: len(
        cold.kinds(es, EventKind.REQUEST_DONE)) == 2)
    assert len(cold.kinds(events, EventKind.WORKER_PLACED)) == 2
