"""The node's host-memory cache: partitions kept by hard link, restored complete, LRU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libs.common.watermark import FillState, SharedWatermark, partition_model_dir, watermark_path
from services.prefetcher.cache import CacheKey, HostCache

pytestmark = pytest.mark.unit


def fetched(work: Path, name: str, num_bytes: int) -> Path:
    """A partition as a finished fetch leaves it: the file and its model folder."""
    path = work / f"{name}.safetensors"
    path.write_bytes(os.urandom(num_bytes))
    model_dir = partition_model_dir(path)
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "manifest.json").write_text('{"start_layer": 0, "end_layer": 4}')
    (model_dir / "model.safetensors").symlink_to(path)
    return path


def key(stage: int, model: str = "m") -> CacheKey:
    return CacheKey(model=model, storage_model=model, degree=2, stage=stage)


def test_a_cached_partition_comes_back_complete_without_a_copy(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", max_bytes=10_000)
    partition = fetched(tmp_path, "w1", 4_000)
    assert cache.add(key(0), partition)
    content = partition.read_bytes()
    partition.unlink()  # the worker stopped: its files go, the cached pages stay

    dest = tmp_path / "w2.safetensors"
    entry = cache.restore(key(0), dest)

    assert entry is not None and entry.num_bytes == 4_000
    assert dest.read_bytes() == content
    assert dest.stat().st_ino == entry.path.stat().st_ino
    watermark = SharedWatermark.open(watermark_path(dest), timeout=1)
    assert watermark.read() == (4_000, 4_000, FillState.COMPLETE)
    watermark.close()
    model_dir = partition_model_dir(dest)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "manifest.json",
                                                          "model.safetensors"]
    assert (model_dir / "model.safetensors").resolve() == dest.resolve()
    assert (cache.num_hits, cache.num_misses) == (1, 0)
    assert cache.labels == ["m/2/0"]


def test_the_least_recently_used_partition_goes_first(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", max_bytes=10_000)
    for stage in (0, 1):
        assert cache.add(key(stage), fetched(tmp_path, f"s{stage}", 4_000))
    assert cache.restore(key(0), tmp_path / "again.safetensors") is not None

    assert cache.add(key(0, model="other"), fetched(tmp_path, "other", 4_000))

    assert cache.labels == ["m/2/0", "other/2/0"]
    assert cache.num_bytes == 8_000
    assert cache.restore(key(1), tmp_path / "gone.safetensors") is None
    assert not (tmp_path / "gone.safetensors").exists()


def test_a_partition_larger_than_the_cache_is_not_kept(tmp_path: Path) -> None:
    cache = HostCache(tmp_path / "cache", max_bytes=1_000)

    assert not cache.add(key(0), fetched(tmp_path, "big", 4_000))
    assert cache.labels == []
