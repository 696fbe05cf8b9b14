"""The engine: add requests, step, abort, and hand sequences over with their KV cache.

An engine drives a chain of `ModelRunner` stages that together cover the model's layers (one
runner for a whole model). Each step runs one scheduled batch through every stage, samples at
the last, and turns tokens into text. The interface — load, add_request, step, abort,
export_sequence, import_sequence — is what the worker service uses, so another backend can
sit behind it.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.worker.engine.attention import ForwardBatch
from services.worker.engine.config import EngineConfig, ModelConfig
from services.worker.engine.errors import ContextLengthError, InvalidRequestError
from services.worker.engine.handover import KVPart, SequenceSnapshot
from services.worker.engine.loader import LoadStats
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.sampler import sample
from services.worker.engine.scheduler import Scheduler, SlotMove
from services.worker.engine.sequence import (
    RequestOutput,
    SamplingParams,
    Sequence,
    SequenceStatus,
)

if TYPE_CHECKING:
    from services.worker.engine.tokenizer import IncrementalDetokenizer, Tokenizer


class LLMEngine:
    def __init__(self, runners: list[ModelRunner], tokenizer: Tokenizer | None = None, *,
                 seed: int = 0) -> None:
        _check_chain(runners)
        self.runners = runners
        # The stages stop short of the last layer: the rest of the model runs in other
        # processes (a pipeline), which see this engine's slot moves and finished requests
        # through `pending_slot_moves` / `pending_finished`.
        self.is_partial = not runners[-1].stage.is_last
        self.pending_slot_moves: list[SlotMove] = []
        self.pending_finished: list[str] = []
        self._step_ids = itertools.count()
        self.tokenizer = tokenizer
        self.model_config = runners[0].model_config
        self._rng = torch.Generator().manual_seed(seed)
        self._seqs: dict[str, Sequence] = {}
        self.scheduler: Scheduler | None = None
        self.max_model_len = 0

    @classmethod
    def from_model_dir(cls, path: str | Path, *, stage_boundaries: Seq[int] | None = None,
                       with_tokenizer: bool = True, **config: object) -> LLMEngine:
        """An engine over a model folder, whole or as a chain of stages split at the boundaries
        (e.g. [0, 2, 4] runs layers [0, 2) and [2, 4) as two stages)."""
        model_config = ModelConfig.from_model_dir(path)
        bounds = list(stage_boundaries or [0, model_config.num_layers])
        runners = [
            ModelRunner(EngineConfig(model_path=Path(path), start_layer=start, end_layer=end,
                                     **config),  # type: ignore[arg-type]
                        model_config)
            for start, end in itertools.pairwise(bounds)
        ]
        tokenizer = None
        if with_tokenizer:
            from services.worker.engine.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_model_dir(path)
        return cls(runners, tokenizer, seed=runners[0].config.seed)

    # --- start-up ------------------------------------------------------------------------------
    def load(self) -> list[LoadStats]:
        stats = [runner.load() for runner in self.runners]
        self.on_loaded()
        return stats

    def on_loaded(self) -> None:
        """Set up scheduling once every stage has its weights and KV cache."""
        caches = [runner.kv_cache for runner in self.runners]
        assert all(cache is not None for cache in caches), "load every stage first"
        num_slots = min(cache.num_slots for cache in caches if cache is not None)
        self.max_model_len = min(cache.max_len for cache in caches if cache is not None)
        self.scheduler = Scheduler(
            num_slots=num_slots, max_prefill_tokens=self.runners[0].config.max_prefill_tokens
        )

    # --- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, *,
                    messages: list[dict[str, str]] | None = None) -> Sequence:
        params = params or SamplingParams()
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        prompt_ids = self._prompt_ids(prompt, messages)
        max_output = self._max_output_tokens(len(prompt_ids), params)
        seed = params.seed if params.seed is not None else \
            int(torch.randint(2**62, (1,), generator=self._rng))
        seq = Sequence(
            request_id=request_id, prompt_token_ids=prompt_ids, params=params,
            max_output_tokens=max_output, seed=seed,
            generator=torch.Generator().manual_seed(seed),
            detokenizer=self._detokenizer(prompt_ids, params),
        )
        self._seqs[request_id] = seq
        self._scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, "abort")
        return _output(seq, [], "")

    def has_unfinished(self) -> bool:
        return self._scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self._scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self._scheduler.waiting)

    # --- the step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule a batch, run it through every stage, sample, and append the tokens."""
        if self.is_partial:
            raise RuntimeError("a partial engine's steps go through its pipeline driver")
        plan = self.schedule_step()
        if plan is None:
            return []
        hidden = self.run_stages(plan)
        token_ids = sample(self.runners[-1].logits(hidden, plan.forward), plan.seqs)
        return self.finish_step(plan, token_ids)

    def schedule_step(self, *, busy: Collection[str] = ()) -> StepPlan | None:
        """The next batch and its model inputs; sequences in `busy` are left out."""
        batch = self._scheduler.schedule(busy=busy)
        if batch is None:
            return None
        seqs = batch.seqs
        if batch.is_prefill:
            chunks = [seq.prompt_token_ids[seq.num_cached:] + seq.output_token_ids
                      for seq in seqs]
            input_ids = torch.tensor([t for chunk in chunks for t in chunk], dtype=torch.long)
            query_lens = [len(chunk) for chunk in chunks]
        else:
            input_ids = torch.tensor([seq.last_token_id for seq in seqs], dtype=torch.long)
            query_lens = [1] * len(seqs)
        forward = self.runners[0].new_batch(
            is_prefill=batch.is_prefill, slot_ids=[seq.slot for seq in seqs],  # type: ignore[misc]
            context_lens=[seq.num_cached for seq in seqs], query_lens=query_lens,
        )
        for seq, num_new in zip(seqs, query_lens, strict=True):
            seq.num_in_flight = num_new
        return StepPlan(next(self._step_ids), seqs, input_ids, forward)

    @torch.inference_mode()
    def run_stages(self, plan: StepPlan) -> torch.Tensor:
        """This engine's stages on the plan's inputs: hidden states [num_tokens, hidden]."""
        hidden = plan.input_ids
        for runner in self.runners:
            hidden = runner.forward(hidden, plan.forward)
        return hidden

    def finish_step(self, plan: StepPlan, token_ids: list[int]) -> list[RequestOutput]:
        """Append the sampled tokens; sequences aborted while the step ran are skipped."""
        live = [(seq, token_id) for seq, token_id in zip(plan.seqs, token_ids, strict=True)
                if self._seqs.get(seq.request_id) is seq]
        # Count every sequence's new cache entries before any finishes: a finishing sequence
        # moves the last one into its slot, and that copy must include this step's entry.
        for seq, _ in live:
            seq.num_cached += seq.num_in_flight
            seq.num_in_flight = 0
        return [self._append_token(seq, token_id) for seq, token_id in live]

    def _append_token(self, seq: Sequence, token_id: int) -> RequestOutput:
        seq.output_token_ids.append(token_id)
        params = seq.params
        text = ""
        eos_ids = self.tokenizer.eos_token_ids if self.tokenizer else frozenset()
        if token_id in params.stop_token_ids:
            seq.stop_reason = token_id
            finish = "stop"
        elif not params.ignore_eos and token_id in eos_ids:
            finish = "stop"
        else:
            finish = None
            if seq.detokenizer is not None:
                text = seq.detokenizer.add(token_id)
                if seq.detokenizer.stopped:
                    seq.stop_reason = seq.detokenizer.stop_reason
                    finish = "stop"
            if finish is None and len(seq.output_token_ids) >= seq.max_output_tokens:
                finish = "length"
        if finish is not None:
            # text held back as a possible stop string is real output unless a stop string hit
            if seq.detokenizer is not None and not isinstance(seq.stop_reason, str):
                text += seq.detokenizer.flush()
            self._finish(seq, finish)
        return _output(seq, [token_id], text)

    def _finish(self, seq: Sequence, reason: str) -> None:
        move = self._scheduler.remove(seq)
        if move is not None:
            self._apply_slot_move(move)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._seqs[seq.request_id]
        if self.is_partial:
            self.pending_finished.append(seq.request_id)

    def _apply_slot_move(self, move: SlotMove) -> None:
        for runner in self.runners:
            assert runner.kv_cache is not None
            runner.kv_cache.move_slot(move.src, move.dst, move.length)
        if self.is_partial:
            self.pending_slot_moves.append(move)

    def take_pending(self) -> tuple[list[SlotMove], list[str]]:
        """Slot moves and finished request ids since the last call (for the other stages)."""
        moves, finished = self.pending_slot_moves, self.pending_finished
        self.pending_slot_moves, self.pending_finished = [], []
        return moves, finished

    # --- consolidation -------------------------------------------------------------------------
    def running_sequences(self) -> list[Sequence]:
        """The sequences holding KV slots, by slot."""
        return list(self._scheduler.running)

    def complete_with(self, runners: list[ModelRunner],
                      kv: dict[str, SequenceSnapshot]) -> None:
        """Become a whole-model engine: append loaded `runners` for the remaining layers and
        fill their caches from the other stages' snapshots (one per running sequence, with
        the last stage's generator state), at the same slots.

        The caller makes sure no step is in flight.
        """
        chain = [*self.runners, *runners]
        _check_chain(chain)
        if not chain[-1].stage.is_last:
            raise ValueError("the added stages must end at the model's last layer")
        for runner in runners:
            assert runner.kv_cache is not None, "load the added stages first"
            if runner.kv_cache.num_slots < self._scheduler.num_slots:
                raise ValueError(f"stage [{runner.stage.start_layer}, {runner.stage.end_layer})"
                                 f" has {runner.kv_cache.num_slots} KV slots, the engine uses "
                                 f"{self._scheduler.num_slots}")
        for seq in self._scheduler.running:
            snapshot = kv.get(seq.request_id)
            if snapshot is None or snapshot.num_cached != seq.num_cached:
                raise ValueError(f"no KV snapshot of {seq.request_id!r} at {seq.num_cached} "
                                 "tokens")
            assert seq.slot is not None
            for runner in runners:
                keys, values = snapshot.kv_for_layers(runner.stage.start_layer,
                                                      runner.stage.end_layer)
                assert runner.kv_cache is not None
                runner.kv_cache.import_slot(seq.slot, keys, values)
            seq.generator.set_state(snapshot.generator_state)
        self.runners = chain
        self.is_partial = False
        self.pending_slot_moves, self.pending_finished = [], []

    # --- KV hand-over --------------------------------------------------------------------------
    def export_sequence(self, request_id: str, *, remove: bool = False) -> SequenceSnapshot:
        """The sequence's state and the KV cache of this engine's layers for it."""
        seq = self._seqs.get(request_id)
        if seq is None:
            raise InvalidRequestError(f"no running request {request_id!r}")
        parts = []
        if seq.status is SequenceStatus.RUNNING:
            for runner in self.runners:
                assert runner.kv_cache is not None and seq.slot is not None
                keys, values = runner.kv_cache.export_slot(seq.slot, seq.num_cached)
                parts.append(KVPart(runner.stage.start_layer, runner.stage.end_layer,
                                    keys, values))
        snapshot = SequenceSnapshot(
            request_id=seq.request_id, prompt_token_ids=list(seq.prompt_token_ids),
            output_token_ids=list(seq.output_token_ids), params=seq.params,
            max_output_tokens=seq.max_output_tokens, num_cached=seq.num_cached,
            generator_state=seq.generator.get_state(), kv=parts,
        )
        if remove:
            self._finish(seq, "handover")
        return snapshot

    def import_sequence(self, snapshot: SequenceSnapshot) -> Sequence:
        """Continue a sequence exported from another engine (its KV must cover our layers)."""
        if snapshot.request_id in self._seqs:
            raise InvalidRequestError(f"request id {snapshot.request_id!r} is already running")
        if snapshot.num_cached > self.max_model_len:
            raise ContextLengthError(f"sequence holds {snapshot.num_cached} tokens; this engine's"
                                     f" slots hold {self.max_model_len}")
        generator = torch.Generator()
        generator.set_state(snapshot.generator_state)
        seq = Sequence(
            request_id=snapshot.request_id, prompt_token_ids=list(snapshot.prompt_token_ids),
            params=snapshot.params, max_output_tokens=snapshot.max_output_tokens,
            seed=snapshot.params.seed or 0,
            generator=generator, detokenizer=self._detokenizer(snapshot.prompt_token_ids,
                                                               snapshot.params),
            output_token_ids=list(snapshot.output_token_ids), num_cached=snapshot.num_cached,
        )
        if seq.detokenizer is not None:
            for token_id in seq.output_token_ids:  # replay: rebuilds the pending-text state
                seq.detokenizer.add(token_id)
        if snapshot.num_cached == 0:
            self._scheduler.add(seq)
        else:
            if not self._scheduler.can_admit():
                raise InvalidRequestError("no free KV slot to import a sequence into")
            self._scheduler.admit_running(seq)
            for runner in self.runners:
                assert runner.kv_cache is not None and seq.slot is not None
                keys, values = snapshot.kv_for_layers(runner.stage.start_layer,
                                                      runner.stage.end_layer)
                runner.kv_cache.import_slot(seq.slot, keys, values)
        self._seqs[seq.request_id] = seq
        return seq

    # --- helpers -------------------------------------------------------------------------------
    @property
    def _scheduler(self) -> Scheduler:
        if self.scheduler is None:
            raise RuntimeError("the engine is not loaded yet")
        return self.scheduler

    def _prompt_ids(self, prompt: str | list[int] | None,
                    messages: list[dict[str, str]] | None) -> list[int]:
        if messages is not None:
            tokenizer = self._require_tokenizer("chat messages")
            ids = tokenizer.encode(tokenizer.apply_chat_template(messages),
                                   add_special_tokens=False)
        elif isinstance(prompt, str):
            ids = self._require_tokenizer("a text prompt").encode(prompt)
        elif prompt is not None:
            ids = list(prompt)
            vocab = self.runners[0].model_config.hf_config.get("vocab_size")
            bad = [t for t in ids if not 0 <= t < (vocab or 2**31)]
            if bad:
                raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary",
                                          param="prompt")
        else:
            raise InvalidRequestError("a request needs a prompt or messages", param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def _max_output_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        room = self.max_model_len - num_prompt
        asked = params.max_tokens if params.max_tokens is not None else room
        if room < 1 or asked > room:
            raise ContextLengthError(
                f"this model's maximum context length is {self.max_model_len} tokens; the "
                f"request needs {num_prompt + asked} ({num_prompt} in the prompt, {asked} for "
                "the completion)", param="max_tokens" if room >= 1 else "prompt",
            )
        return asked

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams
                     ) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            if params.stop:
                raise InvalidRequestError("stop strings need a tokenizer", param="stop")
            return None
        from services.worker.engine.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                      skip_special_tokens=params.skip_special_tokens,
                                      stop=params.stop)

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequestError(f"{what} needs the model's tokenizer, which is not loaded")
        return self.tokenizer


