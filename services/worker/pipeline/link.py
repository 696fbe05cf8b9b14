"""The stage-0 worker's side of the control plane: pipeline-ready and consolidation.

The scheduler's decisions reach the worker as events on the bus it subscribes to:
`endpoint.pipeline_ready` (every stage is up: connect the ring, start serving) and
`endpoint.consolidate` (the node agent is fetching the other stages' partitions next to ours:
load them as they arrive, take over the KV cache, serve alone). The worker answers with
`kv.handover`, `kv.migrated` and `worker.consolidated` (or `worker.consolidation_failed`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from pydantic import ValidationError

from libs.common.messages import (
    ConsolidateCommand,
    Event,
    EventKind,
    consolidation_partition,
)
from libs.common.subjects import event_subject
from services.worker.config import WorkerConfig
from services.worker.engine_loop import EngineLoop
from services.worker.keep_awake import KeepAwake
from services.worker.pipeline.channel import PipeChannel

if TYPE_CHECKING:
    from services.worker.pipeline.driver import PipelineDriver

logger = logging.getLogger(__name__)

# (kind, data) -> published
Publish = Callable[..., Awaitable[None]]
CONNECT_TIMEOUT_S = 60.0


class PipelineLink:
    def __init__(self, nc: NATS, config: WorkerConfig, driver: PipelineDriver, *,
                 publish: Publish) -> None:
        assert config.endpoint_id is not None and config.partition is not None
        self._nc = nc
        self.config = config
        self.driver = driver
        self._publish = publish
        self.channel = PipeChannel(nc, config.endpoint_id,
                                   direct=config.worker.data_plane == "tcp",
                                   advertise_host=config.worker.data_plane_host)
        self.ready = asyncio.Event()
        self._connected = asyncio.Event()
        self._engine_loop: EngineLoop | None = None
        self._consolidation: asyncio.Task[None] | None = None
        self.keep_awake = KeepAwake() if config.worker.keep_awake else None
        self._keep_awake_started: asyncio.Future[None] | None = None
        if self.keep_awake is not None:
            driver.on_launch = self.keep_awake.poke

    async def start(self) -> None:
        """Open the data plane and listen for the control events (before reporting ready)."""
        await self.channel.start(0, self.driver.inbox.put)
        for kind in (EventKind.ENDPOINT_PIPELINE_READY, EventKind.ENDPOINT_CONSOLIDATE):
            await self._nc.subscribe(event_subject(kind, self.config.model), cb=self._on_event)
        await self._nc.flush()

    async def connect(self) -> None:
        """After `ready`: check every stage answers, and size the batch to the smallest."""
        infos = await asyncio.to_thread(self.driver.connect, CONNECT_TIMEOUT_S)
        logger.info("pipeline of endpoint %s connected: %s", self.config.endpoint_id,
                    {stage: (p.num_slots, p.max_model_len) for stage, p in infos.items()})

    def serving(self, engine_loop: EngineLoop) -> None:
        """The engine loop runs the driver now: consolidation may go ahead."""
        self._engine_loop = engine_loop
        self._connected.set()
        if self.keep_awake is not None:  # in a thread: the first request need not wait
            self._keep_awake_started = asyncio.ensure_future(
                asyncio.to_thread(self.keep_awake.start))

    async def close(self) -> None:
        if self._consolidation is not None and not self._consolidation.done():
            self._consolidation.cancel()
        await self._stop_keeping_awake()
        await self.channel.close()

    async def _stop_keeping_awake(self) -> int:
        """Stop the spinners; how many there were."""
        if self._keep_awake_started is not None:
            try:
                await self._keep_awake_started
            except OSError as exc:
                logger.warning("keep-awake spinners did not start: %r", exc)
        if self.keep_awake is None or not self.keep_awake.num_spinners:
            return 0
        spinners = self.keep_awake.num_spinners
        await asyncio.to_thread(self.keep_awake.stop)
        return spinners

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = Event.model_validate_json(msg.data)
        except ValidationError:
            return
        if event.endpoint_id != self.config.endpoint_id:
            return
        if event.kind == EventKind.ENDPOINT_PIPELINE_READY:
            self.ready.set()
        elif event.kind == EventKind.ENDPOINT_CONSOLIDATE and self._consolidation is None:
            try:
                command = ConsolidateCommand.model_validate(event.data)
            except ValidationError as exc:
                logger.error("malformed consolidate event: %s", exc)
                return
            if command.worker_id == self.config.worker_id:
                self._consolidation = asyncio.create_task(self._consolidate(command))

    async def _consolidate(self, command: ConsolidateCommand) -> None:
        from services.worker.partition import load_stage_runner

        assert self.config.partition is not None
        started = time.monotonic()
        paths = [consolidation_partition(self.config.partition, command.degree, stage)
                 for stage in command.stages]
        try:
            await self._connected.wait()
            engine = self.driver.engine
            base = engine.runners[0].config
            runners = []
            for path in paths:  # in layer order; each loads as its bytes arrive
                runners.append(await asyncio.to_thread(load_stage_runner, path, base,
                                                       engine.model_config))
            # the layers load packed as their bytes land (partition.packing_mode), or pack
            # now if they came whole; either way switch only once every stage's weights are
            # packed and its one-row kernel chosen, so the whole model runs at full speed
            for runner in [*engine.runners, *runners]:
                await asyncio.to_thread(runner.pack_weights)
            load_s = time.monotonic() - started
            assert self._engine_loop is not None
            await self._publish(EventKind.KV_HANDOVER, stages=command.stages,
                                num_running=engine.num_running, load_s=round(load_s, 6))
            handover = await asyncio.wrap_future(
                self._engine_loop.call(lambda: self.driver.start_handover(runners)))
            stats = await asyncio.wrap_future(handover)
        except Exception as exc:
            logger.exception("consolidation of endpoint %s failed", self.config.endpoint_id)
            await self._publish(EventKind.CONSOLIDATION_FAILED, error=repr(exc))
            return
        spinners = await self._stop_keeping_awake()  # one worker now: no waits between steps
        await self._publish(EventKind.KV_MIGRATED, num_seqs=stats.num_seqs,
                            num_bytes=stats.num_bytes, pause_s=round(stats.pause_s, 6))
        await self._publish(EventKind.WORKER_CONSOLIDATED, start_layer=0,
                            end_layer=engine.model_config.num_layers,
                            consolidation_s=round(time.monotonic() - started, 6),
                            partial_worker_ids=command.partial_worker_ids,
                            keep_awake_cpus=spinners)
        logger.info("worker %s consolidated endpoint %s in %.2fs (%d sequences moved)",
                    self.config.worker_id, self.config.endpoint_id,
                    time.monotonic() - started, stats.num_seqs)
