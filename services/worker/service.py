"""The worker service: pulls a model's requests from NATS, runs them, streams the tokens back.

Life of a request here: pulled from `hs.req.<model>` through the durable consumer the model's
workers share (at most `capacity` held at once) -> handed to the engine loop -> every step's
output published as the next `TokenChunk` on `hs.tok.<request_id>` -> the message acked only
once the request has finished. Until then it is kept alive with in-progress acks; if this
process dies, JetStream redelivers it to another worker after `ack_wait`. A request the engine
refuses (HydraError) gets one error chunk and is terminated (never redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from pydantic import ValidationError

from libs.common.bus import EventPublisher, connect, ensure_request_consumer, ensure_streams
from libs.common.errors import HydraError
from libs.common.logging import set_request_id
from libs.common.messages import EventKind, GenerateRequest, TokenChunk
from libs.common.subjects import REQUESTS_STREAM, token_subject
from libs.common.tracing import extract_context
from services.worker.config import WorkerConfig, load_engine
from services.worker.engine_loop import Engine, EngineLoop
from services.worker.observe import record_request, record_startup
from services.worker.protocol import RequestProgress, engine_inputs, is_expired
from services.worker.puller import BoundedPuller

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from services.worker.engine.sequence import RequestOutput
    from services.worker.pipeline.link import PipelineLink

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    msg: Msg
    progress: RequestProgress
    # the gateway's trace context, from the message's `traceparent` header
    trace_context: Context | None = None


class WorkerService:
    def __init__(self, config: WorkerConfig, *,
                 engine_factory: Callable[[WorkerConfig], Engine] = load_engine) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._in_flight: dict[str, _InFlight] = {}
        self._outputs: asyncio.Queue[list[RequestOutput] | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: asyncio.Future[Exception] | None = None
        self._nc: NATS | None = None
        self._puller: BoundedPuller | None = None
        self._engine_loop: EngineLoop | None = None
        self._events: EventPublisher | None = None
        # stage 0 of a pipeline: the data plane and control events
        self._pipeline: PipelineLink | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> int:
        """Serve until `stop` is set (then drain) or the engine crashes; the exit code."""
        started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._failed = self._loop.create_future()
        loading = asyncio.create_task(asyncio.to_thread(self._engine_factory, self.config))
        nc = self._nc = await connect(self.config.nats, name=f"worker-{self.config.worker_id}")
        js = nc.jetstream()
        events = self._events = EventPublisher(
            nc, model=self.config.model, worker_id=self.config.worker_id,
            node_id=self.config.node_id, endpoint_id=self.config.endpoint_id)
        try:
            await ensure_streams(js, self.config.bus)
            await events.publish(EventKind.WORKER_STARTED, pid=os.getpid(),
                                 capacity=self.config.worker.capacity,
                                 model_dir=str(self.config.model_dir),
                                 phases=dict(self.config.phases))
            try:
                engine = await loading
            except Exception as exc:
                await self._event(EventKind.WORKER_STOPPED, exit_code=1, error=repr(exc))
                raise
            load_s = time.monotonic() - started
            if self.config.degree > 1:
                engine = await self._start_pipeline(engine)
            self._engine_loop = EngineLoop(engine, on_outputs=self._from_engine_thread,
                                           on_crash=self._crash_from_engine_thread)
            if self._pipeline is None:
                await self._report_ready(load_s)
            else:
                await self._report_ready(load_s)
                if not await self._wait_for_pipeline(stop):
                    return 0
            self._engine_loop.start()
            if self._pipeline is not None:
                self._pipeline.serving(self._engine_loop)
            self._puller = BoundedPuller(
                await self._subscribe(js), has_room=self._has_room, on_message=self._accept,
                on_connection_lost=self._fail, fetch_timeout_s=self.config.worker.fetch_timeout_s)
            return await self._serve(stop)
        finally:
            if not loading.done():
                loading.cancel()
            if self._pipeline is not None:
                await self._pipeline.close()
            with contextlib.suppress(NatsError):  # flushes the last chunks, acks and events
                await nc.drain()

    async def _report_ready(self, load_s: float) -> None:
        assert self._events is not None
        self.config.phases["ready_at"] = time.time()
        record_startup(self.config.phases, load_s=load_s)
        await self._events.publish(EventKind.WORKER_READY, load_s=round(load_s, 6),
                                   capacity=self.config.worker.capacity,
                                   stage=self.config.stage, degree=self.config.degree,
                                   phases=dict(self.config.phases))
        logger.info("worker %s ready for model %r in %.2fs", self.config.worker_id,
                    self.config.model, load_s)

    async def _start_pipeline(self, engine: Engine) -> Engine:
        """Stage 0 of a pipeline: drive the other stages over the data plane."""
        from services.worker.engine.engine import LLMEngine
        from services.worker.pipeline.driver import PipelineDriver
        from services.worker.pipeline.link import PipelineLink

        assert isinstance(engine, LLMEngine) and self._nc is not None
        channel_send: list[Callable[[int, bytes], None]] = []
        driver = PipelineDriver(engine, degree=self.config.degree,
                                send=lambda stage, frame: channel_send[0](stage, frame))
        self._pipeline = PipelineLink(self._nc, self.config, driver,
                                      publish=self._publish_event)
        channel_send.append(self._pipeline.channel.send_threadsafe)
        await self._pipeline.start()
        return driver

    async def _wait_for_pipeline(self, stop: asyncio.Event) -> bool:
        """Until every stage is ready (the scheduler says so) and answers; False if stopped."""
        assert self._pipeline is not None
        ready = asyncio.create_task(self._pipeline.ready.wait())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        if stop.is_set():
            await self._event(EventKind.WORKER_STOPPED, exit_code=0)
            return False
        await self._pipeline.connect()
        return True

    async def _publish_event(self, kind: str, **data: Any) -> None:
        await self._event(kind, **data)

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        settings = self.config.worker
        consumer = await ensure_request_consumer(
            js, self.config.model, ack_wait_s=settings.ack_wait_s,
            max_deliver=settings.max_deliver)
        return await js.pull_subscribe_bind(durable=consumer, stream=REQUESTS_STREAM)

    async def _serve(self, stop: asyncio.Event) -> int:
        assert self._failed is not None and self._engine_loop is not None
        assert self._puller is not None
        puller = asyncio.create_task(self._puller.run())
        puller.add_done_callback(self._pulling_ended)
        publisher = asyncio.create_task(self._publish_loop())
        keepalive = asyncio.create_task(self._keepalive_loop())
        stop_wait = asyncio.create_task(stop.wait())
        waiters: list[asyncio.Future[Any]] = [stop_wait, self._failed]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        self._puller.stop()
        await asyncio.wait([puller])  # ends within one fetch timeout; errors are reported
        exit_code = 0
        if self._failed.done():
            await self._hand_back_all(reason=f"worker failed: {self._failed.result()!r}")
            exit_code = 1
        else:
            await self._drain()
        await asyncio.to_thread(self._engine_loop.stop, 10.0)
        self._outputs.put_nowait(None)
        await publisher
        keepalive.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._event(EventKind.WORKER_STOPPED, exit_code=exit_code)
        return exit_code

    async def _drain(self) -> None:
        """Give in-flight requests `drain_timeout_s` to finish; hand back the rest."""
        await self._event(EventKind.WORKER_STOPPING, num_in_flight=len(self._in_flight))
        deadline = time.monotonic() + self.config.worker.drain_timeout_s
        while self._in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight:
            await self._hand_back_all(reason="shutdown drain timed out")

    async def _hand_back_all(self, *, reason: str) -> None:
        """Return every in-flight request to the queue (nak) for another worker to redo it."""
        assert self._engine_loop is not None
        flights, self._in_flight = list(self._in_flight.values()), {}
        for flight in flights:
            logger.warning("handing back request %s: %s", flight.progress.request_id, reason)
            with contextlib.suppress(RuntimeError):  # the engine loop may be gone already
                await asyncio.wrap_future(self._engine_loop.abort(flight.progress.request_id))
            try:
                await flight.msg.nak()
            except NatsError as exc:  # then JetStream redelivers it after ack_wait anyway
                logger.warning("nak of %s failed: %s", flight.progress.request_id, exc)

    # --- pulling ---------------------------------------------------------------------------
    def _pulling_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            logger.error("pulling requests stopped on an error", exc_info=exc)
            self._fail(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))

    def _has_room(self) -> bool:
        return len(self._in_flight) < self.config.worker.capacity

    async def _accept(self, msg: Msg) -> None:
        try:
            request = GenerateRequest.model_validate_json(msg.data)
        except ValidationError as exc:
            logger.error("dropping a malformed request message: %s", exc)
            await msg.term()
            return
        if (flight := self._in_flight.get(request.request_id)) is not None:
            # Redelivered to us while we still run it (a missed in-progress ack): keep one run.
            flight.msg = msg
            return
        progress = RequestProgress(request, worker_id=self.config.worker_id,
                                   attempt=msg.metadata.num_delivered)
        if is_expired(request):
            await msg.term()
            await self._event(EventKind.REQUEST_EXPIRED, request_id=request.request_id,
                              **progress.timings())
            return
        self._in_flight[request.request_id] = _InFlight(msg, progress,
                                                        extract_context(msg.headers))
        self._spawn(self._admit(progress))

    async def _admit(self, progress: RequestProgress) -> None:
        assert self._engine_loop is not None
        set_request_id(progress.request_id)  # this task's log lines
        try:
            inputs = engine_inputs(progress.request)
            await asyncio.wrap_future(self._engine_loop.add(
                progress.request_id, inputs.prompt, inputs.params, messages=inputs.messages))
        except HydraError as exc:
            logger.info("request %s refused: %s", progress.request_id, exc.message)
            await self._finish(progress.request_id, progress.error_chunk(exc), term=True)

    # --- answering -------------------------------------------------------------------------
    def _from_engine_thread(self, outputs: list[RequestOutput]) -> None:
        self._loop_call(self._outputs.put_nowait, outputs)

    def _crash_from_engine_thread(self, exc: Exception) -> None:
        self._loop_call(self._fail, exc)

    def _fail(self, exc: Exception) -> None:
        """The worker cannot go on (engine crashed, connection lost): stop serving."""
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(exc)

    def _loop_call(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(callback, *args)

    async def _publish_loop(self) -> None:
        while (outputs := await self._outputs.get()) is not None:
            for output in outputs:
                try:
                    await self._publish_output(output)
                except NatsError:
                    # the connection is down; the request is redelivered if we do not recover
                    logger.exception("publishing the output of %s failed", output.request_id)

    async def _publish_output(self, output: RequestOutput) -> None:
        flight = self._in_flight.get(output.request_id)
        if flight is None:
            return  # handed back or refused meanwhile
        set_request_id(output.request_id)
        progress = flight.progress
        had_token = progress.first_token_at is not None
        chunk = progress.chunk(output)
        if not had_token and progress.first_token_at is not None:
            await self._event(EventKind.REQUEST_FIRST_TOKEN,
                              request_id=output.request_id, attempt=progress.attempt,
                              **progress.timings())
        if chunk.is_last:
            await self._finish(output.request_id, chunk, term=False)
        else:
            await self._send(chunk)

    async def _finish(self, request_id: str, chunk: TokenChunk, *, term: bool) -> None:
        """Send the last chunk, then ack (or term) the message: the request is done."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        await self._send(chunk)
        await (flight.msg.term() if term else flight.msg.ack())
        record_request(flight.progress, chunk, context=flight.trace_context)
        if self._puller is not None:
            self._puller.notify_room()
        await self._event(
            EventKind.REQUEST_DONE, request_id=request_id, finish_reason=chunk.finish_reason,
            attempt=flight.progress.attempt,
            usage=chunk.usage.model_dump() if chunk.usage else None,
            error=chunk.error.code if chunk.error else None, **flight.progress.timings())

    async def _send(self, chunk: TokenChunk) -> None:
        assert self._nc is not None
        await self._nc.publish(token_subject(chunk.request_id), chunk.model_dump_json().encode())

    async def _keepalive_loop(self) -> None:
        """In-progress acks, so a long generation is not taken for a dead worker's."""
        interval = self.config.worker.ack_wait_s / 3
        while True:
            await asyncio.sleep(interval)
            for flight in list(self._in_flight.values()):
                try:
                    await flight.msg.in_progress()
                except NatsError:
                    logger.exception("in-progress ack for %s failed", flight.progress.request_id)

    # --- helpers ---------------------------------------------------------------------------
    async def _event(self, kind: str, *, request_id: str | None = None, **data: Any) -> None:
        assert self._events is not None
        try:
            await self._events.publish(kind, request_id=request_id, **data)
        except NatsError as exc:  # events are the debugging record, never worth a request
            logger.warning("event %s not published: %s", kind, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
