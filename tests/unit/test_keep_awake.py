"""KeepAwake: idle-priority spinners, one per core, busy only while pokes are recent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.worker.keep_awake import MAX_SPINNERS, KeepAwake

pytestmark = pytest.mark.unit


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks the process has run."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def spinner_pids(parent: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True,
                         text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


def wait_until(condition, timeout_s: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_spinners_idle_priority_pinned_and_busy_only_while_poked() -> None:
    cpus = sorted(os.sched_getaffinity(0))[:MAX_SPINNERS]
    keep_awake = KeepAwake(idle_after_s=0.3)
    keep_awake.start()
    try:
        pids = [p.pid for p in keep_awake._procs]
        assert keep_awake.num_spinners == len(cpus)
        # the spinner sets its own policy and affinity as it starts
        assert wait_until(lambda: all(os.sched_getscheduler(p) == os.SCHED_IDLE for p in pids))
        # each in a session of its own, away from the worker's (its autogroup, where enabled)
        assert all(os.getsid(p) == p for p in pids)
        assert [os.sched_getaffinity(p) for p in pids] == [{cpu} for cpu in cpus]

        keep_awake.poke()
        before = [cpu_ticks(p) for p in pids]
        for _ in range(5):  # poked more often than idle_after_s: they spin throughout
            time.sleep(0.1)
            keep_awake.poke()
        spun = [cpu_ticks(p) - b for p, b in zip(pids, before, strict=True)]
        assert all(ticks > 0 for ticks in spun), spun

        time.sleep(0.5)  # no poke for longer than idle_after_s: they nap
        before = [cpu_ticks(p) for p in pids]
        time.sleep(0.5)
        napped = [cpu_ticks(p) - b for p, b in zip(pids, before, strict=True)]
        assert all(ticks <= 2 for ticks in napped), napped
    finally:
        keep_awake.stop()
    assert keep_awake.num_spinners == 0
    assert not any(alive(p) for p in pids)
    assert keep_awake._page is None


def test_no_cores_no_spinners() -> None:
    keep_awake = KeepAwake(cpus=set())
    keep_awake.start()
    keep_awake.poke()
    assert keep_awake.num_spinners == 0
    keep_awake.stop()


def test_spinners_exit_with_the_worker() -> None:
    worker = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from services.worker.keep_awake import MAX_SPINNERS, KeepAwake\n"
         "k = KeepAwake(); k.start(); print('up', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "up\n"
        pids = spinner_pids(worker.pid)
        assert len(pids) == min(len(os.sched_getaffinity(0)), MAX_SPINNERS)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    # orphaned, each notices its parent is gone within one check
    assert wait_until(lambda: not any(alive(p) for p in pids), timeout_s=5.0)
