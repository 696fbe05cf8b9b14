"""A sequence in transit between engines: its state and the KV cache of some layers.

Pipeline consolidation moves every in-flight sequence from the stage workers to the
consolidated worker: each stage exports the KV of its layers, the parts are merged, and the
receiving engine imports the sequence and keeps decoding with the same generator state, so it
produces exactly the tokens the pipeline would have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.worker.engine.errors import InvalidRequestError
from services.worker.engine.sequence import SamplingParams


@dataclass(frozen=True)
class KVPart:
    """Keys and values of layers [start_layer, end_layer): [layers, kv_heads, tokens, head_dim]."""

    start_layer: int
    end_layer: int
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class SequenceSnapshot:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    max_output_tokens: int
    # tokens whose KV is in `kv` (all but the last sampled token while decoding)
    num_cached: int
    # torch.Generator state: sampling continues exactly where it stopped
    generator_state: torch.Tensor
    kv: list[KVPart] = field(default_factory=list)

    def merge(self, other: SequenceSnapshot) -> SequenceSnapshot:
        """Combine the KV parts two stages exported for the same sequence at the same step."""
        if (other.request_id, other.num_cached) != (self.request_id, self.num_cached):
            raise InvalidRequestError(
                f"cannot merge snapshots of {other.request_id!r}@{other.num_cached} into "
                f"{self.request_id!r}@{self.num_cached}"
            )
        self.kv = sorted([*self.kv, *other.kv], key=lambda part: part.start_layer)
        return self

    def kv_for_layers(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layers [start, end), cut from whichever parts hold them."""
        keys, values = [], []
        layer = start
        for part in sorted(self.kv, key=lambda p: p.start_layer):
            if part.end_layer <= layer or part.start_layer > layer:
                continue
            take = min(end, part.end_layer) - layer
            offset = layer - part.start_layer
            keys.append(part.keys[offset:offset + take])
            values.append(part.values[offset:offset + take])
            layer += take
            if layer == end:
                break
        if layer != end:
            raise InvalidRequestError(
                f"snapshot of {self.request_id!r} lacks the KV of layers [{layer}, {end})"
            )
        return torch.cat(keys), torch.cat(values)