@dataclass
class StepPlan:
    """One scheduled step: which sequences, their input token ids and batch layout."""

    step_id: int
    seqs: list[Sequence]
    # [num_tokens] token ids (prefill: every pending token of each sequence; decode: one each)
    input_ids: torch.Tensor
    forward: ForwardBatch


@dataclass
class Completion:
    """A whole request's result, for `generate`."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0


def generate(engine: LLMEngine, prompts: list[str | list[int]],
             params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
    """Run prompts to completion (tests, benchmarks, the CLI)."""
    if not isinstance(params, list):
        params = [params or SamplingParams()] * len(prompts)
    results = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        request_id = f"gen-{i}"
        engine.add_request(request_id, prompt, p)
        results[request_id] = Completion(request_id)
    while engine.has_unfinished():
        for out in engine.step():
            result = results[out.request_id]
            result.token_ids += out.new_token_ids
            result.text += out.text
            result.prompt_tokens = out.prompt_tokens
            if out.finished:
                result.finish_reason = out.finish_reason
    return list(results.values())


def _output(seq: Sequence, new_token_ids: list[int], text: str) -> RequestOutput:
    return RequestOutput(
        request_id=seq.request_id, new_token_ids=new_token_ids, text=text,
        finished=seq.is_finished, finish_reason=seq.finish_reason,
        prompt_tokens=len(seq.prompt_token_ids), completion_tokens=len(seq.output_token_ids),
        stop_reason=seq.stop_reason,
    )


def _check_chain(runners: list[ModelRunner]) -> None:
    if not runners:
        raise ValueError("an engine needs at least one stage")
    if not runners[0].stage.is_first:
        raise ValueError("the stages must start at layer 0")
    for a, b in itertools.pairwise(runners):
        if a.stage.end_layer != b.stage.start_layer:
            raise ValueError(f"stage [{a.stage.start_layer}, {a.stage.end_layer}) is not "
                             f"followed by one starting at {a.stage.end_layer}")
