"""The workload tools' pure parts: arrival processes and the model mix of the generator, trace
files, worker lifetimes from events, and the analyzer's numbers, tables and charts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from hydraserve.cli import main
from hydraserve.workload.analyze import (
    Attainment,
    comparison_rows,
    format_comparison,
    format_summary,
    summarize,
)
from hydraserve.workload.generate import (
    GenerateConfig,
    gamma_arrivals,
    generate,
    poisson_arrivals,
    popularity,
    read_trace,
)
from hydraserve.workload.plots import write_plots
from hydraserve.workload.records import (
    RequestResult,
    RunHeader,
    WorkerLifetime,
    read_results,
    read_workload,
    write_jsonl,
)
from hydraserve.workload.replay import worker_lifetimes
from libs.common.messages import Event, EventKind

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# tolerances: this many standard errors
Z = 4.0


# --- arrivals -------------------------------------------------------------------------------


def test_poisson_arrivals_have_the_asked_rate_and_cv_one() -> None:
    rate, duration = 50.0, 4000.0
    times = poisson_arrivals(np.random.default_rng(1), rate, duration)
    expected = rate * duration
    # the count of a Poisson process: mean = variance = rate * duration
    assert abs(len(times) - expected) < Z * math.sqrt(expected)
    gaps = np.diff(times)
    # sample CV of exponential gaps: standard error ~ sqrt((2 + 6) / N) / 2
    assert abs(gaps.std() / gaps.mean() - 1.0) < Z * 0.5 * math.sqrt(8 / len(gaps))
    assert all(0 <= t < duration for t in times) and times == sorted(times)


@pytest.mark.parametrize("cv", [2.0, 4.0, 8.0])
def test_gamma_arrivals_have_the_asked_rate_and_cv(cv: float) -> None:
    rate, duration = 100.0, 2000.0
    times = gamma_arrivals(np.random.default_rng(int(cv)), rate, cv, duration)
    expected = rate * duration
    # a renewal process's count has variance ~ rate * duration * cv²
    assert abs(len(times) - expected) < Z * math.sqrt(expected) * cv
    gaps = np.diff(times)
    num = len(gaps)
    shape = 1 / cv**2
    # relative standard error of the sample CV: half that of the variance (kurtosis 3 + 6/k)
    # plus that of the mean (cv / sqrt(N))
    rel_se = 0.5 * math.sqrt((2 + 6 / shape) / num) + cv / math.sqrt(num)
    assert abs(gaps.std() / gaps.mean() - cv) < Z * rel_se * cv
    assert times == sorted(times)


def test_the_same_seed_writes_the_same_file_and_another_seed_does_not(
        tmp_path: Path) -> None:
    def write(name: str, seed: int) -> bytes:
        config = GenerateConfig(seed=seed, arrival="gamma", rate=3.0, cv=4.0, duration_s=60,
                                popularity="zipf")
        header, requests = generate(config)
        write_jsonl(tmp_path / name, [header, *requests])
        return (tmp_path / name).read_bytes()

    assert write("a.jsonl", 7) == write("b.jsonl", 7)
    assert write("a.jsonl", 7) != write("c.jsonl", 8)


def test_six_models_cover_every_app_and_size_with_the_published_slos() -> None:
    header, requests = generate(GenerateConfig(seed=0, rate=20, duration_s=30))
    seen = {(r.model, r.app, r.ttft_slo_s, r.tpot_slo_s) for r in requests}
    assert seen == {("chatbot-7b-0", "chatbot", 7.5, 0.2),
                    ("code-7b-1", "code", 7.5, 0.084),
                    ("summarization-7b-2", "summarization", 37.5, 0.084),
                    ("chatbot-13b-3", "chatbot", 12.0, 0.2),
                    ("code-13b-4", "code", 12.0, 0.116),
                    ("summarization-13b-5", "summarization", 60.0, 0.116)}
    assert header.num_models == 6 and header.rate == len(requests) / 30
    assert [r.request_id for r in requests] == [f"r{i:06d}" for i in range(len(requests))]


def test_real_model_names_replace_the_generated_ones_and_lengths_are_capped() -> None:
    _, requests = generate(GenerateConfig(seed=0, rate=20, duration_s=10, num_models=2,
                                          models=("m-a", "m-b"), max_prompt_tokens=32,
                                          max_output_tokens=4))
    assert {(r.model, r.app) for r in requests} == {("m-a", "chatbot"), ("m-b", "code")}
    assert max(r.prompt_tokens for r in requests) <= 32
    assert max(r.output_tokens for r in requests) <= 4


def test_zipf_popularity_is_inverse_rank() -> None:
    share = popularity(GenerateConfig(num_models=3, duration_s=1, popularity="zipf"))
    harmonic = 1 + 1 / 2 + 1 / 3
    assert share.tolist() == pytest.approx([1 / harmonic, 0.5 / harmonic, 1 / 3 / harmonic])


# --- traces ---------------------------------------------------------------------------------


def test_a_squeezed_csv_trace_gives_exactly_its_arrivals(tmp_path: Path) -> None:
    csv = tmp_path / "trace.csv"
    csv.write_text("time_s,model\n30,fn-b\n0,fn-a\n10,fn-a\n50,fn-c\n250,fn-a\n")
    trace = read_trace(csv)
    # 200 s of trace into 20 s: times / 10; 250 s -> 25 s is past the end
    _, requests = generate(GenerateConfig(arrival="trace", trace=trace, squeeze=(200, 20),
                                          num_models=2))
    assert [(r.arrival_s, r.model) for r in requests] == [
        (0.0, "chatbot-7b-0"), (1.0, "chatbot-7b-0"), (3.0, "code-7b-1"),
        (5.0, "chatbot-7b-0")]


def test_a_trace_without_squeeze_lasts_past_its_last_arrival(tmp_path: Path) -> None:
    csv = tmp_path / "trace.csv"
    csv.write_text("time_s\n0.5\n2.25\n")
    header, requests = generate(GenerateConfig(arrival="trace", trace=read_trace(csv),
                                               num_models=1))
    assert [r.arrival_s for r in requests] == [0.5, 2.25]
    assert header.duration_s == 3.0 and header.arrival == "trace"


def test_a_trace_without_a_time_column_is_refused(tmp_path: Path) -> None:
    csv = tmp_path / "trace.csv"
    csv.write_text("minute,count\n0,3\n")
    with pytest.raises(ValueError, match="time_s"):
        read_trace(csv)


def test_windowed_gamma_follows_the_trace_rate_per_window(tmp_path: Path) -> None:
    # 1000 arrivals in [0, 10), none in [10, 20), 1000 in [20, 30)
    rows = [f"{t / 100:.2f},fn" for t in range(1000)] + \
        [f"{20 + t / 100:.2f},fn" for t in range(1000)]
    csv = tmp_path / "trace.csv"
    csv.write_text("time_s,model\n" + "\n".join(rows) + "\n")
    header, requests = generate(GenerateConfig(
        arrival="windowed_gamma", trace=read_trace(csv), window_s=10, cv=1.0, cv_factor=2.0,
        num_models=3, duration_s=30))
    counts = np.bincount([int(r.arrival_s // 10) for r in requests], minlength=3)
    assert counts[1] == 0
    for count in (counts[0], counts[2]):
        assert abs(count - 1000) < Z * math.sqrt(1000) * 2.0
    assert header.cv == 2.0
    # one trace key keeps one endpoint
    assert {r.model for r in requests} == {"chatbot-7b-0"}


# --- worker lifetimes -----------------------------------------------------------------------


def _event(kind: str, worker_id: str, time: float, **data: object) -> Event:
    return Event(kind=kind, worker_id=worker_id, time=time, model="m", node_id="node-0",
                 data=dict(data))


def test_worker_lifetimes_run_from_placement_to_the_node_agents_stop_clipped_to_the_run(
        ) -> None:
    events = [
        _event(EventKind.WORKER_PLACED, "w1", 995.0, gpu_bytes=4_000_000_000, stage=0,
               degree=2),
        _event(EventKind.WORKER_PLACED, "w2", 1002.0, gpu_bytes=2_000_000_000, stage=1,
               degree=2),
        # the worker's own stop does not end it; the node agent's does
        _event(EventKind.WORKER_STOPPED, "w2", 1004.0, exit_code=0),
        _event(EventKind.WORKER_STOPPED, "w2", 1005.0, by="node_agent"),
        _event(EventKind.WORKER_PLACED, "w3", 900.0, gpu_bytes=1),
        _event(EventKind.WORKER_STOPPED, "w3", 950.0, by="node_agent"),
    ]
    lifetimes = worker_lifetimes(events, started_at=1000.0, ended_at=1010.0, models={"m"})
    assert lifetimes == [
        WorkerLifetime(worker_id="w1", model="m", node_id="node-0",
                       gpu_memory_bytes=4_000_000_000, start_s=0.0, end_s=10.0, stage=0,
                       degree=2),
        WorkerLifetime(worker_id="w2", model="m", node_id="node-0",
                       gpu_memory_bytes=2_000_000_000, start_s=2.0, end_s=5.0, stage=1,
                       degree=2),
    ]
    assert worker_lifetimes(events, started_at=1000.0, ended_at=1010.0, models={"x"}) == []


# --- the analyzer ---------------------------------------------------------------------------


def _result(request_id: str, app: str, model: str, *, ttft: float | None,
            tpot: float | None, slos: tuple[float, float], status: str = "ok"
            ) -> RequestResult:
    return RequestResult(request_id=request_id, model=model, app=app, submit_s=0.0,
                         ttft_s=ttft, tpot_s=tpot, output_tokens=10, status=status,
                         error=None if status == "ok" else "boom", ttft_slo_s=slos[0],
                         tpot_slo_s=slos[1])


RESULTS = [
    _result("r1", "chatbot", "m1", ttft=1.0, tpot=0.1, slos=(7.5, 0.2)),     # both met
    _result("r2", "chatbot", "m1", ttft=8.0, tpot=0.1, slos=(7.5, 0.2)),     # TTFT missed
    _result("r3", "code", "m2", ttft=2.0, tpot=0.2, slos=(7.5, 0.084)),      # TPOT missed
    _result("r4", "code", "m2", ttft=None, tpot=None, slos=(7.5, 0.084), status="error"),
    # one token: no TPOT, which counts as met
    _result("r5", "summarization", "m3", ttft=30.0, tpot=None, slos=(37.5, 0.084)),
]


def _workers(scale: float) -> list[WorkerLifetime]:
    return [WorkerLifetime(worker_id="w1", model="m1", node_id="n", gpu_memory_bytes=2 * 10**9,
                           start_s=0.0, end_s=10.0 * scale),
            WorkerLifetime(worker_id="w2", model="m2", node_id="n", gpu_memory_bytes=10**9,
                           start_s=5.0, end_s=5.0 + 10.0 * scale)]


def test_summarize_gives_exact_attainment_percentiles_and_cost() -> None:
    summary = summarize(RunHeader(name="live", policy="hydraserve"), RESULTS, _workers(1.0))
    assert summary.overall == Attainment(num_requests=5, num_ok=4, ttft=0.6, tpot=0.6,
                                         both=0.4)
    assert summary.by_app == {
        "chatbot": Attainment(num_requests=2, num_ok=2, ttft=0.5, tpot=1.0, both=0.5),
        "code": Attainment(num_requests=2, num_ok=1, ttft=0.5, tpot=0.0, both=0.0),
        "summarization": Attainment(num_requests=1, num_ok=1, ttft=1.0, tpot=1.0, both=1.0),
    }
    assert list(summary.by_model) == ["m1", "m2", "m3"]
    assert summary.by_model["m2"] == summary.by_app["code"]
    # TTFTs of ok requests [1, 2, 8, 30], linear interpolation
    assert summary.ttft_s == pytest.approx({50: 5.0, 90: 23.4, 99: 29.34})
    # TPOTs [0.1, 0.1, 0.2]
    assert summary.tpot_s == pytest.approx({50: 0.1, 90: 0.18, 99: 0.198})
    # 2 GB x 10 s + 1 GB x 10 s = 30 GB·s over 5 requests
    assert summary.gpu_gb_s == 30.0 and summary.cost_gb_s_per_request == 6.0
    assert summary.ttfts == [1.0, 2.0, 8.0, 30.0]
    text = "\n".join(format_summary(summary))
    assert "app code" in text and "6.000 GB·s per request" in text


def test_a_comparison_has_a_column_per_run_and_ratios_to_the_first() -> None:
    base = summarize(RunHeader(name="a", policy="p"), RESULTS, _workers(1.0))
    dearer = summarize(RunHeader(name="b", policy="p"), RESULTS[:4], _workers(2.0))
    rows = dict(comparison_rows([base, dearer]))
    assert rows["requests"] == [5, 4]
    assert rows["both SLOs attainment"] == [0.4, 0.25]
    assert rows["both SLOs summarization"] == [1.0, None]
    # 60 GB·s over 4 requests
    assert rows["GPU GB·s per request"] == [6.0, 15.0]
    lines = format_comparison([base, dearer])
    assert lines[0].split() == ["metric", "a", "b", "b/a"]
    cost_line = next(line for line in lines if line.startswith("GPU GB·s per request"))
    assert cost_line.split()[-3:] == ["6.000", "15.000", "2.500"]
    both_line = next(line for line in lines if line.startswith("both SLOs attainment"))
    assert both_line.split()[-3:] == ["0.400", "0.250", "0.625"]


def test_the_charts_are_png_files(tmp_path: Path) -> None:
    summaries = [summarize(RunHeader(name=n, policy="p"), RESULTS, _workers(1.0))
                 for n in ("a", "b")]
    paths = write_plots(summaries, tmp_path / "png")
    assert [p.name for p in paths] == ["ttft_cdf.png", "attainment.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


# --- the command line -----------------------------------------------------------------------


def test_the_cli_generates_then_analyzes(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    workload = tmp_path / "w.jsonl"
    assert main(["workload", "generate", str(workload), "--arrival", "gamma", "--cv", "2",
                 "--rate", "5", "--duration", "20", "--seed", "3"]) == 0
    header, requests = read_workload(workload)
    assert header.arrival == "gamma" and header.cv == 2.0 and header.seed == 3 and requests
    results = tmp_path / "r.jsonl"
    write_jsonl(results, [RunHeader(name="live", policy="p"), *RESULTS, *_workers(1.0)])
    assert read_results(results)[1] == RESULTS
    assert main(["workload", "analyze", str(results), str(results),
                 "--png-dir", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert "live/live" in out and (tmp_path / "png" / "attainment.png").exists()


def test_the_cli_names_a_bad_argument(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workload", "generate", str(tmp_path / "w.jsonl"), "--arrival", "gamma"]
                ) == 1
    assert "needs duration_s" in capsys.readouterr().err
