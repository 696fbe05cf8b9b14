"""The node agent's fetcher: pull one partition from storage into a (shared-memory) file.

Order of appearance, which the worker relies on:
1. the partition file at its final size, then its watermark side file (`<file>.wm`) at 0;
2. the model folder next to it (config.json, tokenizer files, manifest.json), each file
   written atomically; so once the watermark is past 0, the folder is complete;
3. the header (taken from the manifest, so it is there at once), then the tensor data from
   `num_streams` concurrent range requests, the watermark following the contiguous prefix;
4. `finish()` on the watermark, then `model.safetensors` in the model folder, linking to the
   partition, so the folder is an ordinary loadable stage checkpoint from then on.
Any error after step 1 marks the watermark failed (a waiting worker stops with
PartitionFailedError) and raises a named error; if the manifest itself cannot be had, nothing
is created and FetchFailedError (or NotFoundError) is raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from libs.common.errors import FetchFailedError, HydraError, NotFoundError
from libs.common.tracing import inject_headers
from libs.common.watermark import partition_model_dir
from services.prefetcher.shm import PartitionWriter
from services.storage.schemas import ErrorResponse, Manifest, ModelInfo
from services.storage.throttle import TokenBucket

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES = 256 << 10
# bytes handed from the socket to the NIC bucket and the partition file at a time. httpx
# reads 64 KB; every piece costs a bucket turn (often a sleep), a pwrite and a watermark
# update, so at 64 KB a node agent spent ~15 ms of CPU per MB received (1.1 s of CPU for a
# 75 MB partition at 13.8 MB/s), and on the emulated cluster that CPU comes out of the
# pipeline stages' cores; at 1 MB it spends half (0.6 s). A range's last piece is handed on
# when the range ends, so the watermark reaches the end as soon as the bytes do.
RECEIVE_PIECE_BYTES = 1 << 20
# what a worker reads from its model folder besides the weights (those that exist are fetched)
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer_config.json",
               "tokenizer.json", "chat_template.jinja")
MAX_ATTEMPTS = 3
RETRY_DELAY_S = 0.05

# (bytes received contiguously, total bytes); called on the event loop, so keep it cheap
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class FetchResult:
    path: Path
    watermark_path: Path
    # config, tokenizer and manifest.json (and model.safetensors -> path once complete)
    model_dir: Path
    manifest: Manifest
    num_bytes: int
    seconds: float
    num_streams: int

    @property
    def bytes_per_s(self) -> float:
        return self.num_bytes / self.seconds if self.seconds > 0 else float("inf")


def default_model_dir(dest_path: Path) -> Path:
    return partition_model_dir(dest_path)


async def fetch_partition(
    base_url: str, model: str, degree: int, stage: int, dest_path: str | Path, *,
    num_streams: int = 4, bandwidth_cap_bytes_per_s: float | None = None,
    on_progress: ProgressCallback | None = None, nic: TokenBucket | None = None,
    manifest: Manifest | None = None, model_dir: Path | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout_s: float = 30.0,
) -> FetchResult:
    """Fetch stage `stage` of pipeline degree `degree` of `model` into `dest_path`.

    `nic` is the node's shared ingress bucket (one per node, across concurrent fetches);
    `bandwidth_cap_bytes_per_s` makes a bucket for this fetch alone. A `manifest` already
    known (from the scheduler's database) saves one request.
    """
    if num_streams < 1:
        raise ValueError(f"num_streams must be >= 1, got {num_streams}")
    dest = Path(dest_path)
    model_dir = model_dir or default_model_dir(dest)
    if nic is None and bandwidth_cap_bytes_per_s is not None:
        nic = TokenBucket(bandwidth_cap_bytes_per_s)
    started = time.monotonic()
    limits = httpx.Limits(max_connections=num_streams + 1)
    # every request carries the current span (the node agent's `prefetcher.fetch`): the
    # store's spans join its trace
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits,
                                 headers=inject_headers()) as client:
        if manifest is None:
            try:
                manifest = Manifest.model_validate_json(await _get(
                    client, f"/models/{model}/partitions/{degree}/{stage}/manifest", None))
            except (httpx.HTTPError, ValueError) as exc:  # ValueError: not a manifest
                raise FetchFailedError(f"fetching the manifest of {model} stage "
                                       f"{stage}/{degree} from {base_url} failed: {exc!r}"
                                       ) from exc
        # a link left by an earlier fetch must not point a worker at a file being refilled
        (model_dir / "model.safetensors").unlink(missing_ok=True)
        writer = PartitionWriter(dest, manifest.num_bytes)
        try:
            await fetch_model_files(client, model, model_dir, nic=nic)
            (model_dir / "manifest.json").write_text(manifest.model_dump_json())
            await _fill(client, writer, manifest, num_streams=num_streams, nic=nic,
                        chunk_bytes=chunk_bytes, on_progress=on_progress)
            writer.finish()
        except asyncio.CancelledError:
            writer.fail()
            raise
        except (httpx.HTTPError, OSError, ValueError, HydraError) as exc:
            writer.fail()
            logger.warning("fetching %s into %s failed at %d/%d bytes: %r", model, dest,
                           writer.received, manifest.num_bytes, exc)
            if isinstance(exc, HydraError):
                raise
            raise FetchFailedError(f"fetching {model} stage {stage}/{degree} from "
                                   f"{base_url} failed: {exc!r}") from exc
        finally:
            writer.close()
    _replace_symlink(model_dir / "model.safetensors", dest.resolve())
    return FetchResult(dest, writer.watermark_path, model_dir, manifest, manifest.num_bytes,
                       time.monotonic() - started, num_streams)


async def fetch_model_files(client: httpx.AsyncClient, model: str, model_dir: Path, *,
                            nic: TokenBucket | None = None) -> list[Path]:
    """The small files of the model folder a worker needs, each written atomically."""
    info = ModelInfo.model_validate_json(await _get(client, f"/models/{model}", None))
    available = {f.path for f in info.files}
    model_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in MODEL_FILES:
        if name not in available:
            continue
        data = await _get(client, f"/models/{model}/files/{name}", nic)
        tmp = model_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, model_dir / name)
        written.append(model_dir / name)
    return written


async def _fill(client: httpx.AsyncClient, writer: PartitionWriter, manifest: Manifest, *,
                num_streams: int, nic: TokenBucket | None, chunk_bytes: int,
                on_progress: ProgressCallback | None) -> None:
    header = manifest.header
    writer.write(0, header)
    if on_progress is not None:
        on_progress(writer.received, manifest.num_bytes)
    url = f"/models/{manifest.model}/partitions/{manifest.degree}/{manifest.stage}/data"
    data_bytes = manifest.num_bytes - len(header)
    # small partitions still keep every stream busy; large ones move in bounded chunks
    size = min(chunk_bytes, max(MIN_CHUNK_BYTES, -(-data_bytes // num_streams)))
    # one iterator shared by the streams: each takes the next chunk in file order, so the
    # contiguous prefix (what a worker can load) grows steadily
    chunks = _chunks(len(header), manifest.num_bytes, size)

    async def run_stream() -> None:
        for start, end in chunks:
            await _fetch_range(client, url, start, end, writer, nic=nic,
                               on_progress=on_progress)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(num_streams):
                group.create_task(run_stream())
    except ExceptionGroup as errors:
        raise errors.exceptions[0] from None


async def _fetch_range(client: httpx.AsyncClient, url: str, start: int, end: int,
                       writer: PartitionWriter, *, nic: TokenBucket | None,
                       on_progress: ProgressCallback | None) -> None:
    """Bytes [start, end) of the partition; a dropped connection resumes where it stopped."""
    position, attempt = start, 1
    while position < end:
        try:
            headers = {"Range": f"bytes={position}-{end - 1}"}
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code != 206:
                    raise await _storage_error(response)
                async for data in response.aiter_raw(chunk_size=RECEIVE_PIECE_BYTES):
                    if position + len(data) > end:
                        raise FetchFailedError(f"{url}: more bytes than asked for "
                                               f"in range {start}-{end - 1}")
                    if nic is not None:
                        await nic.acquire(len(data))
                    if writer.write(position, data) and on_progress is not None:
                        on_progress(writer.received, writer.num_bytes)
                    position += len(data)
            if position < end:
                raise FetchFailedError(f"{url}: the response to {headers['Range']} ended at "
                                       f"{position}")
        except httpx.TransportError as exc:
            if attempt >= MAX_ATTEMPTS:
                raise
            logger.info("range %d-%d of %s: %r; retrying from %d", start, end - 1, url, exc,
                        position)
            await asyncio.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
            attempt += 1


async def _get(client: httpx.AsyncClient, url: str, nic: TokenBucket | None) -> bytes:
    """A whole small resource (manifest, description, config file), retried like ranges."""
    attempt = 1
    while True:
        try:
            response = await client.get(url)
            break
        except httpx.TransportError as exc:
            if attempt >= MAX_ATTEMPTS:
                raise
            logger.info("GET %s: %r; retrying", url, exc)
            await asyncio.sleep(RETRY_DELAY_S * 2 ** (attempt - 1))
            attempt += 1
    if response.status_code != 200:
        raise await _storage_error(response)
    if nic is not None:
        await nic.acquire(len(response.content))
    return response.content


async def _storage_error(response: httpx.Response) -> HydraError:
    """The named error for a storage error response."""
    body = await response.aread()
    try:
        error = ErrorResponse.model_validate_json(body).error
        detail = f"{error.code}: {error.message}"
    except ValueError:
        detail = body[:200].decode(errors="replace")
    message = f"storage answered {response.status_code} to {response.request.url}: {detail}"
    if response.status_code == 404:
        return NotFoundError(message)
    return FetchFailedError(message)


def _chunks(start: int, end: int, size: int) -> Iterator[tuple[int, int]]:
    for offset in range(start, end, size):
        yield offset, min(offset + size, end)


def _replace_symlink(link: Path, target: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
