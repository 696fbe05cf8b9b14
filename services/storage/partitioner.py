"""Split a checkpoint into pipeline stages of contiguous decoder layers.

Which tensors a stage needs is the engine's decision, not ours: the partitioner builds each
stage on the `meta` device and asks it (`weight_targets`), so family naming rules live only in
`engine/models/`. Stages balance bytes (the embedding counts in the first stage, the final norm
and LM head in the last, a tied embedding in both). Each partition is laid out as a safetensors
file: the header first, then the stage's tensors in the order the stage consumes them, with no
gaps; the manifest says which byte range of which source file fills each destination range.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from libs.common.errors import InvalidRequestError, ModelFormatError
from services.worker.engine.config import ModelConfig, StageSpec
from services.worker.engine.loader import SAFETENSORS_DTYPES, checkpoint_files
from services.worker.engine.models import build_stage_model

MAX_DEGREE = 4
# safetensors pads the JSON header with spaces so the data starts 8-byte aligned
_HEADER_ALIGN = 8


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the checkpoint, under the engine's canonical name."""

    name: str
    # file name inside the model folder
    file: str
    dtype: str
    shape: tuple[int, ...]
    # absolute byte offsets of the tensor's data in `file`
    start: int
    end: int

    @property
    def num_bytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ManifestEntry:
    name: str
    file: str
    # source byte range [src_start, src_end) in `file`
    src_start: int
    src_end: int
    dtype: str
    shape: tuple[int, ...]
    # where those bytes go in the partition file
    dst_start: int

    @property
    def num_bytes(self) -> int:
        return self.src_end - self.src_start

    @property
    def dst_end(self) -> int:
        return self.dst_start + self.num_bytes


@dataclass(frozen=True)
class Partition:
    degree: int
    stage: int
    start_layer: int
    end_layer: int
    num_layers: int
    # the partition file's first bytes: little-endian u64 length, then the padded JSON header
    header: bytes
    tensors: list[ManifestEntry]
    # size of the whole partition file (header included)
    num_bytes: int

    @property
    def weight_bytes(self) -> int:
        return self.num_bytes - len(self.header)


def read_safetensors_header(path: Path) -> tuple[dict[str, object], int]:
    """The JSON header of a safetensors file and where its data starts (reads only the
    header bytes)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelFormatError(f"{path}: too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise ModelFormatError(f"{path}: header length {header_len} exceeds the file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + header_len


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int, int]]) -> bytes:
    """A safetensors header for (name, dtype, shape, begin, end) data offsets, padded."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _HEADER_ALIGN)
    return struct.pack("<Q", len(text)) + text


def plan_stages(costs: list[list[int]], num_layers: int, degree: int) -> list[tuple[int, int]]:
    """Contiguous non-empty layer ranges minimizing the largest stage, then the spread.

    `costs[a][b]` is the byte size of a stage of layers [a, b). Ties go to the earliest cut,
    so the plan is deterministic.
    """
    if not 1 <= degree <= min(MAX_DEGREE, num_layers):
        raise InvalidRequestError(
            f"pipeline degree {degree} is not between 1 and {min(MAX_DEGREE, num_layers)} "
            f"for a {num_layers}-layer model", param="degree")
    # best[k][b]: (largest stage, sum of squares, cuts) splitting layers [0, b) into k stages
    best: list[dict[int, tuple[int, int, tuple[int, ...]]]] = [{0: (0, 0, ())}]
    for k in range(1, degree + 1):
        row: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        for b in range(k, num_layers - (degree - k) + 1):
            for a, (largest, squares, cuts) in best[k - 1].items():
                if a >= b:
                    continue
                cost = costs[a][b]
                candidate = (max(largest, cost), squares + cost * cost, (*cuts, b))
                if b not in row or candidate[:2] < row[b][:2]:
                    row[b] = candidate
        best.append(row)
    bounds = (0, *best[degree][num_layers][2])
    return list(itertools.pairwise(bounds))


