"""A partition file being filled in shared memory, with its "bytes received" watermark.

The file is created at its final size before the watermark side file appears, so a worker
that sees the watermark can map the whole file at once. Bytes land out of order (several
streams); the watermark only ever advances to the end of the contiguous prefix received.
"""

from __future__ import annotations

import os
from pathlib import Path

from libs.common.watermark import SharedWatermark, watermark_path


class ContiguousPrefix:
    """Tracks received byte intervals; `end` is where the contiguous prefix from 0 stops."""

    def __init__(self, start: int = 0) -> None:
        self.end = start
        # start -> end of received intervals not yet joined to the prefix
        self._pending: dict[int, int] = {}

    def add(self, start: int, end: int) -> bool:
        """Record bytes [start, end); True if the prefix grew. Intervals must not overlap
        (each stream writes its own chunk in order)."""
        if start != self.end:
            assert start > self.end, f"bytes [{start}, {end}) were already received"
            # ahead of the prefix: kept until the prefix reaches `start`
            self._pending[start] = end
            return False
        self.end = end
        while self.end in self._pending:
            self.end = self._pending.pop(self.end)
        return True


class PartitionWriter:
    """The writer side: pwrite at offsets, advance the watermark along the prefix."""

    def __init__(self, path: str | Path, num_bytes: int) -> None:
        self.path = Path(path)
        self.num_bytes = num_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A new inode, renamed into place: a worker still mapping an earlier file of this
        # name keeps its pages (truncating that file in place would crash it with SIGBUS).
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, num_bytes)
        os.replace(tmp, self.path)
        self.watermark_path = watermark_path(self.path)
        self.watermark = SharedWatermark.create(self.watermark_path, num_bytes)
        self.prefix = ContiguousPrefix()

    @property
    def received(self) -> int:
        return self.prefix.end

    def write(self, offset: int, data: bytes | memoryview) -> bool:
        """Write bytes at `offset`; True if the watermark advanced."""
        written = 0
        while written < len(data):  # pwrite may write less than asked
            written += os.pwrite(self._fd, data[written:], offset + written)
        if not self.prefix.add(offset, offset + len(data)):
            return False
        self.watermark.advance(self.prefix.end)
        return True

    def finish(self) -> None:
        assert self.prefix.end == self.num_bytes, (
            f"{self.path}: finished with {self.prefix.end}/{self.num_bytes} bytes contiguous")
        self.watermark.finish()

    def fail(self) -> None:
        self.watermark.fail()

    def close(self) -> None:
        os.close(self._fd)
        self.watermark.close()
