"""The stage-0 worker of a pipeline: it schedules, runs the first stage, and streams tokens.

`PipelineDriver` wraps a partial `LLMEngine` (its runners stop short of the last layer) and
looks like an engine to `EngineLoop`: each `step()` either launches a new micro-batch (run
stage 0, send the activations to stage 1) or takes the next packet from the inbox (the last
stage's sampled tokens, which finish that step). Up to `max_in_flight` micro-batches are in
the pipeline at once; a sequence is in at most one of them.

Consolidation: once the full-size worker has loaded the other stages' layers itself,
`start_handover` stops launching, lets the micro-batches in flight come back, sends a
handover frame down the ring (after every frame before it, so each stage's cache is final),
collects each stage's KV and the last stage's generator states, and turns the engine into a
whole-model engine. From then on `step()` is the engine's own.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from libs.common.errors import HydraError
from libs.common.pipeline import (
    DriverPacket,
    HandoverSeq,
    SeqSampling,
    SlotMoveInfo,
    StagePacket,
)
from services.worker.engine.engine import LLMEngine, StepPlan
from services.worker.engine.handover import KVPart, SequenceSnapshot
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.sequence import RequestOutput, SamplingParams, Sequence
from services.worker.pipeline.wire import BlobWriter, decode, encode, read_tensor

logger = logging.getLogger(__name__)

# (stage the frame is for, frame); must not block
SendFn = Callable[[int, bytes], None]
# how long a step waits for a packet before giving the loop's commands a turn
POLL_S = 0.02


class PipelineError(HydraError):
    code = "pipeline_error"
    http_status = 503


@dataclass(frozen=True)
class HandoverStats:
    num_seqs: int
    num_bytes: int
    # from the handover request to the switch: the time no new step was launched
    pause_s: float


@dataclass
class _Handover:
    runners: list[ModelRunner]
    future: Future[HandoverStats]
    requested_at: float
    seqs: list[Sequence] = field(default_factory=list)
    is_sent: bool = False
    # stage -> its KV packet (and the blob it points into)
    packets: dict[int, tuple[DriverPacket, memoryview]] = field(default_factory=dict)


class PipelineDriver:
    def __init__(self, engine: LLMEngine, *, degree: int, send: SendFn,
                 max_in_flight: int | None = None,
                 on_launch: Callable[[], None] | None = None) -> None:
        if not engine.is_partial or degree < 2:
            raise ValueError("a pipeline driver drives a partial engine of a degree >= 2 pipeline")
        self.engine = engine
        self.degree = degree
        self._send = send
        self.max_in_flight = max_in_flight or degree
        # called as each micro-batch is launched (KeepAwake.poke)
        self.on_launch = on_launch or (lambda: None)
        self.inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._in_flight: dict[int, StepPlan] = {}
        self._handover: _Handover | None = None

    @property
    def is_consolidated(self) -> bool:
        return not self.engine.is_partial

    # --- start-up ----------------------------------------------------------------------------
    def connect(self, timeout_s: float) -> dict[int, DriverPacket]:
        """Send `init` around the ring and wait for every stage's capacity; size the scheduler
        to the smallest. Call before serving, from the thread that will step."""
        self._send(1, encode(StagePacket(kind="init")))
        infos: dict[int, DriverPacket] = {}
        deadline = time.monotonic() + timeout_s
        while len(infos) < self.degree - 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(1, self.degree)) - infos.keys())
                raise PipelineError(f"pipeline stages {missing} did not answer in {timeout_s}s")
            try:
                packet, _ = decode(self.inbox.get(timeout=remaining), DriverPacket)
            except queue.Empty:
                continue
            if packet.kind == "info":
                infos[packet.stage] = packet
        scheduler = self.engine.scheduler
        assert scheduler is not None, "load the engine first"
        scheduler.num_slots = min(scheduler.num_slots, *(p.num_slots for p in infos.values()))
        self.engine.max_model_len = min(self.engine.max_model_len,
                                        *(p.max_model_len for p in infos.values()))
        return infos

    # --- the Engine protocol of EngineLoop ----------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | None = None,
                    params: SamplingParams | None = None, *,
                    messages: list[dict[str, str]] | None = None) -> Any:
        return self.engine.add_request(request_id, prompt, params, messages=messages)

    def abort(self, request_id: str) -> RequestOutput | None:
        return self.engine.abort(request_id)

    def has_unfinished(self) -> bool:
        return (self.engine.has_unfinished() or bool(self._in_flight)
                or self._handover is not None)

    def step(self) -> list[RequestOutput]:
        if self.is_consolidated:
            return self.engine.step()
        if self._handover is not None:
            return self._step_handover(self._handover)
        if len(self._in_flight) < self.max_in_flight:
            busy = {seq.request_id for plan in self._in_flight.values() for seq in plan.seqs}
            plan = self.engine.schedule_step(busy=busy)
            if plan is not None:
                self._launch(plan)
                return []
        return self._receive()

    # --- consolidation -------------------------------------------------------------------------
    def start_handover(self, runners: list[ModelRunner]) -> Future[HandoverStats]:
        """Take the whole model over with `runners` (loaded, for the layers after ours).

        Call on the stepping thread; the future is done once the engine serves alone."""
        future: Future[HandoverStats] = Future()
        if self.is_consolidated or self._handover is not None:
            future.set_exception(PipelineError("the pipeline is consolidated or consolidating"))
            return future
        self._handover = _Handover(runners, future, time.monotonic())
        return future

    def _step_handover(self, handover: _Handover) -> list[RequestOutput]:
        if self._in_flight:
            return self._receive()  # the last micro-batches finish in the pipeline
        if not handover.is_sent:
            handover.seqs = self.engine.running_sequences()
            packet = StagePacket(
                kind="handover", **self._pending(),
                handover=[HandoverSeq(request_id=s.request_id, slot=s.slot or 0,
                                      num_cached=s.num_cached) for s in handover.seqs])
            self._send(1, encode(packet))
            handover.is_sent = True
            return []
        if len(handover.packets) < self.degree - 1:
            return self._receive()
        try:
            snapshots, num_bytes = self._snapshots(handover)
            self.engine.complete_with(handover.runners, snapshots)
        except Exception as exc:  # the pipeline keeps serving; the caller reports it
            logger.exception("taking over the KV cache failed")
            self._handover = None
            handover.future.set_exception(exc)
            return []
        self._handover = None
        handover.future.set_result(HandoverStats(
            num_seqs=len(handover.seqs), num_bytes=num_bytes,
            pause_s=time.monotonic() - handover.requested_at))
        return []

    def _snapshots(self, handover: _Handover) -> tuple[dict[str, SequenceSnapshot], int]:
        parts: dict[str, list[KVPart]] = {s.request_id: [] for s in handover.seqs}
        states: dict[str, torch.Tensor] = {}
        num_bytes = 0
        for packet, blob in handover.packets.values():
            for part in packet.parts:
                keys, values = read_tensor(blob, part.keys), read_tensor(blob, part.values)
                parts[part.request_id].append(KVPart(part.start_layer, part.end_layer,
                                                     keys, values))
                num_bytes += part.keys.nbytes + part.values.nbytes
            for request_id, info in packet.generator_states.items():
                states[request_id] = read_tensor(blob, info)
        snapshots = {}
        for seq in handover.seqs:
            # greedy requests may never have reached a sampler that keeps a generator
            state = states.get(seq.request_id, seq.generator.get_state())
            snapshots[seq.request_id] = SequenceSnapshot(
                request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=seq.output_token_ids, params=seq.params,
                max_output_tokens=seq.max_output_tokens, num_cached=seq.num_cached,
                generator_state=state, kv=parts[seq.request_id])
        return snapshots, num_bytes

    # --- micro-batches -------------------------------------------------------------------------
    def _launch(self, plan: StepPlan) -> None:
        self.on_launch()
        hidden = self.engine.run_stages(plan)  # [num_tokens, hidden]
        writer = BlobWriter()
        forward = plan.forward
        packet = StagePacket(
            kind="batch", step_id=plan.step_id, **self._pending(),
            is_prefill=forward.is_prefill, slot_ids=forward.slot_ids,
            context_lens=forward.context_lens, query_lens=forward.query_lens,
            sampling=[SeqSampling(request_id=s.request_id, temperature=s.params.temperature,
                                  top_p=s.params.top_p, top_k=s.params.top_k, seed=s.seed)
                      for s in plan.seqs],
            hidden=writer.add(hidden))
        self._send(1, encode(packet, writer.getvalue()))
        self._in_flight[plan.step_id] = plan

    def _pending(self) -> dict[str, Any]:
        """The slot moves and finished requests the other stages have not seen yet, as
        `StagePacket` fields: every packet down the ring carries them."""
        moves, finished = self.engine.take_pending()
        return {"slot_moves": [SlotMoveInfo(src=m.src, dst=m.dst, length=m.length)
                               for m in moves],
                "finished_ids": finished}

    def _receive(self) -> list[RequestOutput]:
        try:
            frame = self.inbox.get(timeout=POLL_S)
        except queue.Empty:
            return []
        packet, blob = decode(frame, DriverPacket)
        match packet.kind:
            case "tokens":
                plan = self._in_flight.pop(packet.step_id, None)
                if plan is None:
                    logger.error("tokens of unknown step %d from stage %d", packet.step_id,
                                 packet.stage)
                    return []
                return self.engine.finish_step(plan, packet.token_ids)
            case "kv":
                if self._handover is None:
                    logger.error("KV from stage %d with no handover under way", packet.stage)
                else:
                    self._handover.packets[packet.stage] = (packet, blob)
            case "info":
                pass  # a late answer to init
        return []
