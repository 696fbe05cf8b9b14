"""The data-plane messages between the stages of a pipeline endpoint (`hs.pipe.*`).

A frame is a Pydantic header plus a blob of raw tensor bytes the header points into
(`TensorInfo`). Stage s sends `StagePacket`s to stage s + 1 in step order; every stage sends
`DriverPacket`s to stage 0 (the driver: it schedules, holds the sequences and streams tokens).
The last stage samples, so its packets carry the sampled token ids.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from libs.common.messages import Message


class TensorInfo(Message):
    """Where a tensor's bytes are in a frame's blob."""

    # torch dtype name without "torch.", e.g. "float32", "bfloat16"
    dtype: str
    shape: list[int]
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class SlotMoveInfo(Message):
    """Copy `length` cached tokens from KV slot `src` to `dst` (the driver keeps slots dense)."""

    src: int = Field(ge=0)
    dst: int = Field(ge=0)
    length: int = Field(ge=0)


class SeqSampling(Message):
    """How the last stage samples one sequence's next token."""

    request_id: str
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # the sequence's generator seed; the last stage keeps a generator per request from it
    seed: int = 0


class HandoverSeq(Message):
    """A running sequence whose KV the driver takes over: `num_cached` tokens in `slot`."""

    request_id: str
    slot: int = Field(ge=0)
    num_cached: int = Field(ge=0)


class StagePacket(Message):
    """Stage s -> s + 1. Every kind first applies `slot_moves` and forgets `finished_ids`.

    - init: report your KV capacity to the driver, pass it on (the ring is connected).
    - batch: run your layers on `hidden` (the last stage: sample, send the tokens back).
    - handover: send the driver your layers' KV of `handover` (the last stage adds each
      sequence's generator state), pass it on.
    """

    kind: Literal["init", "batch", "handover"]
    step_id: int = -1
    slot_moves: list[SlotMoveInfo] = Field(default_factory=list)
    # requests the driver finished or aborted: the last stage drops their generators
    finished_ids: list[str] = Field(default_factory=list)
    is_prefill: bool = False
    slot_ids: list[int] = Field(default_factory=list)
    context_lens: list[int] = Field(default_factory=list)
    query_lens: list[int] = Field(default_factory=list)
    # one per sequence of the batch, in batch order
    sampling: list[SeqSampling] = Field(default_factory=list)
    # [num_tokens, hidden] activations leaving stage s
    hidden: TensorInfo | None = None
    handover: list[HandoverSeq] = Field(default_factory=list)


class KVPartInfo(Message):
    """One sequence's keys and values of layers [start_layer, end_layer)."""

    request_id: str
    start_layer: int
    end_layer: int
    num_cached: int
    # [layers, kv_heads, num_cached, head_dim] each
    keys: TensorInfo
    values: TensorInfo


class DriverPacket(Message):
    """Any stage -> stage 0.

    - info: the stage's KV capacity (answer to init).
    - tokens: the last stage's sampled token ids of step `step_id`, in batch order.
    - kv: the stage's KV of the sequences in a handover (and, from the last stage, their
      generator states).
    """

    kind: Literal["info", "tokens", "kv"]
    stage: int = Field(ge=0)
    step_id: int = -1
    token_ids: list[int] = Field(default_factory=list)
    num_slots: int = 0
    max_model_len: int = 0
    parts: list[KVPartInfo] = Field(default_factory=list)
    # request_id -> torch.Generator state (uint8 tensor)
    generator_states: dict[str, TensorInfo] = Field(default_factory=dict)
