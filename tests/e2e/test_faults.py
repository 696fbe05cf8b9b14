"""Fault injection on the real stack: a process (worker, node agent, scheduler, NATS,
PostgreSQL) dies or restarts while requests are in flight, and what the `openai` client sees.

Every test asserts that no request is silently lost: each one is either answered with the
exact greedy text or fails with a clear error (an HTTP status and an OpenAI error object, or
an error event in the stream), never a hang and never a truncated answer passed off as whole.
docs/RELIABILITY.md describes each fault, what the user sees and why.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import openai
import pytest

from libs.common.embedded import EmbeddedNats, EmbeddedPostgres
from libs.common.messages import Event, EventKind
from tests.conftest import temporary_database
from tests.e2e.cluster import ColdStack, cluster, kinds, logs_of, read_events, wait_for_events
from tests.e2e.conftest import USER_KEY, _wait_for_worker_ready
from tests.e2e.test_cold_start import PROMPT
from tests.processes import free_port, spawn, stop, tail, wait_for_http

if TYPE_CHECKING:
    from services.worker.engine.engine import LLMEngine

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12
# a generation long enough to be killed in the middle of (tiny model, ~1-3 ms a token)
LONG_TOKENS = 1500
ANSWER_TIMEOUT_S = 60.0


# --- helpers --------------------------------------------------------------------------------
def greedy(engine: LLMEngine, max_tokens: int, *, ignore_eos: bool = False) -> str:
    """The greedy completion of PROMPT that every served answer must equal."""
    from services.worker.engine.sequence import SamplingParams

    request_id = f"ref-{uuid.uuid4().hex[:6]}"
    engine.add_request(request_id, PROMPT, SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos))
    text = ""
    while engine.has_unfinished():
        text += "".join(out.text for out in engine.step())
    return text


def start_worker(nats_url: str, model_dir: Path, model: str, logs: Path, *args: str
                 ) -> tuple[subprocess.Popen[bytes], str]:
    """A worker of `model`, ready (its `worker.ready` event seen)."""
    worker_id = f"w-{uuid.uuid4().hex[:6]}"
    log = logs / f"worker-{worker_id}.log"
    process = spawn([sys.executable, "-m", "services.worker", "--model-dir", str(model_dir),
                     "--model", model, "--nats", nats_url, "--worker-id", worker_id, *args], log)
    asyncio.run(_wait_for_worker_ready(nats_url, model, worker_id, process, log))
    return process, worker_id


def start_gateway(nats_url: str, models: list[str], logs: Path, *,
                  first_token_timeout_s: float = ANSWER_TIMEOUT_S,
                  inter_token_timeout_s: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    base_url = f"http://127.0.0.1:{free_port()}"
    process = spawn([sys.executable, "-m", "services.gateway"], logs / "gateway.log", env={
        "HYDRASERVE_NATS__URL": nats_url,
        "HYDRASERVE_GATEWAY__HOST": "127.0.0.1",
        "HYDRASERVE_GATEWAY__PORT": base_url.rsplit(":", 1)[1],
        "HYDRASERVE_GATEWAY__API_KEYS": json.dumps([USER_KEY]),
        "HYDRASERVE_GATEWAY__MODELS": json.dumps(models),
        "HYDRASERVE_GATEWAY__FIRST_TOKEN_TIMEOUT_S": str(first_token_timeout_s),
        "HYDRASERVE_GATEWAY__INTER_TOKEN_TIMEOUT_S": str(inter_token_timeout_s),
        "HYDRASERVE_GATEWAY__RETRY_AFTER_S": "1",
    })
    wait_for_http(f"{base_url}/health", process, logs / "gateway.log")
    return process, base_url


def client_for(base_url: str, timeout: float = ANSWER_TIMEOUT_S + 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=USER_KEY, max_retries=0,
                         timeout=timeout)


def all_logs(*folders: Path) -> str:
    paths = sorted(p for folder in folders for p in folder.rglob("*.log"))
    return "\n".join(f"--- {p.name}\n{tail(p)}" for p in paths)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def pid_with_args(*needles: str) -> tuple[int, list[str]]:
    """The one process whose command line holds every `needle` (to kill and restart a
    process `cluster()` started); its pid and argv."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")[:-1]
        except OSError:
            continue
        if all(needle in argv for needle in needles):
            found.append((int(entry.name), argv))
    assert len(found) == 1, (needles, found)
    return found[0]


