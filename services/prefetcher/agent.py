"""The node agent's logic: place and stop workers on this node. No transport here.

Placing a worker starts two things at once, the overlap a cold start lives on: the partition
fetch into shared memory and the worker process, which maps the partition behind its
watermark and loads each tensor as it lands. Commands are idempotent: a worker id is placed
once, and stopping an unknown (or already stopped) worker only reports it stopped again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from opentelemetry.context import Context

from libs.common.errors import HydraError
from libs.common.messages import (
    ConsolidateCommand,
    EventKind,
    PlaceWorkerCommand,
    StopWorkerCommand,
    consolidation_partition,
)
from libs.common.watermark import partition_model_dir, watermark_path
from services.prefetcher.cache import CacheKey, HostCache
from services.prefetcher.fetch import FetchResult, default_model_dir
from services.prefetcher.launcher import Launcher, WorkerHandle, WorkerSpec
from services.prefetcher.observe import (
    fetch_span,
    launch_span,
    record_cache_lookup,
    record_fetch,
    record_fetch_failed,
    record_workers,
)
from services.storage.throttle import TokenBucket

logger = logging.getLogger(__name__)

# fetch.progress events per fetch (at most one each time another share of the bytes is in)
PROGRESS_STEPS = 4


class Reporter(Protocol):
    async def __call__(self, kind: str, *, model: str | None = None,
                       worker_id: str | None = None, **data: Any) -> None: ...


# (base_url, model, degree, stage, dest, nic, on_progress) -> FetchResult; fetch_partition
FetchFn = Callable[..., Awaitable[FetchResult]]


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    storage_url: str
    nats_url: str
    # where partitions go: a folder in /dev/shm on a real node
    work_dir: Path
    stop_timeout_s: float = 30.0
    num_streams: int = 4
    # extra worker flags (e.g. ["--capacity", "4"])
    worker_args: tuple[str, ...] = ()
    # host-memory model cache budget (0: no cache)
    cache_bytes: int = 0


@dataclass
class _Worker:
    command: PlaceWorkerCommand
    partition: Path
    model_dir: Path
    # the placing decision's trace context (the command's `traceparent`): the parent of
    # this worker's fetch and launch spans
    trace_context: Context | None = None
    # done with True once every byte is in
    fetch: asyncio.Task[bool] | None = None
    # consolidation: the other stages' partitions, fetched next to this worker's own
    extra_partitions: list[Path] = field(default_factory=list)
    consolidation: asyncio.Task[None] | None = None
    start: asyncio.Task[None] | None = None
    handle: WorkerHandle | None = None
    monitor: asyncio.Task[None] | None = None
    is_stopping: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def state(self) -> str:
        """For the metrics: fetching (not launched yet), running or stopping."""
        if self.is_stopping:
            return "stopping"
        return "running" if self.handle is not None else "fetching"


class NodeAgent:
    def __init__(self, config: AgentConfig, *, launcher: Launcher, fetch: FetchFn,
                 report: Reporter, nic: TokenBucket | None = None) -> None:
        self.config = config
        self._launcher = launcher
        self._fetch = fetch
        self._report = report
        self._nic = nic
        self._workers: dict[str, _Worker] = {}
        self.cache = (HostCache(config.work_dir / "cache", max_bytes=config.cache_bytes)
                      if config.cache_bytes > 0 else None)
        # command ids ever applied here: a redelivered PlaceWorker after a stop does nothing.
        # (Not worker ids: a scheduler on a fresh database numbers its workers from 1 again.)
        self._placed: set[str] = set()

    @property
    def worker_ids(self) -> list[str]:
        return sorted(self._workers)

    async def place(self, command: PlaceWorkerCommand, *,
                    trace_context: Context | None = None) -> None:
        if command.command_id in self._placed or command.worker_id in self._workers:
            logger.info("worker %s already placed; command %s ignored", command.worker_id,
                        command.command_id)
            return
        self._placed.add(command.command_id)
        partition = self.config.work_dir / f"w{command.worker_id}.safetensors"
        worker = _Worker(command, partition, default_model_dir(partition), trace_context)
        self._workers[command.worker_id] = worker
        self._record_workers()
        await self._report(EventKind.FETCH_STARTED, model=command.model,
                           worker_id=command.worker_id, partition=str(partition),
                           degree=command.degree, stage=command.stage)
        worker.fetch = asyncio.create_task(self._run_fetch(worker))
        if command.overlap:
            await self._launch(worker)
        else:
            # `serverless_vllm`: the worker starts only once every byte is here
            worker.start = asyncio.create_task(self._launch_after_fetch(worker))

    async def _launch_after_fetch(self, worker: _Worker) -> None:
        assert worker.fetch is not None
        is_complete = await worker.fetch
        if worker.is_stopping:
            return
        if not is_complete:
            await self._finish(worker, exit_code=None, error="fetch did not complete")
            return
        await self._launch(worker)

    async def _launch(self, worker: _Worker) -> None:
        command = worker.command
        try:
            with launch_span(self.config.node_id, model=command.model,
                             worker_id=command.worker_id, context=worker.trace_context) as env:
                worker.handle = await self._launcher.launch(self._spec(worker, env=env))
        except OSError as exc:
            logger.error("launching worker %s failed: %r", command.worker_id, exc)
            await self._finish(worker, exit_code=None, error=repr(exc))
            return
        self._record_workers()
        await self._report(EventKind.WORKER_LAUNCHED, model=command.model,
                           worker_id=command.worker_id, pid=worker.handle.pid)
        worker.monitor = asyncio.create_task(self._watch(worker, worker.handle))

    async def consolidate(self, command: ConsolidateCommand, *,
                          trace_context: Context | None = None) -> None:
        """Fetch the stages the full-size worker lacks next to its partition, in layer order
        (it loads them as they arrive). Idempotent per worker."""
        worker = self._workers.get(command.worker_id)
        if worker is None or worker.is_stopping:
            logger.warning("consolidate %s: worker %s is not running here", command.command_id,
                           command.worker_id)
            return
        if worker.consolidation is not None:
            return
        worker.consolidation = asyncio.create_task(
            self._fetch_for_consolidation(worker, command, trace_context))
        worker.consolidation.add_done_callback(_log_failure)

    async def _fetch_for_consolidation(self, worker: _Worker, command: ConsolidateCommand,
                                       trace_context: Context | None) -> None:
        for stage in sorted(command.stages):
            dest = consolidation_partition(worker.partition, command.degree, stage)
            worker.extra_partitions.append(dest)
            await self._report(EventKind.FETCH_STARTED, model=command.model,
                               worker_id=command.worker_id, partition=str(dest),
                               degree=command.degree, stage=stage, consolidation=True)
            if not await self._fetch_stage(command, command.worker_id, command.degree, stage,
                                           dest, partition_model_dir(dest),
                                           trace_context=trace_context,
                                           event_data={"consolidation": True, "stage": stage}):
                return

    async def stop(self, command: StopWorkerCommand) -> None:
        worker = self._workers.get(command.worker_id)
        if worker is None:
            await self._report(EventKind.WORKER_STOPPED, worker_id=command.worker_id,
                               by="node_agent", exit_code=None, was_running=False)
            return
        if not worker.is_stopping:
            worker.is_stopping = True
            self._record_workers()
            for task in (worker.fetch, worker.consolidation):
                if task is not None:
                    task.cancel()
            if worker.handle is not None:
                await worker.handle.terminate(self.config.stop_timeout_s)
            elif worker.start is not None:
                # fetching before launch (`serverless_vllm`): nothing runs yet
                worker.start.cancel()
                await self._finish(worker, exit_code=None)
        await worker.stopped.wait()

    async def stop_all(self) -> None:
        for worker_id in self.worker_ids:
            await self.stop(StopWorkerCommand(worker_id=worker_id, node_id=self.config.node_id))

    def _spec(self, worker: _Worker, *, env: dict[str, str]) -> WorkerSpec:
        command = worker.command
        argv = [sys.executable, "-m", "services.worker", "--model", command.model,
                "--model-dir", str(worker.model_dir), "--partition", str(worker.partition),
                "--nats", self.config.nats_url, "--worker-id", command.worker_id,
                "--node-id", self.config.node_id, "--endpoint-id", command.endpoint_id,
                "--degree", str(command.degree), "--stage", str(command.stage),
                *self.config.worker_args]
        log_path = self.config.work_dir / "logs" / f"worker-{command.worker_id}.log"
        return WorkerSpec(worker_id=command.worker_id, argv=argv, log_path=log_path, env=env)

    async def _run_fetch(self, worker: _Worker) -> bool:
        command = worker.command
        next_step = [1]

        def on_progress(received: int, total: int) -> None:
            if total and received * PROGRESS_STEPS >= next_step[0] * total:
                next_step[0] = received * PROGRESS_STEPS // total + 1
                asyncio.get_running_loop().create_task(self._report(
                    EventKind.FETCH_PROGRESS, model=command.model, worker_id=command.worker_id,
                    received_bytes=received, total_bytes=total))

        return await self._fetch_stage(command, command.worker_id, command.degree,
                                       command.stage, worker.partition, worker.model_dir,
                                       trace_context=worker.trace_context,
                                       on_progress=on_progress)

    async def _fetch_stage(self, command: PlaceWorkerCommand | ConsolidateCommand,
                           worker_id: str, degree: int, stage: int, dest: Path,
                           model_dir: Path, *, trace_context: Context | None,
                           on_progress: Callable[[int, int], None] | None = None,
                           event_data: dict[str, Any] | None = None) -> bool:
        """One partition into `dest`: from the host cache if it holds it, else over the NIC
        (then kept in the cache); reported as fetch.done / fetch.failed with `event_data`,
        traced as a `prefetcher.fetch` child of `trace_context`."""
        data = event_data or {}
        started = time.monotonic()
        started_at = time.time()
        key = _cache_key(command, degree, stage)
        with fetch_span(self.config.node_id, model=command.model, worker_id=worker_id,
                        degree=degree, stage=stage, context=trace_context):
            if await self._restore_cached(key, dest, worker_id, started, **data):
                return True
            try:
                result = await self._fetch(
                    command.storage_url or self.config.storage_url,
                    command.storage_model or command.model, degree, stage, dest,
                    num_streams=self.config.num_streams, nic=self._nic,
                    on_progress=on_progress, model_dir=model_dir)
            except HydraError as exc:
                record_fetch_failed(exc.message)
                await self._report(EventKind.FETCH_FAILED, model=command.model,
                                   worker_id=worker_id, error=exc.message, **data)
                return False
            record_fetch(self.config.node_id, num_bytes=result.num_bytes,
                         started_at=started_at, bytes_per_s=result.bytes_per_s,
                         is_cached=False)
        await self._report(EventKind.FETCH_DONE, model=command.model, worker_id=worker_id,
                           num_bytes=result.num_bytes,
                           fetch_s=round(time.monotonic() - started, 6),
                           bytes_per_s=round(result.bytes_per_s), cached=False, **data)
        self._keep(key, dest)
        return True

    async def _restore_cached(self, key: CacheKey, dest: Path, worker_id: str,
                              started: float, **data: Any) -> bool:
        """A cache hit: the partition is in place, complete; reported as fetched."""
        if self.cache is None:
            return False
        started_at = time.time()
        entry = await asyncio.to_thread(self.cache.restore, key, dest)
        record_cache_lookup(self.config.node_id, is_hit=entry is not None)
        if entry is None:
            return False
        record_fetch(self.config.node_id, num_bytes=entry.num_bytes, started_at=started_at,
                     bytes_per_s=None, is_cached=True)
        await self._report(EventKind.FETCH_DONE, model=key.model, worker_id=worker_id,
                           num_bytes=entry.num_bytes,
                           fetch_s=round(time.monotonic() - started, 6), cached=True,
                           **data)
        return True

    def _keep(self, key: CacheKey, partition: Path) -> None:
        if self.cache is not None:
            try:
                self.cache.add(key, partition)
            except OSError as exc:  # a cache that cannot take it only costs a later fetch
                logger.warning("caching %s failed: %r", key.label, exc)

    async def _watch(self, worker: _Worker, handle: WorkerHandle) -> None:
        exit_code = await handle.wait()
        await self._finish(worker, exit_code=exit_code)

    async def _finish(self, worker: _Worker, *, exit_code: int | None,
                      error: str | None = None) -> None:
        """The process is gone: cancel the fetch, free the shared memory, report it."""
        for task in (worker.fetch, worker.consolidation):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        _remove_files(worker)
        self._workers.pop(worker.command.worker_id, None)
        self._record_workers()
        await self._report(EventKind.WORKER_STOPPED, model=worker.command.model,
                           worker_id=worker.command.worker_id, by="node_agent",
                           exit_code=exit_code, was_running=True, asked=worker.is_stopping,
                           error=error)
        worker.stopped.set()


    def _record_workers(self) -> None:
        record_workers(self.config.node_id, (w.state for w in self._workers.values()))


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.error("a consolidation fetch failed", exc_info=exc)


def _cache_key(command: PlaceWorkerCommand | ConsolidateCommand, degree: int,
               stage: int) -> CacheKey:
    return CacheKey(model=command.model, storage_model=command.storage_model or command.model,
                    degree=degree, stage=stage)


def _remove_files(worker: _Worker) -> None:
    for partition in (worker.partition, *worker.extra_partitions):
        for path in (partition, watermark_path(partition)):
            path.unlink(missing_ok=True)
        shutil.rmtree(partition_model_dir(partition), ignore_errors=True)
    shutil.rmtree(worker.model_dir, ignore_errors=True)
