"""A worker fork server: a process with the worker's imports (torch included) done, that
forks a ready-imported worker for each placement.

A cold start otherwise spends seconds importing torch before the engine can take its first
tensor; on a node whose fetch is short (a host-cache hit, a fast NIC, or several emulated
nodes sharing a few cores) that import is the critical path. The node agent starts one zygote
(`--launcher forkserver`, `services.prefetcher.forkserver`) and talks to it over its stdin and
stdout, one JSON object a line:

- agent -> zygote: `{"id": N, "argv": [...], "env": {...}, "log_path": "..."}`: fork a worker
  running `python -m services.worker <argv>` with `env` added, its output to `log_path`;
- zygote -> agent: `{"id": N, "pid": P}` once forked (or `{"id": N, "error": "..."}`), and
  `{"exit": P, "code": C}` when a worker ends (the zygote is its parent and reaps it).

The zygote is single-threaded (a fork copies only the calling thread, so no lock can be held
by another) and never runs a torch op (the OpenMP pool is created in the child, after the
fork). Each child starts a session of its own and dies with the zygote, which dies with its
agent (parent-death signals).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

# the worker's whole import path, engine included: what every forked worker skips
import services.worker.__main__ as worker_main
import services.worker.engine.engine
import services.worker.partition
import services.worker.pipeline.driver
import services.worker.pipeline.link
import services.worker.pipeline.stage
import services.worker.service
import services.worker.stage_service  # noqa: F401
from libs.common.embedded.process import parent_death_preexec


def _child(request: dict[str, Any], die_with_zygote: Callable[[], None] | None) -> None:
    """In the forked child: become the worker; never returns."""
    code = 1
    try:
        os.setsid()
        if die_with_zygote is not None:
            die_with_zygote()
        log = os.open(request["log_path"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.update(request.get("env", {}))
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        # the imports were done before the fork: the worker's phases start now
        worker_main.IMPORTS_DONE_AT = time.time()
        code = worker_main.main(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # the child must end here, whatever happened
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> int:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ, "request")
    selector.register(read_fd, selectors.EVENT_READ, "child")
    print(json.dumps({"ready": os.getpid()}), file=reply)
    pending = b""
    while True:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(read_fd, 4096)
                continue
            data = os.read(0, 1 << 16)
            if not data:  # the agent is gone
                return 0
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                _fork(json.loads(line), selector, reply)
        _reap(reply)


# made in the zygote, before any fork: it checks the child's parent is this process
_DIE_WITH_ZYGOTE = parent_death_preexec(signal.SIGKILL)


def _fork(request: dict[str, Any], selector: selectors.BaseSelector, reply: Any) -> None:
    try:
        pid = os.fork()
    except OSError as exc:
        print(json.dumps({"id": request["id"], "error": repr(exc)}), file=reply)
        return
    if pid == 0:
        selector.close()
        _child(request, _DIE_WITH_ZYGOTE)
    print(json.dumps({"id": request["id"], "pid": pid}), file=reply)


def _reap(reply: Any) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        print(json.dumps({"exit": pid, "code": os.waitstatus_to_exitcode(status)}), file=reply)


if __name__ == "__main__":
    sys.exit(serve())
