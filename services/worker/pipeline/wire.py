"""Frames on the pipeline data plane: a Pydantic header and the raw bytes of its tensors.

Layout: 4-byte big-endian header length, the header's JSON, then the blob. Tensors are
stored as their raw bytes (any dtype, bf16 included) and read back as views of the blob.
"""

from __future__ import annotations

import struct
from typing import TypeVar

import torch

from libs.common.messages import Message
from libs.common.pipeline import TensorInfo

_LENGTH = struct.Struct(">I")
M = TypeVar("M", bound=Message)


class BlobWriter:
    """Collects tensors into one blob and hands out where each one is."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.num_bytes = 0

    def add(self, tensor: torch.Tensor) -> TensorInfo:
        data = tensor_bytes(tensor)
        info = TensorInfo(dtype=str(tensor.dtype).removeprefix("torch."),
                          shape=list(tensor.shape), offset=self.num_bytes, nbytes=len(data))
        self._parts.append(data)
        self.num_bytes += len(data)
        return info

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


def encode(header: Message, blob: bytes = b"") -> bytes:
    head = header.model_dump_json().encode()
    return _LENGTH.pack(len(head)) + head + blob


def reframe(frame: bytes | bytearray, blob: bytes) -> bytes:
    """`frame`'s header with another blob: a stage passes a batch on with the header it
    received (its moves and finished ids travel on), where the activations it computed have
    the shape, dtype and size the header already gives."""
    (length,) = _LENGTH.unpack_from(frame)
    return bytes(memoryview(frame)[:_LENGTH.size + length]) + blob


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw bytes, as `BlobWriter` stores them."""
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def decode(body: bytes | bytearray, cls: type[M]) -> tuple[M, memoryview]:
    """The header as `cls` and a view of the blob."""
    (length,) = _LENGTH.unpack_from(body)
    view = memoryview(body)
    header = cls.model_validate_json(bytes(view[_LENGTH.size:_LENGTH.size + length]))
    return header, view[_LENGTH.size + length:]


def read_tensor(blob: memoryview, info: TensorInfo) -> torch.Tensor:
    """The tensor `info` describes, copied out of the blob (the blob may be read-only)."""
    dtype = getattr(torch, info.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown tensor dtype {info.dtype!r} in a pipeline frame")
    raw = bytearray(blob[info.offset:info.offset + info.nbytes])
    if len(raw) != info.nbytes:
        raise ValueError(f"a pipeline frame's blob ends before its tensor ({info.nbytes} bytes "
                         f"at {info.offset})")
    if not raw:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(info.shape)
