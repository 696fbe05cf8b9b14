"""The gateway's side of the bus: queue a request, then read its answer chunk by chunk.

`submit` subscribes to `hs.tok.<request_id>` *before* publishing the request (on the same
connection, so the subscription is in place before any worker can answer), publishes it to
the `HS_REQUESTS` stream with the request id as `Nats-Msg-Id`, and checks the publish ack.
The returned `AnswerStream` yields the chunks in seq order, once each, and enforces the
timeouts: no first chunk by the request's deadline, or silence between chunks, is a 503.
"""

from __future__ import annotations

import logging
import time

from nats.aio.client import Client as NATS
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from pydantic import ValidationError

from libs.common.bus import MSG_ID_HEADER, EventPublisher
from libs.common.errors import ServiceUnavailableError
from libs.common.logging import set_request_id
from libs.common.messages import EventKind, GenerateRequest, TokenChunk
from libs.common.metrics import E2E_LATENCY, TPOT, TTFT
from libs.common.subjects import REQUESTS_STREAM, request_subject, token_subject
from libs.common.tracing import TRACEPARENT_HEADER, inject_headers
from services.gateway.observability import note_model

logger = logging.getLogger(__name__)

_PUBLISH_TIMEOUT_S = 5.0


class ChunkReorderer:
    """Restores seq order and drops repeats (a redelivered request starts again at 0)."""

    def __init__(self) -> None:
        self.next_seq = 0
        self._held: dict[int, TokenChunk] = {}

    def push(self, chunk: TokenChunk) -> list[TokenChunk]:
        """The chunks that are now next in order (none while one before is missing)."""
        if chunk.seq < self.next_seq or chunk.seq in self._held:
            return []
        self._held[chunk.seq] = chunk
        ready = []
        while self.next_seq in self._held:
            ready.append(self._held.pop(self.next_seq))
            self.next_seq += 1
        return ready


class AnswerStream:
    """The chunks of one request's answer, in order; ends after the last chunk."""

    def __init__(self, request: GenerateRequest, subscription: Subscription, *,
                 js: JetStreamContext, queue_seq: int, first_token_timeout_s: float,
                 inter_token_timeout_s: float) -> None:
        self.request = request
        self._subscription = subscription
        self._js = js
        # the request's sequence number in HS_REQUESTS, to withdraw it on timeout
        self._queue_seq = queue_seq
        self._first_deadline = time.monotonic() + first_token_timeout_s
        self._first_token_timeout_s = first_token_timeout_s
        self._inter_token_timeout_s = inter_token_timeout_s
        self._reorderer = ChunkReorderer()
        # unix time of the first chunk with tokens (TTFT, TPOT)
        self._first_token_at: float | None = None
        self._ready: list[TokenChunk] = []
        self._finished = False
        self._closed = False

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> TokenChunk:
        if self._finished:
            raise StopAsyncIteration
        while not self._ready:
            self._ready = self._reorderer.push(await self._receive())
        chunk = self._ready.pop(0)
        self._finished = chunk.is_last
        self._observe(chunk)
        return chunk

    def _observe(self, chunk: TokenChunk) -> None:
        """TTFT at the first token, TPOT and end-to-end latency at the last chunk."""
        now = time.time()
        model = self.request.model
        if self._first_token_at is None and chunk.token_ids:
            self._first_token_at = now
            TTFT.labels(model=model).observe(now - self.request.created)
        if not chunk.is_last or chunk.error is not None:
            return
        E2E_LATENCY.labels(model=model).observe(now - self.request.created)
        num_tokens = chunk.usage.completion_tokens if chunk.usage is not None else 0
        if self._first_token_at is not None and num_tokens > 1:
            TPOT.labels(model=model).observe((now - self._first_token_at) / (num_tokens - 1))

    async def close(self) -> None:
        """Stop listening for chunks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._subscription.unsubscribe()
        except NatsError as exc:
            logger.warning("unsubscribing from %s failed: %s", self.request.request_id, exc)

    async def _receive(self) -> TokenChunk:
        started = self._reorderer.next_seq > 0
        timeout = (self._inter_token_timeout_s if started
                   else max(0.0, self._first_deadline - time.monotonic()))
        while True:
            try:
                msg = await self._subscription.next_msg(timeout=timeout)
            except TimeoutError:
                raise await self._timed_out(started) from None
            except NatsError as exc:
                raise ServiceUnavailableError("Lost the connection to the request bus; "
                                              "please retry.") from exc
            try:
                return TokenChunk.model_validate_json(msg.data)
            except ValidationError as exc:
                logger.error("dropping a malformed chunk of %s: %s", self.request.request_id, exc)

    async def _timed_out(self, started: bool) -> ServiceUnavailableError:
        if started:
            return ServiceUnavailableError(
                f"The model stopped answering for {self._inter_token_timeout_s:g}s; "
                "please retry.")
        # Nobody took it in time: withdraw it, so no worker spends time on it later.
        try:
            await self._js.delete_msg(REQUESTS_STREAM, self._queue_seq)
        except NatsError as exc:  # taken meanwhile, or the stream is unreachable
            logger.info("could not withdraw request %s: %s", self.request.request_id, exc)
        return ServiceUnavailableError(
            f"No worker of model {self.request.model!r} answered within "
            f"{self._first_token_timeout_s:g}s; please retry.")


class RequestBroker:
    def __init__(self, nc: NATS, *, first_token_timeout_s: float,
                 inter_token_timeout_s: float) -> None:
        self._nc = nc
        self._js = nc.jetstream()
        self._events = EventPublisher(nc)
        self.first_token_timeout_s = first_token_timeout_s
        self._inter_token_timeout_s = inter_token_timeout_s

    async def submit(self, request: GenerateRequest) -> AnswerStream:
        """Queue `request`; ServiceUnavailableError if the queue does not take it.

        The message carries the current trace context (`traceparent`) for the worker.
        """
        set_request_id(request.request_id)
        note_model(request.model)
        subscription = await self._nc.subscribe(token_subject(request.request_id))
        headers = inject_headers({MSG_ID_HEADER: request.request_id})
        try:
            ack = await self._js.publish(
                request_subject(request.model), request.model_dump_json().encode(),
                stream=REQUESTS_STREAM, timeout=_PUBLISH_TIMEOUT_S, headers=headers)
        except (NatsError, TimeoutError) as exc:
            await subscription.unsubscribe()
            logger.error("queueing request %s failed: %r", request.request_id, exc)
            raise ServiceUnavailableError("The request queue is unavailable; please retry.") \
                from exc
        if ack.duplicate:
            logger.warning("request id %s was queued twice; kept once", request.request_id)
        await self._received_event(request, ack.seq, headers.get(TRACEPARENT_HEADER))
        return AnswerStream(request, subscription, js=self._js, queue_seq=ack.seq,
                            first_token_timeout_s=self.first_token_timeout_s,
                            inter_token_timeout_s=self._inter_token_timeout_s)

    async def _received_event(self, request: GenerateRequest, queue_seq: int,
                              traceparent: str | None) -> None:
        # the scheduler's placement span joins the request's trace through this
        trace = {TRACEPARENT_HEADER: traceparent} if traceparent is not None else {}
        try:
            await self._events.publish(
                EventKind.REQUEST_RECEIVED, request_id=request.request_id, model=request.model,
                queue_seq=queue_seq, stream=request.stream, api_key_id=request.api_key_id,
                **trace)
        except NatsError as exc:
            logger.warning("event request.received not published: %s", exc)
