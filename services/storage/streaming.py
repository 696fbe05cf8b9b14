"""Read segments of source files as an async stream of bytes, paced by an egress bucket."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio.to_thread

from services.storage.ranges import Segment, split_segments
from services.storage.throttle import TokenBucket

# Unpaced reads go in pieces this size: large enough that per-piece overhead is small.
READ_PIECE_BYTES = 1 << 20


class SegmentReader:
    """Reads segments with `pread`, keeping each source file open for the whole response."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def read(self, segment: Segment) -> bytes:
        if segment.path is None:
            return segment.data
        fd = self._fds.get(segment.path)
        if fd is None:
            fd = self._fds[segment.path] = os.open(segment.path, os.O_RDONLY)
        data = os.pread(fd, segment.length, segment.offset)
        if len(data) != segment.length:
            raise OSError(f"{segment.path} is shorter than the manifest says: "
                          f"{len(data)} of {segment.length} bytes at {segment.offset}")
        return data

    def read_all(self, segments: list[Segment]) -> bytes:
        return b"".join(self.read(s) for s in segments)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


async def stream_segments(segments: list[Segment], *, egress: TokenBucket | None = None
                          ) -> AsyncIterator[bytes]:
    """The segments' bytes in pieces; with `egress`, each piece waits for its tokens."""
    piece_bytes = egress.piece_bytes if egress is not None else READ_PIECE_BYTES
    reader = SegmentReader()
    try:
        for piece in split_segments(segments, piece_bytes):
            if egress is not None:
                await egress.acquire(piece.length)
            # page-cache reads are fast, but a cold disk read must not stall the event loop
            yield await anyio.to_thread.run_sync(reader.read, piece)
    finally:
        reader.close()
