"""Keep a pipeline worker's cores out of their idle state while frames flow.

A pipeline stage computes for a fraction of each token and waits for the next frame the rest
of the time. A waiting core halts; on a virtual machine the host then takes the physical core
away (or lets it sleep), and the next frame lands on a core that must be woken and whose
caches are cold. On the 2-core VM of docs/BENCHMARKS.md a stage's three layers ran 10-28%
slower than the same layers inside a whole-model worker, which never waits. The usual remedy
is busy-polling (NCCL's proxy threads, DPDK); a Python thread cannot spin beside the stage's
compute without taking the GIL from it, so the spinning happens in helper processes instead:
one per core the worker may run on (at most `MAX_SPINNERS`), pinned to it, at `SCHED_IDLE`
priority, each in a session of its own whose autogroup runs at nice 19. They run when nothing
else wants the core (any other task preempts them at once, and the kernel places a woken task
on a core that runs only such tasks as if it were idle), so they take next to no CPU time
from any other process; they keep the core from halting. The session matters: with autogroups
on (most desktop and VM kernels), CPU time is shared between sessions first, and a spinner
left in its worker's session kept that session runnable, so it took a full session's share
from every other worker: pipeline stages ran 3-4x slower in `bench/coldstart.py`, where four
workers share two cores (docs/BENCHMARKS.md). `WorkerSettings.keep_awake` (default on) turns
them on for pipeline workers, from the pipeline's start of service to its consolidation.

They spin only while the pipeline is busy: the worker stamps a shared page on every frame
(`poke`, ~1 µs; the page is an anonymous memory file the helpers inherit), and a helper
whose stamp is older than `idle_after_s` sleeps in 50 ms naps until the next one. They exit
with the worker (a parent check every ~10-50 ms) and on `stop`.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

_STAMP = struct.Struct("d")
# spinners a worker starts at most (the first cores of its affinity mask): a pod on a big
# node that is not pinned to a few cores should not start a process per core of the node
MAX_SPINNERS = 8

# the spinner's first line: how a process is recognised as one
SPINNER_MARK = "# hydraserve keep-awake spinner"
# argv: cpu, stamp fd (a memfd, inherited), idle_after_s, parent pid. No imports beyond the
# interpreter's own (started with -S): it is running in ~20 ms.
_SPINNER = SPINNER_MARK + """
import mmap, os, struct, sys, time
cpu, fd, idle_after, parent = (int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]),
                               int(sys.argv[4]))
os.sched_setaffinity(0, {cpu})
os.setsid()
try:  # a session of its own is an autogroup of its own: make that group weigh next to nothing
    with open("/proc/self/autogroup", "w") as group:
        group.write("19")
except OSError:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as enabled:
            autogroups = enabled.read().strip() == "1"
    except OSError:
        autogroups = False
    if autogroups:  # a full-weight group of its own would take a session's share: don't spin
        sys.exit("keep-awake: cannot lower this session's autogroup; not spinning")
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
page = mmap.mmap(fd, 8, prot=mmap.PROT_READ)
os.close(fd)
unpack, now = struct.Struct("d").unpack_from, time.monotonic
while os.getppid() == parent:
    if now() - unpack(page, 0)[0] > idle_after:
        time.sleep(0.05)
        continue
    for _ in range(200_000):  # ~10-50 ms of spinning between checks
        pass
"""


def supported() -> bool:
    """Linux: idle-priority scheduling, affinity and anonymous memory files."""
    return all(hasattr(os, name) for name in ("SCHED_IDLE", "sched_getaffinity",
                                              "memfd_create", "setsid"))


class KeepAwake:
    """Idle-priority spinners on this process's cores, busy while `poke` is recent."""

    def __init__(self, *, idle_after_s: float = 1.0, cpus: set[int] | None = None) -> None:
        self.idle_after_s = idle_after_s
        if cpus is None:
            cpus = os.sched_getaffinity(0) if supported() else set()
        self.cpus = sorted(cpus)[:MAX_SPINNERS]
        self._procs: list[subprocess.Popen[bytes]] = []
        self._page: mmap.mmap | None = None

    @property
    def num_spinners(self) -> int:
        return len(self._procs)

    def start(self) -> None:
        if not self.cpus:
            logger.info("keep-awake needs Linux (SCHED_IDLE, memfd); cores may idle")
            return
        # the stamp lives in an anonymous memory file: nothing to clean up if we are killed
        fd = os.memfd_create("hydraserve-keep-awake")
        try:
            os.write(fd, _STAMP.pack(0.0))
            self._page = mmap.mmap(fd, _STAMP.size)
            self.poke()
            for cpu in self.cpus:
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-S", "-c", _SPINNER, str(cpu), str(fd),
                     str(self.idle_after_s), str(os.getpid())], pass_fds=(fd,),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        finally:
            os.close(fd)
        logger.info("keeping cores %s awake while the pipeline is busy", self.cpus)

    def poke(self) -> None:
        """A frame went by: spin for the next `idle_after_s`."""
        if self._page is not None:
            _STAMP.pack_into(self._page, 0, time.monotonic())

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                _, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                continue
            # a spinner that could not take idle priority exits with an error: it never
            # spins at normal priority
            if proc.returncode not in (0, -15) and err:
                logger.warning("a keep-awake spinner failed: %s", err.decode().strip()[-300:])
        self._procs.clear()
        if self._page is not None:
            self._page.close()
            self._page = None
