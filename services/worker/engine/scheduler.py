"""Continuous batching: which sequences run in the next step.

Running sequences occupy KV slots 0..n-1, in order; the prompts of one prefill take theirs
longest first. A step either prefills newly admitted
prompts (packed up to `max_prefill_tokens`) or decodes one token for every running sequence;
new prompts are admitted as soon as a slot is free, so they join the running decode batch
after their prefill. When a sequence leaves, the last one moves into its slot (`SlotMove`), which
the engine applies to every stage's cache.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from services.worker.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SlotMove:
    src: int
    dst: int
    # cached tokens to copy
    length: int


@dataclass(frozen=True)
class ScheduledBatch:
    is_prefill: bool
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, *, num_slots: int, max_prefill_tokens: int) -> None:
        self.num_slots = num_slots
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def can_admit(self) -> bool:
        return len(self.running) < self.num_slots

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit_running(self, seq: Sequence) -> None:
        """Put an already-cached sequence (an imported one) straight into the decode batch."""
        assert self.can_admit(), "no free KV slot"
        seq.slot = len(self.running)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule(self, *, busy: Collection[str] = ()) -> ScheduledBatch | None:
        """The next batch; sequences in `busy` (a pipeline step in flight) sit it out."""
        if self.waiting and self.can_admit():
            admitted: list[Sequence] = []
            num_tokens = 0
            while self.waiting and len(self.running) + len(admitted) < self.num_slots:
                seq = self.waiting[0]
                pending = seq.num_tokens - seq.num_cached
                if admitted and num_tokens + pending > self.max_prefill_tokens:
                    break
                admitted.append(self.waiting.popleft())
                num_tokens += pending
            # longest first: neighbouring slots then hold contexts of similar length, which
            # decode attention reads in chunks of their own length (attention.plan_decode_chunks)
            admitted.sort(key=lambda seq: seq.num_tokens, reverse=True)
            for seq in admitted:
                self.admit_running(seq)
            return ScheduledBatch(is_prefill=True, seqs=admitted)
        ready = [seq for seq in self.running if seq.request_id not in busy] if busy \
            else list(self.running)
        if ready:
            return ScheduledBatch(is_prefill=False, seqs=ready)
        return None

    def remove(self, seq: Sequence) -> SlotMove | None:
        """Take a finished or aborted sequence out; return the slot move that keeps slots dense."""
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
            return None
        index = self.running.index(seq)
        last = self.running.pop()
        seq.slot = None
        if last is seq:
            return None
        self.running[index] = last
        # a step in flight already wrote its entries into this stage's cache
        move = SlotMove(src=len(self.running), dst=index,
                        length=last.num_cached + last.num_in_flight)
        last.slot = index
        return move
