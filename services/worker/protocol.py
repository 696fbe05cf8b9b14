"""Between the bus messages and the engine: requests in, numbered token chunks out.

Pure logic (no NATS): the service decodes a message, asks this module what to hand the
engine, and asks it to turn each engine output into the next `TokenChunk` of the answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from libs.common.errors import HydraError
from libs.common.messages import ErrorInfo, FinishReason, GenerateRequest, TokenChunk, Usage

if TYPE_CHECKING:
    from services.worker.engine.sequence import RequestOutput, SamplingParams


@dataclass(frozen=True)
class EngineInputs:
    """The arguments of `LLMEngine.add_request` for one request."""

    prompt: str | list[int] | None
    params: SamplingParams
    messages: list[dict[str, str]] | None


def engine_inputs(request: GenerateRequest) -> EngineInputs:
    """What the engine is given; raises the engine's InvalidRequestError for bad sampling."""
    # Imported here, not at the top: the service imports this module before the engine
    # (and torch with it) has finished loading in its own thread.
    from services.worker.engine.sequence import SamplingParams

    params = SamplingParams(**request.sampling.model_dump())
    messages = ([message.model_dump() for message in request.messages]
                if request.messages is not None else None)
    prompt = request.prompt if request.prompt is not None else request.prompt_token_ids
    return EngineInputs(prompt=prompt, params=params, messages=messages)


@dataclass
class RequestProgress:
    """One request's answer as this worker produces it: numbers the chunks, times it."""

    request: GenerateRequest
    worker_id: str
    # delivery attempt of the request (1 = first), from JetStream's metadata
    attempt: int = 1
    pulled_at: float = field(default_factory=time.time)
    next_seq: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def chunk(self, output: RequestOutput) -> TokenChunk:
        """The next chunk, from one engine output for this request."""
        if output.new_token_ids and self.first_token_at is None:
            self.first_token_at = time.time()
        usage = None
        if output.finished:
            self.finished_at = time.time()
            usage = Usage(prompt_tokens=output.prompt_tokens,
                          completion_tokens=output.completion_tokens,
                          total_tokens=output.prompt_tokens + output.completion_tokens)
        # the engine's finish reasons are "stop", "length" and "abort"; TokenChunk checks it
        finish_reason = cast(FinishReason, output.finish_reason) if output.finished else None
        return self._next(text=output.text, token_ids=list(output.new_token_ids),
                          finish_reason=finish_reason, stop_reason=output.stop_reason,
                          usage=usage)

    def error_chunk(self, error: HydraError) -> TokenChunk:
        """The last chunk of a request that failed."""
        self.finished_at = time.time()
        return self._next(finish_reason="error", error=ErrorInfo.from_error(error))

    def timings(self) -> dict[str, float]:
        """Seconds from the gateway's acceptance: queue wait, first token, total."""
        created = self.request.created
        timings = {"queue_s": self.pulled_at - created}
        if self.first_token_at is not None:
            timings["ttft_s"] = self.first_token_at - created
        if self.finished_at is not None:
            timings["e2e_s"] = self.finished_at - created
        return {name: round(value, 6) for name, value in timings.items()}

    def _next(self, *, text: str = "", token_ids: list[int] | None = None,
              finish_reason: FinishReason | None = None, stop_reason: str | int | None = None,
              usage: Usage | None = None, error: ErrorInfo | None = None) -> TokenChunk:
        chunk = TokenChunk(request_id=self.request_id, seq=self.next_seq, text=text,
                           token_ids=token_ids or [], finish_reason=finish_reason,
                           stop_reason=stop_reason, usage=usage, error=error,
                           worker_id=self.worker_id)
        self.next_seq += 1
        return chunk


def is_expired(request: GenerateRequest, *, now: float | None = None) -> bool:
    """Past its deadline: the gateway has answered 503 already, so nobody waits for it."""
    return request.deadline is not None and (now or time.time()) > request.deadline
