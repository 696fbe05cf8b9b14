"""Workers forked from the node agent's zygote (`--launcher forkserver`): a cold start through
the real gateway gets the greedy answer from a worker whose parent is the zygote (itself the
agent's child), with its imports reported done at its start; scaled to zero, the zygote reaps
it and the agent reports its exit code 0, and the process is gone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai
import pytest

from libs.common.messages import EventKind
from tests.conftest import temporary_database
from tests.e2e.cluster import ColdStack, cluster, greedy_text, kinds, wait_for_events
from tests.e2e.conftest import USER_KEY
from tests.e2e.test_cold_start import PROMPT

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fork_stack(nats_url: str, database_url: str, demo_model_dir: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ColdStack]:
    with temporary_database(database_url, "hs_fork") as url, cluster(
            nats_url=nats_url, database_url=url, model_dir=demo_model_dir,
            workspace=tmp_path_factory.mktemp("fork"), name="demo-fork",
            node_names=("node-f",), scheduler_args=["--keep-alive", "2"],
            agent_args=["--launcher", "forkserver"]) as stack:
        yield stack


def _parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _command_line(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def test_a_worker_forked_from_the_zygote_answers_and_its_exit_is_reported(
    fork_stack: ColdStack, reference_engine: LLMEngine,
) -> None:
    client = openai.OpenAI(base_url=f"{fork_stack.base_url}/v1", api_key=USER_KEY,
                           max_retries=0, timeout=120)
    response = client.completions.create(model=fork_stack.model, prompt=PROMPT, max_tokens=12,
                                         temperature=0)
    assert response.choices[0].text == greedy_text(reference_engine, PROMPT, 12)

    events = wait_for_events(fork_stack, lambda es: bool(kinds(es, EventKind.REQUEST_DONE)))
    (launched,) = kinds(events, EventKind.WORKER_LAUNCHED)
    pid = launched.data["pid"]
    zygote = _parent_pid(pid)
    assert _command_line(zygote)[1:3] == ["-m", "services.worker.zygote"]
    assert _command_line(_parent_pid(zygote))[1:3] == ["-m", "services.prefetcher"]
    (ready,) = kinds(events, EventKind.WORKER_READY)
    phases = ready.data["phases"]
    # the worker's imports were the zygote's: done before the worker process existed
    assert phases["imports_done_at"] >= phases["process_started_at"] - 0.02
    assert phases["engine_imported_at"] >= phases["imports_done_at"]

    def reaped(es: list[Any]) -> list[Any]:  # the agent's report of the exit the zygote saw
        return [e for e in kinds(es, EventKind.WORKER_STOPPED)
                if e.worker_id == launched.worker_id and e.data.get("by") == "node_agent"]

    events = wait_for_events(fork_stack, lambda es: bool(reaped(es)))
    assert [e.data["exit_code"] for e in reaped(events)] == [0]
    assert not Path(f"/proc/{pid}").exists()
