"""Replay a workload against a running gateway with the `openai` client, and record how each
request went (and, from the HS_EVENTS stream, which workers held GPU memory and for how long).

Each request is sent at its arrival time (divided by `rate_scale`) as a streamed completion of
exactly `output_tokens` tokens (`ignore_eos`, greedy) for a prompt of about `prompt_tokens`
tokens; its TTFT is measured from the moment it is sent to the first content chunk, its TPOT
as (last chunk - first chunk) / (output tokens - 1).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import httpx
import openai

from hydraserve.workload.records import RequestResult, WorkerLifetime, WorkloadRequest
from libs.common.messages import Event, EventKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayConfig:
    # the gateway, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)
    api_url: str
    api_key: str
    # > 1 sends faster: request i goes at arrival_s / rate_scale
    rate_scale: float = 1.0
    # workload model -> model to ask the gateway for
    model_map: dict[str, str] = field(default_factory=dict)
    max_requests: int | None = None
    # requests in flight at once; a request past it waits (its submit_s is when it went)
    max_concurrency: int = 256
    timeout_s: float = 300.0
    # send the prompt as this token id repeated (exact length) instead of repeated words
    prompt_token_id: int | None = None
    prompt_word: str = "hello"

    def __post_init__(self) -> None:
        if self.rate_scale <= 0:
            raise ValueError(f"rate_scale {self.rate_scale} must be positive")
        if self.max_concurrency < 1 or self.timeout_s <= 0:
            raise ValueError(f"max_concurrency {self.max_concurrency} and timeout_s "
                             f"{self.timeout_s} must be positive")
        if self.max_requests is not None and self.max_requests < 1:
            raise ValueError(f"max_requests {self.max_requests} must be at least 1")

    @property
    def base_url(self) -> str:
        url = self.api_url.rstrip("/")
        return url if url.endswith("/v1") else f"{url}/v1"

    def prompt(self, num_tokens: int) -> str | list[int]:
        if self.prompt_token_id is not None:
            return [self.prompt_token_id] * num_tokens
        # one common word is one token in most BPE vocabularies
        return " ".join([self.prompt_word] * num_tokens)


async def send(client: openai.AsyncOpenAI, request: WorkloadRequest, config: ReplayConfig,
               *, submit_s: float) -> RequestResult:
    """One streamed completion; never raises for what the server or the network did."""
    model = config.model_map.get(request.model, request.model)
    started = time.monotonic()
    first: float | None = None
    last: float | None = None
    num_chunks = 0
    usage_tokens: int | None = None
    status, error = "ok", None
    try:
        async with asyncio.timeout(config.timeout_s):
            stream = await client.completions.create(
                model=model, prompt=config.prompt(request.prompt_tokens),
                max_tokens=request.output_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            try:
                async for chunk in stream:
                    if chunk.choices:
                        last = time.monotonic()
                        first = first if first is not None else last
                        num_chunks += 1
                    if chunk.usage is not None:
                        usage_tokens = chunk.usage.completion_tokens
            finally:
                await stream.close()
    except TimeoutError:
        status, error = "timeout", f"no complete answer within {config.timeout_s:g}s"
    except (openai.OpenAIError, httpx.HTTPError) as exc:
        status, error = "error", f"{type(exc).__name__}: {exc}"
        logger.warning("request %s failed: %s", request.request_id, error)
    num_tokens = usage_tokens if usage_tokens is not None else num_chunks
    tpot = None
    if status == "ok" and first is not None and last is not None and num_tokens >= 2:
        tpot = (last - first) / (num_tokens - 1)
    return RequestResult(
        request_id=request.request_id, model=model, app=request.app, submit_s=submit_s,
        ttft_s=None if first is None else first - started, tpot_s=tpot,
        output_tokens=num_tokens, status=status, error=error,
        ttft_slo_s=request.ttft_slo_s, tpot_slo_s=request.tpot_slo_s)


async def replay(requests: list[WorkloadRequest], config: ReplayConfig
                 ) -> tuple[float, list[RequestResult]]:
    """Send `requests` at their (scaled) arrival times; (unix start time, results in
    arrival order). Submit times are seconds from the start."""
    if config.max_requests is not None:
        requests = requests[:config.max_requests]
    limit = asyncio.Semaphore(config.max_concurrency)
    client = openai.AsyncOpenAI(
        base_url=config.base_url, api_key=config.api_key, max_retries=0,
        timeout=config.timeout_s,
        http_client=httpx.AsyncClient(limits=httpx.Limits(
            max_connections=config.max_concurrency,
            max_keepalive_connections=config.max_concurrency), timeout=config.timeout_s))
    started_at = time.time()
    t0 = time.monotonic()

    async def one(request: WorkloadRequest) -> RequestResult:
        await asyncio.sleep(max(0.0, t0 + request.arrival_s / config.rate_scale
                                - time.monotonic()))
        async with limit:
            return await send(client, request, config, submit_s=time.monotonic() - t0)

    try:
        results = await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()
    return started_at, list(results)


# --- worker lifetimes from the events stream ------------------------------------------------


def worker_lifetimes(events: Iterable[Event], *, started_at: float, ended_at: float,
                     models: set[str] | None = None) -> list[WorkerLifetime]:
    """Each worker placed (worker.placed: gpu_bytes, stage, degree) until the node agent
    stopped it (worker.stopped with by=node_agent), clipped to [started_at, ended_at] and
    made relative to started_at; still running at the end: held until ended_at. Only
    `models`' workers, if given."""
    placed: dict[str, Event] = {}
    stopped: dict[str, float] = {}
    for event in events:
        if event.worker_id is None:
            continue
        if event.kind == EventKind.WORKER_PLACED:
            placed.setdefault(event.worker_id, event)
        elif event.kind == EventKind.WORKER_STOPPED and event.data.get("by") == "node_agent":
            stopped.setdefault(event.worker_id, event.time)
    lifetimes = []
    for worker_id, event in placed.items():
        if models is not None and event.model not in models:
            continue
        start = max(event.time, started_at)
        end = min(stopped.get(worker_id, ended_at), ended_at)
        if end <= start:
            continue
        lifetimes.append(WorkerLifetime(
            worker_id=worker_id, model=event.model or "", node_id=event.node_id or "",
            gpu_memory_bytes=int(event.data.get("gpu_bytes", 0)),
            start_s=start - started_at, end_s=end - started_at,
            stage=int(event.data.get("stage", 0)), degree=int(event.data.get("degree", 1))))
    return sorted(lifetimes, key=lambda w: (w.start_s, w.worker_id))


class WorkerEventRecorder:
    """Reads every stored and new `worker.*` event from HS_EVENTS in the background."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.events: list[Event] = []
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        import nats
        from nats.js.api import ConsumerConfig, DeliverPolicy

        from libs.common.subjects import EVENTS_PREFIX, EVENTS_STREAM

        self._nc = await nats.connect(self.nats_url, name="hydraserve-workload")
        js = self._nc.jetstream()
        self._sub = await js.subscribe(f"{EVENTS_PREFIX}.worker.>", stream=EVENTS_STREAM,
                                       ordered_consumer=True,
                                       config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        from pydantic import ValidationError

        while True:
            try:
                msg = await self._sub.next_msg(timeout=0.25)
            except TimeoutError:
                if self._done.is_set():
                    return
                continue
            try:
                self.events.append(Event.model_validate_json(msg.data))
            except ValidationError as exc:
                logger.warning("skipping a malformed event on %s: %s", msg.subject, exc)

    async def stop(self) -> list[Event]:
        """Stop once the stream has nothing more to give; the events read."""
        self._done.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            await self._sub.unsubscribe()
            await self._nc.close()
        return self.events
