"""`hydraserve events timeline`: a degree-2 cold start, stage by stage, as a table and as a
PNG Gantt chart, from hand-made events with exact times."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hydraserve.cli import build_parser
from hydraserve.event_view import Phase, cold_start, format_cold_start
from hydraserve.events import show_timeline
from libs.common.messages import Event, EventKind

pytestmark = pytest.mark.unit

T0 = 1_700_000_000.0
RID, EP, MODEL = "cmpl-1", "ep-1", "tiny"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def at(kind: str, dt: float, **fields: object) -> Event:
    return Event(kind=kind, time=T0 + dt, model=MODEL, **fields)  # type: ignore[arg-type]


def phases(**offsets: float) -> dict[str, float]:
    return {f"{name}_at": T0 + dt for name, dt in offsets.items()}


def degree_2_cold_start() -> list[Event]:
    """Stage 0 is w0 (layers 0-2), stage 1 is w1 (layers 2-4); then a consolidation."""
    w0 = {"endpoint_id": EP, "worker_id": "w0"}
    w1 = {"endpoint_id": EP, "worker_id": "w1"}
    events = [
        at(EventKind.REQUEST_RECEIVED, 0.0, request_id=RID),
        at(EventKind.WORKER_PLACED, 0.010, **w0,
           data={"degree": 2, "stage": 0, "start_layer": 0, "end_layer": 2}),
        at(EventKind.WORKER_PLACED, 0.020, **w1,
           data={"degree": 2, "stage": 1, "start_layer": 2, "end_layer": 4}),
        at(EventKind.FETCH_STARTED, 0.050, worker_id="w0", data={"degree": 2, "stage": 0}),
        at(EventKind.FETCH_STARTED, 0.060, worker_id="w1", data={"degree": 2, "stage": 1}),
        at(EventKind.WORKER_LAUNCHED, 0.080, worker_id="w0", data={"pid": 100}),
        at(EventKind.WORKER_LAUNCHED, 0.090, worker_id="w1", data={"pid": 101}),
        at(EventKind.FETCH_PROGRESS, 0.500, worker_id="w0",
           data={"received_bytes": 5, "total_bytes": 10}),
        at(EventKind.FETCH_DONE, 1.050, worker_id="w0", data={"fetch_s": 1.0}),
        at(EventKind.FETCH_DONE, 1.260, worker_id="w1", data={"fetch_s": 1.2}),
        at(EventKind.WORKER_STARTED, 0.600, **w0,
           data={"phases": phases(process_started=0.070, imports_done=0.570)}),
        at(EventKind.WORKER_READY, 2.000, **w0, data={"phases": phases(
            process_started=0.070, imports_done=0.570, engine_imported=0.870,
            partition_mapped=0.900, load_started=0.950, loaded=1.900, ready=2.000)}),
        at(EventKind.WORKER_READY, 2.200, **w1, data={"phases": phases(
            process_started=0.085, imports_done=0.600, engine_imported=0.900,
            partition_mapped=0.950, load_started=1.000, loaded=2.100, ready=2.200)}),
        at(EventKind.ENDPOINT_PIPELINE_READY, 2.250, endpoint_id=EP, data={"degree": 2}),
        at(EventKind.REQUEST_FIRST_TOKEN, 2.750, request_id=RID, **w0,
           data={"queue_s": 2.3, "ttft_s": 2.75}),
        at(EventKind.ENDPOINT_CONSOLIDATE, 3.000, endpoint_id=EP, data={"stages": [1]}),
        at(EventKind.REQUEST_DONE, 4.000, request_id=RID, **w0,
           data={"queue_s": 2.3, "ttft_s": 2.75, "e2e_s": 4.0}),
        at(EventKind.KV_HANDOVER, 5.000, **w0),
        at(EventKind.KV_EXPORTED, 5.020, **w1, data={"num_seqs": 1}),
        at(EventKind.KV_MIGRATED, 5.100, **w0, data={"num_seqs": 1}),
        at(EventKind.WORKER_CONSOLIDATED, 5.200, **w0),
        # not part of it: another endpoint, another request on this endpoint, and a worker
        # placed on this endpoint after the request finished
        at(EventKind.WORKER_PLACED, 0.030, endpoint_id="ep-2", worker_id="w5",
           data={"degree": 1, "stage": 0, "start_layer": 0, "end_layer": 4}),
        at(EventKind.REQUEST_FIRST_TOKEN, 3.500, request_id="cmpl-2", **w0,
           data={"queue_s": 0.1, "ttft_s": 0.2}),
        at(EventKind.WORKER_PLACED, 9.000, endpoint_id=EP, worker_id="w9",
           data={"degree": 2, "stage": 1, "start_layer": 2, "end_layer": 4}),
    ]
    return events[::-1]  # services publish out of time order


def test_cold_start_table_lists_each_stage_s_phases_then_the_request_and_markers() -> None:
    start = cold_start(RID, degree_2_cold_start())

    assert start is not None
    assert format_cold_start(start) == [
        "request cmpl-1  endpoint ep-1  degree 2  (seconds since request.received)",
        "stage  worker  phase              start       end  duration",
        "0      w0      fetch              0.050     1.050     1.000",
        "0      w0      process start      0.010     0.070     0.060",
        "0      w0      imports            0.070     0.570     0.500",
        "0      w0      engine import      0.570     0.870     0.300",
        "0      w0      build              0.870     0.950     0.080",
        "0      w0      load               0.950     1.900     0.950",
        "0      w0      engine ready       1.900     2.000     0.100",
        "1      w1      fetch              0.060     1.260     1.200",
        "1      w1      process start      0.020     0.085     0.065",
        "1      w1      imports            0.085     0.600     0.515",
        "1      w1      engine import      0.600     0.900     0.300",
        "1      w1      build              0.900     1.000     0.100",
        "1      w1      load               1.000     2.100     1.100",
        "1      w1      engine ready       2.100     2.200     0.100",
        "-      -       queue              0.000     2.300     2.300",
        "-      -       prefill            2.300     2.750     0.450",
        "-      -       pipeline ready     2.250",
        "0      w0      first token        2.750",
        "-      -       consolidate        3.000",
        "0      w0      request done       4.000",
        "0      w0      kv handover        5.000",
        "1      w1      kv exported        5.020",
        "0      w0      kv migrated        5.100",
        "0      w0      consolidated       5.200",
    ]


def test_each_stage_s_load_and_fetch_durations_are_exact() -> None:
    start = cold_start(RID, degree_2_cold_start())

    assert start is not None
    durations = {(p.stage, p.name): p.duration_s for p in start.phases}
    assert [(w.stage, w.worker_id, w.start_layer, w.end_layer) for w in start.stages] == [
        (0, "w0", 0, 2), (1, "w1", 2, 4)]
    assert durations[(0, "fetch")] == pytest.approx(1.0, abs=1e-6)
    assert durations[(1, "fetch")] == pytest.approx(1.2, abs=1e-6)
    assert durations[(0, "load")] == pytest.approx(0.95, abs=1e-6)
    assert durations[(1, "load")] == pytest.approx(1.1, abs=1e-6)
    assert durations[(None, "prefill")] == pytest.approx(0.45, abs=1e-6)


def test_a_worker_without_recorded_phases_starts_at_its_launch_event() -> None:
    events = [e for e in degree_2_cold_start()
              if not (e.worker_id == "w1" and e.kind == EventKind.WORKER_READY)]

    start = cold_start(RID, events)

    assert start is not None
    assert [p for p in start.phases if p.stage == 1] == [
        Phase("fetch", pytest.approx(0.060), pytest.approx(1.260), 1),  # type: ignore[arg-type]
        Phase("process start", pytest.approx(0.020), pytest.approx(0.090), 1),  # type: ignore[arg-type]
    ]


def test_timeline_prints_the_stage_table_before_the_events() -> None:
    out = io.StringIO()

    assert show_timeline(RID, degree_2_cold_start(), out) == 0

    lines = out.getvalue().splitlines()
    blank = lines.index("")
    assert lines[0].startswith("request cmpl-1  endpoint ep-1  degree 2")
    assert lines[blank + 1].split()[:2] == ["+0.000s", "request.received"]
    assert "cmpl-2" not in out.getvalue()


def test_timeline_without_placed_workers_prints_only_the_events() -> None:
    events = [at(EventKind.REQUEST_RECEIVED, 0.0, request_id=RID),
              at(EventKind.REQUEST_FIRST_TOKEN, 1.0, request_id=RID, worker_id="w0",
                 endpoint_id=EP, data={"queue_s": 0.5, "ttft_s": 1.0})]
    out = io.StringIO()

    assert show_timeline(RID, events, out) == 0

    assert [line.split()[:2] for line in out.getvalue().splitlines()] == [
        ["+0.000s", "request.received"], ["+1.000s", "request.first_token"]]
    assert cold_start(RID, events) is None


def test_png_option_writes_a_gantt_chart(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["events", "timeline", RID, "--png", str(tmp_path / "chart.png")])

    assert show_timeline(args.request_id, degree_2_cold_start(), io.StringIO(),
                         png=args.png) == 0

    data = args.png.read_bytes()
    # IHDR: width and height in pixels, big-endian, right after the chunk's length and type
    width, height = struct.unpack(">II", data[16:24])
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert (width, height) == (1100, 375) and len(data) > 20_000


def test_png_option_without_placed_workers_exits_1(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    events = [at(EventKind.REQUEST_RECEIVED, 0.0, request_id=RID)]

    assert show_timeline(RID, events, io.StringIO(), png=tmp_path / "chart.png") == 1

    assert "no placed workers" in capsys.readouterr().err
    assert not (tmp_path / "chart.png").exists()


def test_the_events_command_imports_matplotlib_only_to_draw() -> None:
    script = ("import sys, hydraserve.cli, hydraserve.events, hydraserve.gantt\n"
              "print(any(m.split('.')[0] == 'matplotlib' for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"
