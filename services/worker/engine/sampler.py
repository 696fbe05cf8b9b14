"""Next-token sampling: greedy, temperature, top-k, top-p, each request with its own generator."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from services.worker.engine.sequence import SamplingParams


class Sampled(Protocol):
    """What sampling reads of a sequence (an engine `Sequence`, or a pipeline's last stage's
    record of one)."""

    @property
    def params(self) -> SamplingParams: ...

    @property
    def generator(self) -> torch.Generator: ...


def sample(logits: torch.Tensor, seqs: Sequence[Sampled]) -> list[int]:
    """logits [num_seqs, vocab] float32 -> one token id per sequence."""
    logits = logits.cpu()
    if all(seq.params.is_greedy for seq in seqs):
        return logits.argmax(dim=-1).tolist()
    tokens = []
    for row, seq in zip(logits, seqs, strict=True):
        tokens.append(_sample_one(row, seq))
    return tokens


def _sample_one(logits: torch.Tensor, seq: Sampled) -> int:
    params = seq.params
    if params.is_greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already cover top_p (the first always stays)
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=seq.generator))
