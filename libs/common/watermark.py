"""The "bytes received" watermark of a partition file being filled in shared memory.

A 24-byte side file next to the partition: three little-endian uint64 — bytes received (a
contiguous prefix of the file), total bytes, and the state (filling / complete / failed). The
node agent is the only writer; workers poll it. An aligned 8-byte store through a shared
mapping is seen whole by readers, so no lock is needed.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from enum import IntEnum
from pathlib import Path

_LAYOUT = struct.Struct("<QQQ")


class FillState(IntEnum):
    FILLING = 0
    COMPLETE = 1
    FAILED = 2


class PartitionFailedError(RuntimeError):
    """The node agent gave up filling a partition (its error went out as an event)."""


def watermark_path(partition_path: str | Path) -> Path:
    return Path(f"{partition_path}.wm")


def partition_model_dir(partition_path: str | Path) -> Path:
    """The folder next to a partition with the model's config, tokenizer and the
    partition's manifest.json (`<stem>-model`)."""
    path = Path(partition_path)
    return path.with_name(f"{path.stem}-model")


class SharedWatermark:
    def __init__(self, path: str | Path, *, writable: bool) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, _LAYOUT.size, access=access)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, path: str | Path, total_bytes: int) -> SharedWatermark:
        """Writer side: a new watermark at 0 of `total_bytes`."""
        tmp = Path(f"{path}.tmp")
        tmp.write_bytes(_LAYOUT.pack(0, total_bytes, FillState.FILLING))
        os.replace(tmp, path)  # readers never see a half-written side file
        return cls(path, writable=True)

    @classmethod
    def open(cls, path: str | Path, timeout: float = 60.0) -> SharedWatermark:
        """Reader side: wait for the side file to appear, then map it."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while not Path(path).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"watermark {path} did not appear within {timeout:.1f}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return cls(path, writable=False)

    def read(self) -> tuple[int, int, FillState]:
        received, total, state = _LAYOUT.unpack(self._map[: _LAYOUT.size])
        return received, total, FillState(state)

    @property
    def received(self) -> int:
        return self.read()[0]

    def advance(self, received: int) -> None:
        self._map[:8] = struct.pack("<Q", received)

    def finish(self) -> None:
        _, total, _ = self.read()
        self._map[:8] = struct.pack("<Q", total)
        self._map[16:24] = struct.pack("<Q", FillState.COMPLETE)

    def fail(self) -> None:
        self._map[16:24] = struct.pack("<Q", FillState.FAILED)

    def wait_for(self, offset: int, timeout: float) -> None:
        """Block until `offset` bytes have arrived; poll with a short backoff."""
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            received, total, state = self.read()
            if received >= offset:
                return
            if state is FillState.FAILED:
                raise PartitionFailedError(f"filling {self.path} failed at {received}/{total}")
            if offset > total:
                raise ValueError(f"offset {offset} is past the end ({total}) of {self.path}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.path}: {received}/{total} bytes after {timeout:.1f}s, "
                    f"waiting for {offset}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def close(self) -> None:
        self._map.close()
