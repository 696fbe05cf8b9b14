"""Completions and chat completions: OpenAI request in, GenerateRequest on the bus, answer out.

Knows nothing of HTTP: it returns either a whole response body or the server-sent events of
a stream. A streamed response is started once the first chunk has arrived, so an error before
the first token (a refused prompt, a timeout) still gets its own HTTP status; an error after
that ends the stream with an error event.

A streamed request still waiting after `progress_after_s` (a cold start, a long queue) gets
its response started anyway: SSE comments report the model's cold-start progress
(`services.gateway.progress`) and keep the connection alive until the first token. An error
or timeout before the first token then ends the stream with an error event (and `[DONE]`),
as a stall after it does.

Every request of a limited identity is admitted by the `RateLimiter` after its model is found
and before it is queued (a refusal is a 429 that never reaches the bus); its lease is charged
the completion tokens as they arrive and released when the answer is closed, which every path
(done, failed, timed out, client gone) does.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio

from libs.common.errors import HydraError, ServiceUnavailableError
from libs.common.messages import (
    ChatMessage,
    Event,
    GenerateRequest,
    SamplingOptions,
    TokenChunk,
)
from services.gateway.auth import Identity
from services.gateway.broker import AnswerStream, RequestBroker
from services.gateway.errors import to_openai
from services.gateway.formatting import (
    CHAT,
    COMPLETION,
    DONE,
    Answer,
    ResponseContext,
    ResponseFormat,
    sse,
)
from services.gateway.progress import (
    KEEPALIVE_TEXT,
    ProgressFeed,
    ProgressWatcher,
    comment,
    is_cold_start_event,
    progress_comment,
    queued_comment,
)
from services.gateway.ratelimit import Lease, Limits, RateLimiter, estimate_prompt_tokens
from services.gateway.registry import Registry
from services.gateway.schemas import ChatCompletionRequest, CompletionRequest

# The finish reasons a client may see; the others ("abort", "error") are failures.
_CLIENT_FINISH_REASONS = ("stop", "length")
# A streamed request with no first token after this long starts its response with progress
# comments (a warm answer comes well within it, with its errors' HTTP statuses intact).
PROGRESS_AFTER_S = 1.0
# the longest a progress stream stays silent: then it sends `: waiting`
KEEPALIVE_S = 5.0


@dataclass(frozen=True)
class Reply:
    """Either a whole response body or a stream of server-sent events."""

    request_id: str
    body: dict[str, Any] | None = None
    events: AsyncIterator[str] | None = None


class CompletionService:
    def __init__(self, broker: RequestBroker, registry: Registry, *,
                 progress: ProgressWatcher | None = None,
                 progress_after_s: float = PROGRESS_AFTER_S,
                 keepalive_s: float = KEEPALIVE_S,
                 limiter: RateLimiter | None = None) -> None:
        self._broker = broker
        # None: no limits at all
        self._limiter = limiter or RateLimiter(Limits())
        self._registry = registry
        # None: no progress comments; a streamed response starts with its first token
        self._progress = progress
        self._progress_after_s = progress_after_s
        self._keepalive_s = keepalive_s

    async def complete(self, body: CompletionRequest, identity: Identity, *,
                       request_id: str) -> Reply:
        """POST /v1/completions; `request_id` from `COMPLETION.new_id()`."""
        prompt = body.prompt
        request = await self._request(
            body, request_id, identity, max_tokens=body.max_tokens,
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=prompt if isinstance(prompt, list) else None)
        lease = self._admit(identity, estimate_prompt_tokens(
            prompt=request.prompt, prompt_token_ids=request.prompt_token_ids))
        return await self._run(request, COMPLETION, body.include_usage, lease)

    async def chat(self, body: ChatCompletionRequest, identity: Identity, *,
                   request_id: str) -> Reply:
        """POST /v1/chat/completions; `request_id` from `CHAT.new_id()`."""
        messages = [ChatMessage(role=message.engine_role, content=message.text)
                    for message in body.messages]
        request = await self._request(body, request_id, identity,
                                      max_tokens=body.max_output_tokens, messages=messages)
        lease = self._admit(identity, estimate_prompt_tokens(
            message_texts=[message.content for message in messages]))
        return await self._run(request, CHAT, body.include_usage, lease)

    def _admit(self, identity: Identity, prompt_tokens: int) -> Lease:
        return self._limiter.admit(identity.limit_subject, identity.limits,
                                   prompt_tokens=prompt_tokens)

    async def _request(self, body: CompletionRequest | ChatCompletionRequest, request_id: str,
                       identity: Identity, *, max_tokens: int | None,
                       prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                       messages: list[ChatMessage] | None = None) -> GenerateRequest:
        await self._registry.get(body.model, viewer=identity)
        now = time.time()
        sampling = SamplingOptions(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            # always a seed: a redelivered request then samples the very same tokens
            seed=body.seed if body.seed is not None else secrets.randbits(63),
            stop=body.stop_list, top_k=body.top_k, ignore_eos=body.ignore_eos,
        )
        return GenerateRequest(
            request_id=request_id, model=body.model, prompt=prompt,
            prompt_token_ids=prompt_token_ids, messages=messages, sampling=sampling,
            stream=body.stream, created=now, deadline=now + self._broker.first_token_timeout_s,
            api_key_id=identity.key_id,
            tenant_id=str(identity.tenant_id) if identity.tenant_id is not None else None)

    async def _run(self, request: GenerateRequest, fmt: ResponseFormat,
                   include_usage: bool, lease: Lease) -> Reply:
        ctx = ResponseContext(request.request_id, int(request.created), request.model,
                              include_usage)
        # subscribed before the request is queued, so no event of its cold start is missed
        feed = (await self._progress.watch(request.model)
                if request.stream and self._progress is not None else None)
        try:
            answer = MeteredAnswer(await self._broker.submit(request), lease)
        except BaseException:
            lease.release()
            await _close_feed(feed)
            raise
        first_task = asyncio.ensure_future(_next(answer))
        try:
            if feed is not None:
                await asyncio.wait({first_task}, timeout=self._progress_after_s)
                if not first_task.done():
                    return Reply(request.request_id, events=_progress_then_stream(
                        fmt, ctx, feed, first_task, answer, keepalive_s=self._keepalive_s))
                await _close_feed(feed)
            first = await first_task
            _raise_if_failed(first)
            if not request.stream:
                return Reply(request.request_id, body=fmt.full(ctx, await _collect(first,
                                                                                    answer)))
        except BaseException:
            first_task.cancel()
            await _close_feed(feed)
            await _close(answer)
            raise
        return Reply(request.request_id, events=_stream(fmt, ctx, first, answer))


class MeteredAnswer:
    """An answer whose tokens count against its request's lease, which it releases when
    closed."""

    def __init__(self, answer: AnswerStream, lease: Lease) -> None:
        self._answer = answer
        self._lease = lease
        self._num_completion_tokens = 0

    def __aiter__(self) -> MeteredAnswer:
        return self

    async def __anext__(self) -> TokenChunk:
        chunk = await anext(self._answer)
        num_tokens = len(chunk.token_ids)
        if chunk.usage is not None:
            # the worker's count is the true one: make up what the chunks and the prompt's
            # estimate left out (never refunded: the estimate has already been spent)
            num_tokens = max(num_tokens, chunk.usage.completion_tokens
                             - self._num_completion_tokens)
            num_tokens += max(0, chunk.usage.prompt_tokens - self._lease.prompt_tokens)
        self._num_completion_tokens += len(chunk.token_ids)
        self._lease.charge(num_tokens)
        return chunk

    async def close(self) -> None:
        """Stop listening and free the request's concurrency slot (idempotent)."""
        try:
            await self._answer.close()
        finally:
            self._lease.release()


