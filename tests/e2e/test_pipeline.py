"""Pipeline-parallel cold starts and consolidation end to end: four emulated GPU nodes with a
slow NIC, the hydraserve policy held at degree 2 or 4, real worker processes per stage over
the NATS data plane. A long streamed request starts the cold start; consolidation happens
while it streams; its tokens must equal a single whole-model engine's, and afterwards only
the full-size worker remains and serves the next request alone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import openai
import pytest

from libs.common.messages import EventKind
from tests.conftest import temporary_database
from tests.e2e.cluster import ColdStack, cluster, kinds, logs_of, wait_for_events
from tests.e2e.conftest import USER_KEY

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e

PROMPT = "The pipeline"
LONG_TOKENS = 1200
NODES = ("n0", "n1", "n2", "n3")
# ~20 MB of weights at 5 MB/s per node: fetching dominates, and the full-size worker's
# consolidation fetch (the other stages' bytes) takes seconds while the request streams
NIC_GBPS = 0.04


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from services.worker.demo_model import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("small-model"), size="small")


@pytest.fixture(scope="module")
def small_reference(small_model_dir: Path) -> LLMEngine:
    from services.worker.engine.engine import LLMEngine

    engine = LLMEngine.from_model_dir(small_model_dir, max_num_seqs=1)
    engine.load()
    return engine


@pytest.fixture(scope="module", params=[2, 4], ids=lambda d: f"degree{d}")
def pipeline(request: pytest.FixtureRequest, nats_url: str, database_url: str,
             small_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[ColdStack, str, int]]:
    degree: int = request.param
    with temporary_database(database_url, f"hs_pipe{degree}") as db_url, cluster(
            nats_url=nats_url, database_url=db_url, model_dir=small_model_dir,
            workspace=tmp_path_factory.mktemp(f"pipe{degree}"), name=f"pipe{degree}",
            node_names=NODES, nic_gbps=NIC_GBPS, event_timeout_s=90,
            scheduler_args=["--policy", "hydraserve", "--degree", str(degree),
                            "--keep-alive", "600"]) as stack:
        yield stack, db_url, degree


def expected(engine: LLMEngine, max_tokens: int) -> str:
    from services.worker.engine.sequence import SamplingParams

    engine.add_request("reference", PROMPT, SamplingParams(max_tokens=max_tokens,
                                                           temperature=0.0, ignore_eos=True))
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    return text


def stream(stack: ColdStack, max_tokens: int) -> str:
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=USER_KEY, max_retries=0,
                           timeout=120)
    chunks = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=max_tokens,
                                       temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    return "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)


def keep_awake_spinners() -> list[int]:
    """Keep-awake spinner processes descended from this test process."""
    from services.worker.keep_awake import SPINNER_MARK

    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if SPINNER_MARK.encode() not in (proc / "cmdline").read_bytes():
                continue
            pid = int(proc.name)
            while pid > 1:
                status = Path(f"/proc/{pid}/status").read_text()
                pid = int(status.split("PPid:")[1].split()[0])
                if pid == os.getpid():
                    found.append(int(proc.name))
                    break
        except (OSError, IndexError, ValueError):
            continue
    return found


async def _workers(db_url: str) -> list[tuple[int, int, int, str]]:
    dsn = db_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT stage, start_layer, end_layer, node_id FROM workers "
                                "WHERE state <> 'stopped'")
    finally:
        await conn.close()
    return sorted((r["stage"], r["start_layer"], r["end_layer"], r["node_id"]) for r in rows)


def test_a_pipelined_cold_start_consolidates_mid_stream_with_the_same_tokens(
    pipeline: tuple[ColdStack, str, int], small_reference: LLMEngine,
) -> None:
    stack, _, degree = pipeline
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(stream(stack, LONG_TOKENS)))
    thread.start()
    thread.join(timeout=240)
    assert result, f"the streamed request did not finish:\n{logs_of(stack)}"

    assert result[0] == expected(small_reference, LONG_TOKENS)
    events = wait_for_events(stack, lambda es: len(kinds(
        es, EventKind.WORKER_STOPPED, by="node_agent")) == degree - 1)
    placed = sorted(kinds(events, EventKind.WORKER_PLACED), key=lambda e: e.data["stage"])
    assert [e.data["stage"] for e in placed] == list(range(degree))
    assert len({e.node_id for e in placed}) == degree
    (ready,) = kinds(events, EventKind.ENDPOINT_PIPELINE_READY)
    assert ready.data["degree"] == degree
    (migrated,) = kinds(events, EventKind.KV_MIGRATED)
    (done,) = kinds(events, EventKind.REQUEST_DONE)
    # the long request was in flight when its KV moved, and finished on the consolidated worker
    assert migrated.data["num_seqs"] == 1
    assert migrated.time < done.time
    (consolidated,) = kinds(events, EventKind.WORKER_CONSOLIDATED)
    assert consolidated.worker_id == placed[0].worker_id
    # every pipeline worker kept its cores awake (one spinner a core) until it was done
    from services.worker.keep_awake import MAX_SPINNERS

    cores = min(len(os.sched_getaffinity(0)), MAX_SPINNERS)
    assert consolidated.data["keep_awake_cpus"] == cores
    stage_stops = [e for e in kinds(events, EventKind.WORKER_STOPPED) if "num_steps" in e.data]
    assert sorted(e.worker_id for e in stage_stops) == sorted(e.worker_id for e in placed[1:])
    assert [e.data["keep_awake_cpus"] for e in stage_stops] == [cores] * (degree - 1)
    stopped = kinds(events, EventKind.WORKER_STOPPED, by="node_agent")
    assert sorted(e.worker_id for e in stopped) == sorted(e.worker_id for e in placed[1:])
    assert all(e.data["asked"] for e in stopped)
    timeline = subprocess.run(
        [sys.executable, "-m", "hydraserve.cli", "events", "timeline", done.request_id or "",
         "--nats", stack.nats_url, "--png", str(stack.logs / "timeline.png")],
        capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [line.split() for line in timeline.splitlines()]
    for stage, worker in enumerate(placed):
        phases = {" ".join(row[2:-3]) for row in rows if row[:2] == [str(stage), worker.worker_id]}
        assert {"fetch", "imports", "load", "engine ready"} <= phases, timeline
    assert (stack.logs / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\ndegree {degree}: KV of {migrated.data['num_seqs']} sequence(s), "
          f"{migrated.data['num_bytes']} bytes, pause {migrated.data['pause_s'] * 1000:.1f} ms")


def test_after_consolidation_one_worker_serves_and_the_partial_nodes_are_free(
    pipeline: tuple[ColdStack, str, int], small_reference: LLMEngine,
) -> None:
    stack, db_url, _ = pipeline
    assert stream(stack, 24) == expected(small_reference, 24)

    events = wait_for_events(stack, lambda es: len(kinds(es, EventKind.REQUEST_DONE)) == 2)
    placed = sorted(kinds(events, EventKind.WORKER_PLACED), key=lambda e: e.data["stage"])
    second = kinds(events, EventKind.REQUEST_FIRST_TOKEN)[-1]
    assert second.worker_id == placed[0].worker_id
    assert asyncio.run(_workers(db_url)) == [(0, 0, 4, placed[0].node_id)]
    assert keep_awake_spinners() == []  # stopped with the pipeline, none orphaned
    partial_nodes = {e.node_id for e in placed[1:]}
    for node_id, work_dir in zip(stack.node_ids, stack.work_dirs, strict=True):
        if node_id in partial_nodes:
            assert [p.name for p in work_dir.glob("w*")] == []
