"""Byte ranges: the HTTP `Range` header, and which source bytes make up a range of a partition.

A partition file is never written to disk: a range of it is a list of segments, each either
literal bytes (the header) or a byte range of one source checkpoint file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from libs.common.errors import InvalidRequestError, RangeNotSatisfiableError
from services.storage.schemas import Manifest

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class ByteRange:
    """Bytes [start, end) of a resource of `size` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end - 1}/{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single range `bytes=a-b`, `bytes=a-` or `bytes=-n` of a resource; None = all."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise InvalidRequestError(f"Range {header!r} is not one byte range 'bytes=a-b' "
                                  "(multiple ranges are not supported)", param="Range")
    first, last = match.group(1), match.group(2)
    if first == "":
        suffix = int(last)  # the last `suffix` bytes
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiableError(f"Range {header!r} of a {size}-byte resource")
        return ByteRange(max(0, size - suffix), size, size)
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        raise InvalidRequestError(f"Range {header!r} ends before it starts", param="Range")
    if start >= size:
        raise RangeNotSatisfiableError(f"Range {header!r} starts past the end of a "
                                       f"{size}-byte resource")
    return ByteRange(start, end, size)


@dataclass(frozen=True)
class Segment:
    """`length` bytes: literal `data`, or bytes [offset, offset + length) of the file `path`."""

    length: int
    path: Path | None = None
    offset: int = 0
    data: bytes = b""


def partition_segments(manifest: Manifest, files_dir: Path, start: int, end: int
                       ) -> list[Segment]:
    """The segments that make up bytes [start, end) of a partition file."""
    header = manifest.header
    segments: list[Segment] = []
    if start < len(header):
        piece = header[start:min(end, len(header))]
        segments.append(Segment(len(piece), data=piece))
    position = len(header)
    for tensor in manifest.tensors:
        assert tensor.dst_start == position, "manifest tensors must be contiguous"
        position = tensor.dst_end
        lo, hi = max(start, tensor.dst_start), min(end, tensor.dst_end)
        if lo < hi:
            segments.append(Segment(hi - lo, path=files_dir / tensor.file,
                                    offset=tensor.src_start + lo - tensor.dst_start))
    assert position == manifest.num_bytes, "manifest tensors must end at num_bytes"
    return segments


def file_segments(path: Path, start: int, end: int) -> list[Segment]:
    """Bytes [start, end) of a whole file."""
    return [Segment(end - start, path=path, offset=start)] if end > start else []


def split_segments(segments: list[Segment], max_bytes: int) -> list[Segment]:
    """The same bytes in segments of at most `max_bytes` (the unit of reading and pacing)."""
    pieces: list[Segment] = []
    for segment in segments:
        for offset in range(0, segment.length, max_bytes):
            length = min(max_bytes, segment.length - offset)
            if segment.path is None:
                pieces.append(Segment(length, data=segment.data[offset:offset + length]))
            else:
                pieces.append(Segment(length, path=segment.path, offset=segment.offset + offset))
    return pieces
