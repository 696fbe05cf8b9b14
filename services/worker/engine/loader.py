"""Weight loading from safetensors files, complete or still arriving.

Tensors are `torch.frombuffer` views of a read-only `mmap` of the file: the page cache (or the
shared-memory partition the node agent fills) is the only copy on the CPU. A file that is still
being written is read behind a *watermark*: the node agent writes the safetensors header first,
then the data, and publishes how many bytes from the start of the file have arrived; the loader
assigns each tensor the moment the watermark passes its end.
"""

from __future__ import annotations

import json
import mmap
import struct
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from services.worker.engine.errors import ModelFormatError
from services.worker.engine.models.base import StageModel

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# torch warns that a read-only mmap is not writable; weights are never written in place.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    # absolute byte offsets of the tensor's data in the file
    start: int
    end: int


class Watermark(Protocol):
    def wait_for(self, offset: int, timeout: float) -> None:
        """Block until bytes [0, offset) of the file have arrived."""


class CompleteFile:
    """The watermark of a file that is already whole."""

    def wait_for(self, offset: int, timeout: float) -> None:
        return None


class SafetensorsReader:
    """Reads one safetensors-layout file through a zero-copy mmap, optionally behind a watermark."""

    def __init__(self, path: str | Path, watermark: Watermark | None = None) -> None:
        self.path = Path(path)
        self.watermark: Watermark = watermark or CompleteFile()
        with open(self.path, "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def entries(self, timeout: float = 60.0) -> list[TensorEntry]:
        """The tensors in the file, in the order their bytes arrive."""
        self.watermark.wait_for(8, timeout)
        (header_len,) = struct.unpack("<Q", self._mmap[:8])
        if header_len > len(self._mmap) - 8:
            raise ModelFormatError(f"{self.path}: header length {header_len} exceeds the file")
        self.watermark.wait_for(8 + header_len, timeout)
        try:
            header = json.loads(bytes(self._mmap[8:8 + header_len]))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelFormatError(f"{self.path}: unreadable safetensors header: {exc}") from exc
        data_start = 8 + header_len
        entries = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ModelFormatError(f"{self.path}: tensor {name} has dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            entries.append(TensorEntry(name, dtype, tuple(info["shape"]),
                                       data_start + begin, data_start + end))
        return sorted(entries, key=lambda e: e.start)

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        numel = 1
        for dim in entry.shape:
            numel *= dim
        if numel == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        flat = torch.frombuffer(self._mmap, dtype=entry.dtype, count=numel, offset=entry.start)
        return flat.view(entry.shape)

    def stream(self, timeout: float = 60.0, names: set[str] | None = None
               ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) as each tensor's bytes arrive (only `names`, if given)."""
        for entry in self.entries(timeout):
            if names is not None and entry.name not in names:
                continue
            self.watermark.wait_for(entry.end, timeout)
            yield entry.name, self.tensor(entry)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF folder: those of the index if sharded, else all."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFormatError(f"{model_dir}: shards named in the index are missing: "
                                   f"{', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"model folder {str(model_dir)!r} has no *.safetensors weights "
                               "(.bin checkpoints are not supported; convert them to safetensors)")
    return files


def checkpoint_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        yield from SafetensorsReader(path).stream()


@dataclass(frozen=True)
class LoadStats:
    num_tensors: int
    num_bytes: int
    seconds: float


def load_weights(model: StageModel, sources: Iterable[tuple[str, torch.Tensor]], *,
                 dtype: torch.dtype, device: torch.device,
                 on_assigned: Callable[[], object] | None = None) -> LoadStats:
    """Assign the stage's tensors from `sources`; return as soon as the last one is in.
    `on_assigned` runs after each tensor is in (packing what is complete, while the next
    tensor's bytes may still be on their way)."""
    started = time.perf_counter()
    targets = model.weight_targets()
    remaining = set(targets)
    num_bytes = 0
    for raw_name, tensor in sources:
        name = model.checkpoint_name(raw_name)
        if name not in remaining:
            continue  # another stage's tensor, or one this architecture does not use
        if tensor.dtype != dtype or tensor.device != device:
            tensor = tensor.to(device=device, dtype=dtype)
        for param_name in targets[name]:
            model.set_weight(param_name, tensor)
        num_bytes += tensor.numel() * tensor.element_size()
        remaining.discard(name)
        if on_assigned is not None:
            on_assigned()
        if not remaining:
            break
    if remaining:
        names = sorted(remaining)
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise ModelFormatError(f"checkpoint lacks tensors the stage needs: "
                               f"{', '.join(names[:5])}{more}")
    return LoadStats(len(targets), num_bytes, time.perf_counter() - started)