async def _next(answer: MeteredAnswer) -> TokenChunk:
    return await anext(answer)


async def _progress_then_stream(fmt: ResponseFormat, ctx: ResponseContext, feed: ProgressFeed,
                                first_task: asyncio.Future[TokenChunk], answer: MeteredAnswer,
                                *, keepalive_s: float) -> AsyncIterator[str]:
    """Progress comments until the first chunk, then the stream as `_stream` sends it."""
    said: list[str] = []

    def new_comments(events: list[Event]) -> list[str]:
        # each event's text once in a row (a repeated percentage is not news)
        texts = []
        for event in events:
            text = progress_comment(event)
            if text is not None and text != (said[-1] if said else None):
                said.append(text)
                texts.append(comment(text))
        return texts

    try:
        earlier = feed.drain()
        yield comment(queued_comment(ctx.model, cold_start=any(
            is_cold_start_event(event) for event in earlier)))
        for part in new_comments(earlier):
            yield part
        last_sent = time.monotonic()
        while not first_task.done():
            getter = asyncio.ensure_future(feed.events.get())
            timeout = max(0.0, last_sent + keepalive_s - time.monotonic())
            try:
                await asyncio.wait({first_task, getter}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                getter.cancel()
            parts = (new_comments([getter.result()])
                     if getter.done() and not getter.cancelled() else [])
            if not parts and time.monotonic() - last_sent >= keepalive_s \
                    and not first_task.done():
                parts = [comment(KEEPALIVE_TEXT)]
            for part in parts:
                yield part
                last_sent = time.monotonic()
        # what arrived together with the first chunk still comes before it
        for part in new_comments(feed.drain()):
            yield part
        await _close_feed(feed)
        try:
            first = first_task.result()
            _raise_if_failed(first)
        except HydraError as exc:  # refused, or no first token in time
            yield sse(to_openai(exc))
            yield DONE
            return
        async for part in _stream(fmt, ctx, first, answer):
            yield part
    finally:
        if first_task.done() and not first_task.cancelled():
            first_task.exception()  # retrieved: a client that hung up never sees it
        first_task.cancel()
        await _close_feed(feed)
        await _close(answer)


async def _collect(first: TokenChunk, answer: MeteredAnswer) -> Answer:
    try:
        collected = Answer()
        chunk = first
        while True:
            _raise_if_failed(chunk)
            collected.text += chunk.text
            collected.token_ids += chunk.token_ids
            if chunk.is_last:
                collected.finish_reason, collected.usage = chunk.finish_reason, chunk.usage
                return collected
            chunk = await anext(answer)
    finally:
        await _close(answer)


async def _stream(fmt: ResponseFormat, ctx: ResponseContext, first: TokenChunk,
                  answer: MeteredAnswer) -> AsyncIterator[str]:
    try:
        for event in fmt.first_chunks(ctx):
            yield sse(event)
        chunk = first
        while True:
            try:
                _raise_if_failed(chunk)
            except HydraError as exc:
                yield sse(to_openai(exc))
                break
            if chunk.is_last:
                assert chunk.finish_reason is not None
                for event in fmt.last_chunks(ctx, chunk.text, chunk.finish_reason):
                    yield sse(event)
                if ctx.include_usage and chunk.usage is not None:
                    yield sse(fmt.usage_chunk(ctx, chunk.usage))
                break
            if chunk.text:
                yield sse(fmt.text_chunk(ctx, chunk.text))
            try:
                chunk = await anext(answer)
            except HydraError as exc:  # a timeout once the stream has started
                yield sse(to_openai(exc))
                break
        yield DONE
    finally:
        await _close(answer)


def _raise_if_failed(chunk: TokenChunk) -> None:
    if chunk.error is not None:
        raise chunk.error.to_error()
    if chunk.is_last and chunk.finish_reason not in _CLIENT_FINISH_REASONS:
        raise ServiceUnavailableError(f"The request ended early ({chunk.finish_reason}); "
                                      "please retry.")


async def _close_feed(feed: ProgressFeed | None) -> None:
    if feed is not None:
        with anyio.CancelScope(shield=True):
            await feed.close()


async def _close(answer: MeteredAnswer) -> None:
    # Shielded: a client that hangs up cancels the response task, and the subscription
    # must still be removed.
    with anyio.CancelScope(shield=True):
        await answer.close()