def events_now(nats_url: str, until: Callable[[list[Event]], bool] = lambda _: True,
               timeout: float = 30.0) -> list[Event]:
    return asyncio.run(read_events(nats_url, until=until, timeout=timeout))


def is_clear_error(exc: BaseException) -> bool:
    """An error the client can act on: an HTTP status with an OpenAI error message."""
    return (isinstance(exc, openai.APIStatusError) and exc.status_code in (429, 503)
            and bool(exc.message))


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as executor:
        yield executor


def send(pool: ThreadPoolExecutor, base_url: str, model: str,
         max_tokens: int = MAX_TOKENS) -> Future[str]:
    client = client_for(base_url)

    def call() -> str:
        response = client.completions.create(model=model, prompt=PROMPT,
                                             max_tokens=max_tokens, temperature=0)
        return response.choices[0].text

    return pool.submit(call)


# --- (a) a worker killed mid-stream ---------------------------------------------------------
def test_a_worker_killed_mid_stream_has_its_request_redelivered_and_the_client_gets_it_whole(
    nats_url: str, demo_model_dir: Path, reference_engine: LLMEngine, tmp_path: Path,
) -> None:
    """SIGKILL the worker streaming an answer; a new worker starts. The worker acks a request
    only once it has finished, so JetStream redelivers the unacked message after `ack_wait`
    (2 s here) to the new worker, which generates it again from the start with the same seed;
    the gateway drops the chunk seqs it already sent. The client sees the whole greedy answer,
    once, in one stream: answered correctly, not lost."""
    model = f"demo-faults-a-{uuid.uuid4().hex[:6]}"
    expected = greedy(reference_engine, LONG_TOKENS, ignore_eos=True)
    first_worker, first_id = start_worker(nats_url, demo_model_dir, model, tmp_path,
                                          "--ack-wait", "2", "--capacity", "2")
    gateway, base_url = start_gateway(nats_url, [model], tmp_path, inter_token_timeout_s=40)
    second_worker = None
    try:
        stream = client_for(base_url).completions.create(
            model=model, prompt=PROMPT, max_tokens=LONG_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        first_worker.send_signal(signal.SIGKILL)
        first_worker.wait(10)
        killed_at = time.monotonic()
        second_worker, second_id = start_worker(nats_url, demo_model_dir, model, tmp_path,
                                                "--ack-wait", "2", "--capacity", "2")
        finish_reasons = []
        for chunk in chunks:
            text += chunk.choices[0].text
            finish_reasons.append(chunk.choices[0].finish_reason)
        resumed_s = time.monotonic() - killed_at

        assert text == expected
        assert [r for r in finish_reasons if r] == ["length"]
        events = events_now(nats_url, lambda es: any(
            e.kind == EventKind.REQUEST_DONE and e.model == model for e in es))
        (done,) = [e for e in events if e.kind == EventKind.REQUEST_DONE and e.model == model]
        # the killed worker never finished it: the new one did, on the second delivery
        assert (done.worker_id, done.data["attempt"]) == (second_id, 2)
        assert first_id != second_id
        print(f"\nworker killed mid-stream: answer resumed and finished {resumed_s:.2f}s "
              "after the kill")
    except (openai.APIError, AssertionError):
        print(all_logs(tmp_path))
        raise
    finally:
        for process in (gateway, second_worker):
            if process is not None:
                stop(process)


# --- (f) a flood of requests at a small worker ----------------------------------------------
FLOOD = 300
# the gateway's RSS may grow by this much over a flood (buffers, connections); a leak of the
# per-request state would show as more
MAX_RSS_GROWTH_MB = 120


def test_a_flood_of_requests_gets_every_one_an_answer_or_a_clear_503_and_bounded_memory(
    nats_url: str, demo_model_dir: Path, reference_engine: LLMEngine, tmp_path: Path,
) -> None:
    """300 requests at once at a worker of capacity 2 behind a 3 s first-token timeout: the
    queue takes them all; those the worker reaches in time are answered (exact greedy text),
    the rest get 503 with Retry-After and an OpenAI error body ("No worker ... answered
    within 3s") once their deadline passes, and are withdrawn from the queue (or dropped by
    the worker as expired) so it drains. The gateway's memory stays bounded."""
    model = f"demo-faults-f-{uuid.uuid4().hex[:6]}"
    expected = greedy(reference_engine, MAX_TOKENS)
    worker, _ = start_worker(nats_url, demo_model_dir, model, tmp_path, "--capacity", "2")
    gateway, base_url = start_gateway(nats_url, [model], tmp_path, first_token_timeout_s=3,
                                      inter_token_timeout_s=5)
    try:
        rss_before = rss_kb(gateway.pid)

        async def flood() -> list[str | BaseException]:
            client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=USER_KEY,
                                        max_retries=0, timeout=60)

            async def one() -> str:
                response = await client.completions.create(
                    model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
                return response.choices[0].text

            try:
                return await asyncio.gather(*(one() for _ in range(FLOOD)),
                                            return_exceptions=True)
            finally:
                await client.close()

        started = time.monotonic()
        results = asyncio.run(flood())
        seconds = time.monotonic() - started
        rss_after = rss_kb(gateway.pid)

        answered = [r for r in results if isinstance(r, str)]
        errors = [r for r in results if not isinstance(r, str)]
        unclear = [r for r in errors if not is_clear_error(r)]
        assert not unclear, unclear[:3]
        assert answered and all(text == expected for text in answered)
        for exc in errors:
            assert isinstance(exc, openai.APIStatusError)
            assert exc.response.headers.get("retry-after") == "1", exc.response.headers
        assert (rss_after - rss_before) / 1024 < MAX_RSS_GROWTH_MB
        assert gateway.poll() is None and worker.poll() is None
        # and the worker still answers once the flood is over
        assert client_for(base_url).completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS,
            temperature=0).choices[0].text == expected
        print(f"\nflood of {FLOOD}: {len(answered)} answered, {len(errors)} x 503 in "
              f"{seconds:.1f}s; gateway RSS {rss_before / 1024:.0f} -> "
              f"{rss_after / 1024:.0f} MB")
    except AssertionError:
        print(all_logs(tmp_path))
        raise
    finally:
        stop(gateway)
        stop(worker)


