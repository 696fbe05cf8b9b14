"""What the storage service says on the wire: manifests, model descriptions, errors.

The node agent (services/prefetcher) reads these too, so this module imports pydantic only
(no torch, no FastAPI).
"""

from __future__ import annotations

import base64

from pydantic import BaseModel, Field


class ManifestTensor(BaseModel):
    name: str
    # file inside the model folder the bytes come from
    file: str
    # source byte range [src_start, src_end) in `file`
    src_start: int
    src_end: int
    # safetensors dtype name ("F16", "BF16", ...)
    dtype: str
    shape: list[int]
    # where the bytes go in the partition file: [dst_start, dst_start + src_end - src_start)
    dst_start: int

    @property
    def dst_end(self) -> int:
        return self.dst_start + self.src_end - self.src_start


class Manifest(BaseModel):
    """One stage of one pipeline degree: its layers and how to assemble its partition file."""

    model: str
    degree: int
    stage: int
    # decoder layers [start_layer, end_layer) of a num_layers-layer model
    start_layer: int
    end_layer: int
    num_layers: int
    # size of the partition file, header included
    num_bytes: int
    # the file's first bytes, base64: u64 little-endian length + the padded JSON header
    header_b64: str
    # in partition-file order: contiguous from len(header) to num_bytes
    tensors: list[ManifestTensor]

    @property
    def header(self) -> bytes:
        return base64.b64decode(self.header_b64)


class StageInfo(BaseModel):
    stage: int
    start_layer: int
    end_layer: int
    # partition file size (header included)
    num_bytes: int


class FileInfo(BaseModel):
    path: str
    num_bytes: int


class ModelInfo(BaseModel):
    name: str
    architecture: str
    family: str
    num_layers: int
    # the checkpoint's weight dtype (config.json torch_dtype)
    dtype: str
    # bytes of all weights the engine uses, each tensor once
    num_bytes: int
    max_degree: int
    files: list[FileInfo]
    # str(degree) -> the stages of that pipeline degree
    partitions: dict[str, list[StageInfo]]


class ImportRequest(BaseModel):
    # folder on the storage node holding the HF checkpoint
    path: str
    name: str = Field(min_length=1, max_length=128)


class ErrorBody(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
