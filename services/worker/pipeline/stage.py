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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from libs.common.pipeline import DriverPacket, KVPartInfo, SeqSampling, StagePacket
from services.worker.engine.model_runner import ModelRunner
from services.worker.engine.sampler import sample
from services.worker.engine.sequence import SamplingParams
from services.worker.pipeline.wire import BlobWriter, decode, encode, read_tensor

logger = logging.getLogger(__name__)

# (stage the frame is for, frame)
SendFn = Callable[[int, bytes], None]
# (event kind, data)
EventFn = Callable[[str, dict[str, Any]], None]


@dataclass
class _Sampling:
    """What `sample` needs of a sequence."""

    params: SamplingParams
    generator: torch.Generator


class StageServer:
    def __init__(self, runner: ModelRunner, *, stage: int, send: SendFn,
                 on_event: EventFn | None = None) -> None:
        assert runner.kv_cache is not None, "load the stage first"
        self.runner = runner
        self.stage = stage
        self.is_last = runner.stage.is_last
        self._send = send
        self._on_event = on_event or (lambda kind, data: None)
        self._samplers: dict[str, _Sampling] = {}
        self.inbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"stage-{stage}", daemon=True)
        self._lock = threading.Lock()
        self.num_steps = 0
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
                self._run_batch(packet, blob)
            case "handover":
                self._export_kv(packet)
                self._pass_on(packet)

    def _run_batch(self, packet: StagePacket, blob: memoryview) -> None:
        assert packet.hidden is not None, "a batch frame carries activations"
        started = time.perf_counter()
        inputs = read_tensor(blob, packet.hidden)
        batch = self.runner.new_batch(is_prefill=packet.is_prefill, slot_ids=packet.slot_ids,
                                      context_lens=packet.context_lens,
                                      query_lens=packet.query_lens)
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
            writer = BlobWriter()
            forward = packet.model_copy(update={"hidden": writer.add(hidden)})
            # the moves and finished ids travel on: every stage applies them once
            self._send(self.stage + 1, encode(forward, writer.getvalue()))
        self.compute_s += computed - computing
        self.frame_s += (computing - started) + (time.perf_counter() - computed)

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