# --- (b) a node agent killed during a fetch -------------------------------------------------
# the demo model (~0.9 MB) over this NIC takes ~5 s to fetch: long enough to kill its agent
SLOW_NIC_GBPS = 0.0015
HEARTBEAT_TIMEOUT_S = 3.0


@pytest.fixture
def faults_database_url(database_url: str) -> Iterator[str]:
    with temporary_database(database_url, "hs_faults") as url:
        yield url


def _answer_in_background(pool: ThreadPoolExecutor, stack: ColdStack) -> Future[str]:
    return send(pool, stack.base_url, stack.model)


def _result(future: Future[str], stack: ColdStack) -> str:
    try:
        return future.result(timeout=ANSWER_TIMEOUT_S + 20)
    except (TimeoutError, openai.APIError) as exc:
        pytest.fail(f"the request was not answered ({exc!r}); logs:\n{logs_of(stack)}")


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_node_agent_killed_during_a_fetch_is_marked_down_and_the_request_placed_elsewhere(
    nats_url: str, faults_database_url: str, demo_model_dir: Path,
    reference_engine: LLMEngine, pool: ThreadPoolExecutor,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SIGKILL the node agent fetching the model's weights. Its heartbeats stop; after
    `--heartbeat-timeout` the scheduler marks the node down, forgets the worker placed there
    and places one on the other node, which fetches and answers. The client waits longer
    (heartbeat timeout + a second fetch) and gets the exact answer: not lost. The worker the
    killed agent had launched dies with it (no orphan holding memory)."""
    expected = greedy(reference_engine, MAX_TOKENS)
    with cluster(nats_url=nats_url, database_url=faults_database_url,
                 model_dir=demo_model_dir, workspace=tmp_path_factory.mktemp("faults-b"),
                 name="demo-faults-b", nic_gbps=SLOW_NIC_GBPS,
                 scheduler_args=["--policy", "single_worker", "--tick", "0.5",
                                 "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S)]) as stack:
        started = time.monotonic()
        future = _answer_in_background(pool, stack)
        events = wait_for_events(stack, lambda es: bool(kinds(es, EventKind.WORKER_LAUNCHED)))
        (placed,) = kinds(events, EventKind.WORKER_PLACED)
        (launched,) = kinds(events, EventKind.WORKER_LAUNCHED)
        assert not kinds(events, EventKind.FETCH_DONE), "the fetch was over already"
        assert _pid_exists(launched.data["pid"])
        pid, _ = pid_with_args("services.prefetcher", "--node-id", placed.node_id)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic() - started
        deadline = time.monotonic() + 5
        while _pid_exists(launched.data["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_exists(launched.data["pid"]), "the worker outlived its node agent"

        assert _result(future, stack) == expected
        answered_at = time.monotonic() - started
        events = wait_for_events(stack, lambda es: bool(kinds(es, EventKind.REQUEST_DONE)))
        assert [e.node_id for e in kinds(events, EventKind.NODE_DOWN)] == [placed.node_id]
        _, second = kinds(events, EventKind.WORKER_PLACED)
        assert second.node_id != placed.node_id
        (done,) = kinds(events, EventKind.REQUEST_DONE)
        assert done.node_id == second.node_id
        print(f"\nnode agent killed {killed_at:.2f}s into the fetch; answered at "
              f"{answered_at:.2f}s from the other node")


# --- (c) the scheduler killed during a cold start -------------------------------------------
def test_a_scheduler_killed_after_placing_a_worker_is_restarted_and_the_request_answered(
    nats_url: str, faults_database_url: str, demo_model_dir: Path,
    reference_engine: LLMEngine, pool: ThreadPoolExecutor,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """SIGKILL the scheduler right after `worker.placed` (the worker fetching and starting)
    and start it again with the same database and durable consumer. The placement was
    written to Postgres before the command went out, so the new scheduler rebuilds the
    worker from there and resumes the event stream where the old one acked: it places no
    second worker. The node agent and worker never needed it, so the client just gets the
    answer."""
    expected = greedy(reference_engine, MAX_TOKENS)
    workspace = tmp_path_factory.mktemp("faults-c")
    with cluster(nats_url=nats_url, database_url=faults_database_url,
                 model_dir=demo_model_dir, workspace=workspace, name="demo-faults-c",
                 scheduler_args=["--policy", "single_worker", "--tick", "0.5"]) as stack:
        future = _answer_in_background(pool, stack)
        events = wait_for_events(stack, lambda es: bool(kinds(es, EventKind.WORKER_PLACED)))
        assert not kinds(events, EventKind.WORKER_READY), "the cold start was over already"
        pid, argv = pid_with_args("services.scheduler", "--register-model", stack.model)
        os.kill(pid, signal.SIGKILL)
        restarted = spawn(argv, stack.logs / "scheduler-restarted.log")
        try:
            assert _result(future, stack) == expected
            events = wait_for_events(stack, lambda es: bool(kinds(es, EventKind.REQUEST_DONE)))
            assert len(kinds(events, EventKind.WORKER_PLACED)) == 1
            assert restarted.poll() is None, tail(stack.logs / "scheduler-restarted.log")
            # the restarted scheduler knows the worker: a second request is served warm
            assert _result(_answer_in_background(pool, stack), stack) == expected
            assert len(kinds(wait_for_events(stack, lambda es: len(kinds(
                es, EventKind.REQUEST_DONE)) == 2), EventKind.WORKER_PLACED)) == 1
        finally:
            stop(restarted)


# --- (d) NATS restarted ---------------------------------------------------------------------
@pytest.fixture
def own_nats() -> Iterator[EmbeddedNats]:
    """A NATS server of this test's own, to restart on the same port and store."""
    with tempfile.TemporaryDirectory(prefix="hs-test-nats-faults-") as folder, \
            EmbeddedNats(Path(folder)) as server:
        yield server


def restart_nats(server: EmbeddedNats, *, down_s: float) -> None:
    """Crash the server (SIGKILL: no lame-duck goodbye to its clients), restart it later."""
    port = server.port
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    server.stop()  # reaps it
    time.sleep(down_s)  # the outage itself
    server.requested_port = port
    server.start()


def test_nats_restarted_fails_or_finishes_in_flight_requests_and_serves_new_ones(
    own_nats: EmbeddedNats, demo_model_dir: Path, reference_engine: LLMEngine,
    tmp_path: Path,
) -> None:
    """Crash NATS and restart it (same port, same JetStream store) while a streamed answer
    is running.
    Token chunks are core NATS messages: those sent during the outage are gone, so the
    in-flight stream either completes (it finished before) or ends with a clear error (the
    gateway's inter-token timeout, 3 s here, as an error event in the stream, which the
    `openai` client raises as APIError) — never a truncated answer passed off as complete.
    Every client reconnects by itself (nats-py reconnects every 2 s); the request stream is
    on disk, so queued requests survive, and new requests are answered."""
    model = f"demo-faults-d-{uuid.uuid4().hex[:6]}"
    long_expected = greedy(reference_engine, LONG_TOKENS, ignore_eos=True)
    expected = greedy(reference_engine, MAX_TOKENS)
    worker, _ = start_worker(own_nats.url, demo_model_dir, model, tmp_path,
                             "--ack-wait", "3", "--capacity", "2")
    gateway, base_url = start_gateway(own_nats.url, [model], tmp_path,
                                      first_token_timeout_s=10, inter_token_timeout_s=3)
    client = client_for(base_url)
    try:
        stream = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=LONG_TOKENS, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        chunks = iter(stream)
        text = next(chunks).choices[0].text
        outcome: list[BaseException | str] = []

        def read_rest() -> None:
            nonlocal text
            try:
                for chunk in chunks:
                    text += chunk.choices[0].text
                outcome.append(text)
            except openai.APIError as exc:
                outcome.append(exc)

        reader = threading.Thread(target=read_rest)
        reader.start()
        restart_nats(own_nats, down_s=1.0)
        reader.join(timeout=30)
        assert not reader.is_alive(), "the in-flight stream hung"
        (result,) = outcome
        if isinstance(result, str):
            assert result == long_expected
        else:
            assert isinstance(result, openai.APIError) and result.message, result

        # new requests: a clear 503 while the clients reconnect, then answers
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = client.completions.create(model=model, prompt=PROMPT,
                                                   max_tokens=MAX_TOKENS, temperature=0)
                break
            except openai.APIStatusError as exc:
                assert is_clear_error(exc), exc
                assert time.monotonic() < deadline, f"no answer after the restart: {exc!r}"
        assert answer.choices[0].text == expected
        assert gateway.poll() is None and worker.poll() is None
        print(f"\nNATS restarted: in-flight stream "
              f"{'completed' if isinstance(result, str) else f'failed: {result.message}'}")
    except AssertionError:
        print(all_logs(tmp_path))
        raise
    finally:
        stop(gateway)
        stop(worker)


# --- (e) Postgres restarted -----------------------------------------------------------------
@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    with tempfile.TemporaryDirectory(prefix="hs-test-pg-faults-") as folder, \
            EmbeddedPostgres(Path(folder), fsync=False) as server:
        yield server


def restart_postgres(server: EmbeddedPostgres, *, down_s: float) -> None:
    port = server.port
    server.stop()
    time.sleep(down_s)
    server.requested_port = port
    server.start()


def test_postgres_restarted_leaves_the_scheduler_running_and_cold_starts_working(
    own_postgres: EmbeddedPostgres, nats_url: str, demo_model_dir: Path,
    reference_engine: LLMEngine, pool: ThreadPoolExecutor,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Stop Postgres for a few seconds (node heartbeats keep coming: each is a state change
    the scheduler must write) and start it again. The scheduler retries the write until the
    database is back rather than exiting, so no event is skipped; the next cold start is
    placed, fetched and answered."""
    expected = greedy(reference_engine, MAX_TOKENS)
    with cluster(nats_url=nats_url, database_url=own_postgres.url, model_dir=demo_model_dir,
                 workspace=tmp_path_factory.mktemp("faults-e"), name="demo-faults-e",
                 scheduler_args=["--policy", "single_worker", "--tick", "0.5"]) as stack:
        scheduler_pid, _ = pid_with_args("services.scheduler", "--register-model", stack.model)
        restart_postgres(own_postgres, down_s=4.0)

        assert _result(_answer_in_background(pool, stack), stack) == expected
        os.kill(scheduler_pid, 0)  # still the same process
        events = wait_for_events(stack, lambda es: bool(kinds(es, EventKind.REQUEST_DONE)))
        assert len(kinds(events, EventKind.WORKER_PLACED)) == 1
