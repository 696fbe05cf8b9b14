"""A pipeline stage after the first: activations in, activations (or sampled tokens) out.

Frames arrive in step order from the stage before. A frame from the direct socket is handled
on the socket's reader thread itself (`handle_now`): the token does not wait for another
thread to wake up, once per hop. A frame from NATS goes to the inbox and is handled on the
stage's own thread (never on the event loop). One lock keeps the two from running the model
at once (it is not thread-safe; torch releases the GIL, so NATS keeps flowing). The stage
follows the driver's slot decisions: it applies the slot moves every frame carries before
running it, so its KV cache mirrors the driver's slot layout. The last stage also samples,
with one generator per request seeded like the driver's, so a consolidated worker that takes
over the generator states continues with exactly the same tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from libs.common.pipeline import DriverPacket, KVPartInfo, SeqSampling, StagePacket
from services.worker.engine.attention import ForwardBatch
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.sampler import sample
from services.worker.engine.sequence import SamplingParams
from services.worker.pipeline.wire import (
    BlobWriter,
    decode,
    encode,
    read_tensor,
    reframe,
    tensor_bytes,
)

logger = logging.getLogger(__name__)

# (stage the frame is for, frame)
SendFn = Callable[[int, bytes], None]
# (event kind, data)
EventFn = Callable[[str, dict[str, Any]], None]
# next-step batches kept ready: one per micro-batch in flight is enough
MAX_READY_BATCHES = 8


@dataclass
class _Sampling:
    """What `sample` needs of a sequence."""

    params: SamplingParams
    generator: torch.Generator


class StageServer:
    def __init__(self, runner: ModelRunner, *, stage: int, send: SendFn,
                 on_event: EventFn | None = None,
                 on_frame: Callable[[], None] | None = None) -> None:
        assert runner.kv_cache is not None, "load the stage first"
        self.runner = runner
        self.stage = stage
        self.is_last = runner.stage.is_last
        self._send = send
        self._on_event = on_event or (lambda kind, data: None)
        # called as each frame arrives (KeepAwake.poke)
        self._on_frame = on_frame or (lambda: None)
        self._samplers: dict[str, _Sampling] = {}
        # (slot ids, context lens) -> the decode batch of that step, built after the step
        # before it (`_prepare_next`)
        self._ready_batches: OrderedDict[tuple[tuple[int, ...], tuple[int, ...]],
                                         ForwardBatch] = OrderedDict()
        self.inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"stage-{stage}", daemon=True)
        self._lock = threading.Lock()
        self.num_steps = 0
        # decode steps that found their batch built ahead (`_prepare_next`)
        self.num_prepared_hits = 0
        # seconds in the model (forward, and logits + sampling at the last stage), and in
        # reading and writing frames: where a pipeline step's time goes
        self.compute_s = 0.0
        self.frame_s = 0.0
        self.error: Exception | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self.inbox.put(None)
        self._thread.join(timeout)

    def handle_now(self, frame: bytes) -> None:
        """Handle a frame on the calling thread (a direct socket's reader)."""
        with self._lock:
            try:
                self.handle(frame)
            except Exception as exc:  # a bad frame: the driver times out and the endpoint
                self.error = exc      # is rebuilt by the scheduler; keep serving the rest
                logger.exception("stage %d failed on a frame", self.stage)

    def _run(self) -> None:
        while (frame := self.inbox.get()) is not None:
            self.handle_now(frame)

    @torch.inference_mode()
    def handle(self, frame: bytes) -> None:
        self._on_frame()
        packet, blob = decode(frame, StagePacket)
        cache = self.runner.kv_cache
        assert cache is not None
        for move in packet.slot_moves:
            cache.move_slot(move.src, move.dst, move.length)
        for request_id in packet.finished_ids:
            self._samplers.pop(request_id, None)
        match packet.kind:
            case "init":
                self._reply(DriverPacket(kind="info", stage=self.stage,
                                         num_slots=cache.num_slots, max_model_len=cache.max_len))
                self._pass_on(packet)
            case "batch":
                self._run_batch(packet, blob, frame)
            case "handover":
                self._export_kv(packet)
                self._pass_on(packet)

    def _run_batch(self, packet: StagePacket, blob: memoryview, frame: bytes) -> None:
        assert packet.hidden is not None, "a batch frame carries activations"
        started = time.perf_counter()
        inputs = read_tensor(blob, packet.hidden)
        batch = self._batch(packet)
        computing = time.perf_counter()
        hidden = self.runner.forward(inputs, batch)  # [T, hidden]
        self.num_steps += 1
        if self.is_last:
            logits = self.runner.logits(hidden, batch)  # [num_seqs, vocab]
            token_ids = sample(logits, [self._sampler(s) for s in packet.sampling])
            computed = time.perf_counter()
            self._reply(DriverPacket(kind="tokens", stage=self.stage, step_id=packet.step_id,
                                     token_ids=token_ids))
        else:
            computed = time.perf_counter()
            if list(hidden.shape) == packet.hidden.shape \
                    and str(hidden.dtype).removeprefix("torch.") == packet.hidden.dtype:
                # the header as received: its moves and finished ids travel on, and it already
                # describes these activations (a middle stage keeps [T, hidden])
                forward = reframe(frame, tensor_bytes(hidden))
            else:
                writer = BlobWriter()
                forward = encode(packet.model_copy(update={"hidden": writer.add(hidden)}),
                                 writer.getvalue())
            self._send(self.stage + 1, forward)
        self.compute_s += computed - computing
        self.frame_s += (computing - started) + (time.perf_counter() - computed)
        self._prepare_next(packet)

    def _batch(self, packet: StagePacket) -> ForwardBatch:
        """The step's batch: the one `_prepare_next` built, if the driver scheduled what it
        guessed, else a new one."""
        if not packet.is_prefill:
            batch = self._ready_batches.pop(
                (tuple(packet.slot_ids), tuple(packet.context_lens)), None)
            if batch is not None:
                self.num_prepared_hits += 1
                return batch
        return self.runner.new_batch(is_prefill=packet.is_prefill, slot_ids=packet.slot_ids,
                                     context_lens=packet.context_lens,
                                     query_lens=packet.query_lens)

    def _prepare_next(self, packet: StagePacket) -> None:
        """Build the batch of the decode step that most often follows this one (the same
        sequences, one token further) and make its cache positions readable, while the later
        stages compute: the next frame then goes straight into the forward. Building it costs
        ~0.05 ms hot, but ~0.25 ms on a core whose caches the other stages' weights have
        flushed, once per stage per token (docs/COLDSTART.md). A wrong guess (a sequence
        joined, finished or moved) only costs the build: zeroing positions past what a
        sequence wrote is what its next step would do anyway."""
        context_lens = [c + n for c, n in zip(packet.context_lens, packet.query_lens,
                                              strict=True)]
        cache = self.runner.kv_cache
        assert cache is not None
        if max(context_lens, default=cache.max_len) >= cache.max_len:
            return  # the sequence cannot take another token here
        batch = self.runner.new_batch(is_prefill=False, slot_ids=packet.slot_ids,
                                      context_lens=context_lens,
                                      query_lens=[1] * len(context_lens))
        cache.make_readable(packet.slot_ids, [n + 1 for n in context_lens],
                            max(context_lens) + 1)
        self._ready_batches[(tuple(packet.slot_ids), tuple(context_lens))] = batch
        while len(self._ready_batches) > MAX_READY_BATCHES:
            self._ready_batches.popitem(last=False)

    def _sampler(self, info: SeqSampling) -> _Sampling:
        sampling = self._samplers.get(info.request_id)
        if sampling is None:
            params = SamplingParams(max_tokens=None, temperature=info.temperature,
                                    top_p=info.top_p, top_k=info.top_k, seed=info.seed)
            sampling = _Sampling(params, torch.Generator().manual_seed(info.seed))
            self._samplers[info.request_id] = sampling
        return sampling

    def _export_kv(self, packet: StagePacket) -> None:
        cache = self.runner.kv_cache
        assert cache is not None
        writer = BlobWriter()
        parts = []
        for seq in packet.handover:
            keys, values = cache.export_slot(seq.slot, seq.num_cached)
            parts.append(KVPartInfo(request_id=seq.request_id,
                                    start_layer=self.runner.stage.start_layer,
                                    end_layer=self.runner.stage.end_layer,
                                    num_cached=seq.num_cached, keys=writer.add(keys),
                                    values=writer.add(values)))
        states = {}
        if self.is_last:
            for seq in packet.handover:
                sampling = self._samplers.get(seq.request_id)
                if sampling is not None:
                    states[seq.request_id] = writer.add(sampling.generator.get_state())
        self._send(0, encode(DriverPacket(kind="kv", stage=self.stage, parts=parts,
                                          generator_states=states), writer.getvalue()))
        self._on_event("kv.exported", {"stage": self.stage, "num_seqs": len(parts),
                                       "num_bytes": writer.num_bytes})

    def _reply(self, packet: DriverPacket) -> None:
        self._send(0, encode(packet))

    def _pass_on(self, packet: StagePacket) -> None:
        if not self.is_last:
            self._send(self.stage + 1, encode(packet))
