"""`hydraserve workload replay` against a real gateway and a warm worker: every request of a
tiny workload comes back whole, with its exact output length, TTFT and TPOT."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hydraserve.cli import main
from hydraserve.workload.records import (
    WorkloadHeader,
    WorkloadRequest,
    read_results,
    write_jsonl,
)

if TYPE_CHECKING:
    from tests.e2e.conftest import WarmStack

pytestmark = pytest.mark.e2e

OUTPUT_TOKENS = [3, 5, 2, 4]


HEADER = WorkloadHeader(seed=0, arrival="poisson", rate=4.0, duration_s=1.0, num_models=1)


def _workload(path: Path, output_tokens: list[int]) -> Path:
    requests = [WorkloadRequest(request_id=f"r{i}", arrival_s=0.1 * i, model="chatbot-7b-0",
                                app="chatbot", prompt_tokens=6 + i, output_tokens=n,
                                ttft_slo_s=7.5, tpot_slo_s=0.2)
                for i, n in enumerate(output_tokens)]
    write_jsonl(path, [HEADER, *requests])
    return path


def test_replay_records_every_request_ok_with_its_exact_output_tokens(
        warm_stack: WarmStack, nats_url: str, tmp_path: Path) -> None:
    workload = _workload(tmp_path / "workload.jsonl", OUTPUT_TOKENS)
    out = tmp_path / "results.jsonl"

    assert main(["workload", "replay", str(workload), "--api", warm_stack.base_url,
                 "--api-key", warm_stack.user_key, "--out", str(out), "--rate-scale", "2",
                 "--model-map", f"chatbot-7b-0={warm_stack.model}", "--timeout", "20",
                 "--nats", nats_url]) == 0

    run, results, workers = read_results(out)
    assert run.name == "live" and run.workload == HEADER and run.started_at > 0
    # the fixture's worker was started by hand, not placed by a scheduler
    assert workers == []
    assert [r.request_id for r in results] == ["r0", "r1", "r2", "r3"]
    for result, num_tokens in zip(results, OUTPUT_TOKENS, strict=True):
        assert (result.status, result.error, result.model) == ("ok", None, warm_stack.model)
        assert result.output_tokens == num_tokens
        assert result.ttft_s is not None and result.ttft_s > 0
        assert result.tpot_s is not None and result.tpot_s >= 0
    # sent at arrival / 2, in order
    assert [r.submit_s for r in results] == sorted(r.submit_s for r in results)
    assert results[3].submit_s >= 0.15


def test_replay_records_a_request_no_worker_answers_as_an_error(
        warm_stack: WarmStack, tmp_path: Path) -> None:
    workload = _workload(tmp_path / "workload.jsonl", [3])
    out = tmp_path / "results.jsonl"

    assert main(["workload", "replay", str(workload), "--api", warm_stack.base_url,
                 "--api-key", warm_stack.user_key, "--out", str(out),
                 "--model-map", f"chatbot-7b-0={warm_stack.idle_model}", "--timeout", "20"]
                ) == 0

    [result] = read_results(out)[1]
    assert (result.status, result.ttft_s, result.output_tokens) == ("error", None, 0)
    assert result.error is not None and result.error.startswith("APIError: No worker")
