"""The node's host-memory model cache: recent partitions kept after their workers stop.

A partition fetched over the NIC is hard-linked into `<work_dir>/cache/` (no copy: the same
pages in shared memory), with its model folder (config, tokenizer, manifest). When a worker
of the same model, pipeline degree and stage is placed here again, its partition is linked
from the cache and its watermark written complete at once: the worker loads at memory speed
and the NIC is not used. Entries are evicted least recently used first when the cache's byte
budget is exceeded. Any policy benefits; the node's heartbeat lists the cached partitions so
the scheduler can prefer this node (`NodeInfo.cached`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from libs.common.subjects import encode_token
from libs.common.watermark import SharedWatermark, partition_model_dir, watermark_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheKey:
    # the model's public name (what the scheduler calls it) and its name in the store
    model: str
    storage_model: str
    degree: int
    stage: int

    @property
    def label(self) -> str:
        """How heartbeats name it: `<model>/<degree>/<stage>`."""
        return f"{self.model}/{self.degree}/{self.stage}"


@dataclass(frozen=True)
class CacheEntry:
    key: CacheKey
    path: Path
    num_bytes: int


class HostCache:
    def __init__(self, root: Path, *, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self._entries: OrderedDict[CacheKey, CacheEntry] = OrderedDict()
        self.num_hits = 0
        self.num_misses = 0
        shutil.rmtree(root, ignore_errors=True)  # pages of an earlier run are not trusted

    @property
    def num_bytes(self) -> int:
        return sum(e.num_bytes for e in self._entries.values())

    @property
    def labels(self) -> list[str]:
        return sorted(key.label for key in self._entries)

    def add(self, key: CacheKey, partition: Path) -> bool:
        """Keep a complete partition (and its model folder); False if it cannot fit."""
        num_bytes = partition.stat().st_size
        if self.max_bytes == 0 or num_bytes > self.max_bytes:
            return False
        self._drop(key)
        while self._entries and self.num_bytes + num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(partition, path)
        shutil.copytree(partition_model_dir(partition), partition_model_dir(path),
                        ignore=shutil.ignore_patterns("model.safetensors", ".*"))
        self._entries[key] = CacheEntry(key, path, num_bytes)
        logger.info("cached %s (%d bytes; cache holds %d of %d)", key.label, num_bytes,
                    self.num_bytes, self.max_bytes)
        return True

    def restore(self, key: CacheKey, dest: Path) -> CacheEntry | None:
        """Put a cached partition at `dest` as if it had just been fetched: the file (a link),
        its model folder and a complete watermark. None (a miss) if it is not cached."""
        entry = self._entries.get(key)
        if entry is None:
            self.num_misses += 1
            return None
        self._entries.move_to_end(key)
        self.num_hits += 1
        dest.unlink(missing_ok=True)
        os.link(entry.path, dest)
        model_dir = partition_model_dir(dest)
        shutil.copytree(partition_model_dir(entry.path), model_dir, dirs_exist_ok=True)
        link = model_dir / "model.safetensors"
        link.unlink(missing_ok=True)
        link.symlink_to(dest.resolve())
        watermark = SharedWatermark.create(watermark_path(dest), entry.num_bytes)
        try:
            watermark.finish()
        finally:
            watermark.close()
        return entry

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.path.unlink(missing_ok=True)
            shutil.rmtree(partition_model_dir(entry.path), ignore_errors=True)

    def _path(self, key: CacheKey) -> Path:
        return (self.root / encode_token(key.model) / encode_token(key.storage_model)
                / f"d{key.degree}s{key.stage}.safetensors")
