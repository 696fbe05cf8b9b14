"""The files the workload tools exchange: a workload, and the results of running one.

A workload file (JSON Lines) is a `WorkloadHeader` line, then one `WorkloadRequest` per line
in arrival order. A results file (JSON Lines) is a `RunHeader` line, then `RequestResult` and
`WorkerLifetime` lines (each with its `type`), in any order. The request generator (a live run
through the gateway), the simulator and the analyzer all read and write these, so a
simulated run and a live run are analyzed the same way.

Times are seconds: arrivals relative to the workload's start; results relative to the run's
start (`RunHeader.started_at` is the unix time of that start).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AppName = Literal["chatbot", "code", "summarization"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkloadHeader(_Record):
    type: Literal["workload"] = "workload"
    seed: int
    # how arrivals were drawn: "poisson", "gamma" (with `cv`) or "trace" (a CSV file)
    arrival: str
    # mean requests per second over the workload
    rate: float = Field(gt=0)
    cv: float | None = None
    duration_s: float = Field(gt=0)
    num_models: int = Field(ge=1)
    # free-form description of the mix (apps, model sizes, length distributions)
    description: str = ""


class WorkloadRequest(_Record):
    type: Literal["request"] = "request"
    request_id: str
    arrival_s: float = Field(ge=0)
    model: str
    app: AppName
    prompt_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1)
    # the application's SLOs for this model size
    ttft_slo_s: float = Field(gt=0)
    tpot_slo_s: float = Field(gt=0)


class RunHeader(_Record):
    type: Literal["run"] = "run"
    # e.g. "live", "sim:hydraserve", "sim:serverless_vllm+cache"
    name: str
    policy: str
    started_at: float = 0.0
    workload: WorkloadHeader | None = None


class RequestResult(_Record):
    type: Literal["result"] = "result"
    request_id: str
    model: str
    app: AppName
    submit_s: float
    # None when no token came (status "error" or "timeout")
    ttft_s: float | None = None
    # mean seconds per output token after the first; None with fewer than 2 tokens
    tpot_s: float | None = None
    output_tokens: int = 0
    status: Literal["ok", "error", "timeout"] = "ok"
    error: str | None = None
    ttft_slo_s: float
    tpot_slo_s: float


class WorkerLifetime(_Record):
    """A worker's GPU memory held from placement to stop: the cost side of a run."""

    type: Literal["worker"] = "worker"
    worker_id: str
    model: str
    node_id: str
    gpu_memory_bytes: int = Field(ge=0)
    start_s: float
    end_s: float
    stage: int = 0
    degree: int = 1


def write_jsonl(path: Path, records: Iterable[BaseModel]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for record in records:
            out.write(record.model_dump_json() + "\n")


def read_workload(path: Path) -> tuple[WorkloadHeader, list[WorkloadRequest]]:
    lines = _lines(path)
    header = WorkloadHeader.model_validate(next(lines))
    return header, [WorkloadRequest.model_validate(line) for line in lines]


def read_results(path: Path) -> tuple[RunHeader, list[RequestResult], list[WorkerLifetime]]:
    lines = _lines(path)
    header = RunHeader.model_validate(next(lines))
    results, workers = [], []
    for line in lines:
        if line.get("type") == "worker":
            workers.append(WorkerLifetime.model_validate(line))
        else:
            results.append(RequestResult.model_validate(line))
    return header, results, workers


def _lines(path: Path) -> Iterator[dict[str, object]]:
    with path.open() as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not JSON: {exc}") from exc