class Partitioner:
    """The stage plans of one model folder; reads only the safetensors headers."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_model_dir(self.model_dir)
        self.num_layers = self.config.num_layers
        self.tensors = self._read_tensors()
        # tensors owned by the one-layer stage [i, i + 1): a stage's set is their union
        self._owned = [self._owned_names(StageSpec(i, i + 1, self.num_layers))
                       for i in range(self.num_layers)]
        self._costs = self._stage_costs()

    @property
    def max_degree(self) -> int:
        return min(MAX_DEGREE, self.num_layers)

    @property
    def num_bytes(self) -> int:
        """Bytes of every tensor some stage uses (each counted once)."""
        return self._costs[0][self.num_layers]

    def plan(self, degree: int) -> list[tuple[int, int]]:
        return plan_stages(self._costs, self.num_layers, degree)

    def partitions(self, degree: int) -> list[Partition]:
        return [self._partition(degree, stage, start, end)
                for stage, (start, end) in enumerate(self.plan(degree))]

    def stage_bytes(self, start_layer: int, end_layer: int) -> int:
        return self._costs[start_layer][end_layer]

    def _read_tensors(self) -> dict[str, SourceTensor]:
        model = build_stage_model(self.config, StageSpec.whole(self.num_layers))
        tensors: dict[str, SourceTensor] = {}
        for path in checkpoint_files(self.model_dir):
            header, data_start = read_safetensors_header(path)
            file_size = path.stat().st_size
            for raw_name, info in header.items():
                if raw_name == "__metadata__":
                    continue
                tensor = _source_tensor(path, model.checkpoint_name(raw_name), info,
                                        data_start=data_start, file_size=file_size)
                if tensor.name in tensors:
                    raise ModelFormatError(f"{self.model_dir}: tensor {tensor.name} appears "
                                           f"twice in the checkpoint")
                tensors[tensor.name] = tensor
        return tensors

    def _owned_names(self, spec: StageSpec) -> list[str]:
        """The checkpoint tensors a stage loads, in the order the stage consumes them."""
        model = build_stage_model(self.config, spec)
        names = []
        for name, params in model.weight_targets().items():
            tensor = self.tensors.get(name)
            if tensor is None:
                raise ModelFormatError(f"{self.model_dir}: the checkpoint lacks tensor {name}")
            expected = tuple(model.get_parameter(params[0]).shape)
            if tensor.shape != expected:
                raise ModelFormatError(f"{self.model_dir}: tensor {name} has shape "
                                       f"{tensor.shape}, the config says {expected}")
            names.append(name)
        return names

    def _stage_costs(self) -> list[list[int]]:
        costs = [[0] * (self.num_layers + 1) for _ in range(self.num_layers + 1)]
        for a in range(self.num_layers):
            seen: set[str] = set()
            total = 0
            for b in range(a + 1, self.num_layers + 1):
                for name in self._owned[b - 1]:
                    if name not in seen:
                        seen.add(name)
                        total += self.tensors[name].num_bytes
                costs[a][b] = total
        return costs

    def _partition(self, degree: int, stage: int, start: int, end: int) -> Partition:
        names = self._owned_names(StageSpec(start, end, self.num_layers))
        sources = [self.tensors[name] for name in names]
        offsets, position = [], 0
        for tensor in sources:
            offsets.append((tensor.name, tensor.dtype, tensor.shape, position,
                            position + tensor.num_bytes))
            position += tensor.num_bytes
        header = encode_header(offsets)
        entries = [ManifestEntry(t.name, t.file, t.start, t.end, t.dtype, t.shape,
                                 len(header) + begin)
                   for t, (_, _, _, begin, _) in zip(sources, offsets, strict=True)]
        return Partition(degree, stage, start, end, self.num_layers, header, entries,
                         len(header) + position)


def _source_tensor(path: Path, name: str, info: object, *, data_start: int,
                   file_size: int) -> SourceTensor:
    if not isinstance(info, dict):
        raise ModelFormatError(f"{path}: malformed header entry for {name}")
    try:
        dtype = str(info["dtype"])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{path}: malformed header entry for {name}") from exc
    if dtype not in SAFETENSORS_DTYPES:
        raise ModelFormatError(f"{path}: tensor {name} has unsupported dtype {dtype}")
    if not 0 <= begin <= end or data_start + end > file_size:
        raise ModelFormatError(f"{path}: tensor {name} lies outside the file")
    if end - begin != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
        raise ModelFormatError(f"{path}: tensor {name} has {end - begin} bytes, not what "
                               f"{dtype} {list(shape)} needs")
    return SourceTensor(name, path.name, dtype, shape, data_start + begin, data_start + end)
