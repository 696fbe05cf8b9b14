"""A request inside the engine: its sampling parameters, tokens and progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from services.worker.engine.errors import InvalidRequestError

if TYPE_CHECKING:
    from services.worker.engine.tokenizer import IncrementalDetokenizer


@dataclass
class SamplingParams:
    # None: as many as fit in the sequence length
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    # 0: no top-k cut
    top_k: int = 0
    # None: a seed drawn from the engine's generator (still recorded, so KV hand-over is exact)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}",
                                      param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be in [0, 2], got {self.temperature}",
                                      param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}", param="top_k")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidRequestError("stop takes at most 4 non-empty strings", param="stop")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # the most output tokens this sequence may produce (max_tokens, capped by the cache)
    max_output_tokens: int
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    slot: int | None = None
    # tokens whose keys and values are in the KV cache
    num_cached: int = 0
    # tokens of a step still in flight through a pipeline's other stages (their KV is in
    # this stage's cache already; counted into num_cached when the step's token comes back)
    num_in_flight: int = 0
    # the seed of `generator`, so a pipeline's last stage can sample with the same stream
    seed: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return (self.output_token_ids or self.prompt_token_ids)[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    # the tokens sampled this step (empty when a request is aborted)
    new_token_ids: list[int]
    # the text those tokens completed (may be "" while a character or stop string is pending)
    text: str
    finished: bool
    # "stop" / "length" / "abort" once finished
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    # the stop string or stop token id that ended the request, if any
    stop_reason: str | int | None = None
