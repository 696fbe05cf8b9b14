"""Runs an engine's step loop in a thread of its own, so the asyncio loop keeps serving NATS.

The engine is not thread-safe: every call into it (add, abort, step) happens on the engine
thread. Other threads submit commands through a queue and get a `concurrent.futures.Future`
back; step outputs go to a callback, called on the engine thread. Nothing here knows about
the bus.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Protocol

from libs.common.metrics import STEP_DURATION

if TYPE_CHECKING:  # not imported at run time: this module loads before torch does
    from services.worker.engine.sequence import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class Engine(Protocol):
    """The part of `LLMEngine` the loop drives."""

    def add_request(self, request_id: str, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, *,
                    messages: list[dict[str, str]] | None = None) -> Any: ...

    def abort(self, request_id: str) -> RequestOutput | None: ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...


_Command = tuple[Callable[[], Any], "Future[Any]"]


class EngineLoop:
    """`start()`, then `add()`/`abort()` from any thread; `stop()` ends the thread."""

    def __init__(self, engine: Engine, *, on_outputs: Callable[[list[RequestOutput]], None],
                 on_crash: Callable[[Exception], None]) -> None:
        self._engine = engine
        self._on_outputs = on_outputs
        self._on_crash = on_crash
        self._commands: queue.SimpleQueue[_Command | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        # guards `_stopping` together with the queue, so no command is queued after the end
        self._lock = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def add(self, request_id: str, prompt: str | list[int] | None, params: SamplingParams,
            *, messages: list[dict[str, str]] | None = None) -> Future[None]:
        """Queue a request; the future fails with the engine's HydraError for a bad request."""

        def add() -> None:
            self._engine.add_request(request_id, prompt, params, messages=messages)

        return self._submit(add)

    def abort(self, request_id: str) -> Future[RequestOutput | None]:
        """Stop a request; the future holds its final (aborted) output, or None if unknown."""
        return self._submit(lambda: self._engine.abort(request_id))

    def call(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` on the engine thread between steps; its result or error in the future."""
        return self._submit(fn)

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping = True
            self._commands.put(None)  # wakes the thread if it is idle
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _submit(self, call: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._stopping:
                future.set_exception(RuntimeError("the engine loop is not running"))
            else:
                self._commands.put((call, future))
        return future

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self._engine.has_unfinished():
                    self._apply(self._commands.get())  # idle: sleep until a command comes
                self._apply_queued()
                if self._engine.has_unfinished() and not self._stopping:
                    started = time.perf_counter()
                    outputs = self._engine.step()
                    STEP_DURATION.observe(time.perf_counter() - started)
                    if outputs:
                        self._on_outputs(outputs)
        except Exception as exc:  # the engine is in an unknown state: report it and end
            logger.exception("the engine loop crashed")
            self._on_crash(exc)
        finally:
            self._fail_pending()

    def _apply_queued(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._apply(command)

    def _apply(self, command: _Command | None) -> None:
        if command is None:
            return
        call, future = command
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call())
        except Exception as exc:  # the caller's future carries it (HydraError: a bad request)
            future.set_exception(exc)

    def _fail_pending(self) -> None:
        with self._lock:
            self._stopping = True
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None and command[1].set_running_or_notify_cancel():
                command[1].set_exception(RuntimeError("the engine loop stopped"))
