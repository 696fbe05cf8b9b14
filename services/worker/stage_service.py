"""A pipeline stage after the first, as a process: load the stage, serve activations.

Such a worker takes no requests from the queue: stage 0 drives the pipeline and streams the
tokens. This one loads its layers behind the partition's watermark (alongside the NATS
set-up), subscribes to its data-plane inbox, reports ready, and runs frames until it is
released (SIGTERM from its node agent once the full-size worker has consolidated, or when
the endpoint scales to zero).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from nats.errors import Error as NatsError

from libs.common.bus import EventPublisher, connect, ensure_streams
from libs.common.messages import EventKind
from services.worker.config import WorkerConfig
from services.worker.keep_awake import KeepAwake
from services.worker.observe import record_startup
from services.worker.partition import load_worker_stage
from services.worker.pipeline.channel import PipeChannel

logger = logging.getLogger(__name__)


class StageService:
    def __init__(self, config: WorkerConfig) -> None:
        if config.stage < 1 or config.endpoint_id is None or config.partition is None:
            raise ValueError("a stage service serves stage >= 1 of an endpoint's partition")
        self.config = config

    async def run(self, stop: asyncio.Event) -> int:
        from services.worker.pipeline.stage import StageServer

        config = self.config
        assert config.partition is not None and config.endpoint_id is not None
        started = time.monotonic()
        loading = asyncio.create_task(asyncio.to_thread(load_worker_stage, config,
                                                        config.partition))
        nc = await connect(config.nats, name=f"worker-{config.worker_id}")
        events = EventPublisher(nc, model=config.model, worker_id=config.worker_id,
                                node_id=config.node_id, endpoint_id=config.endpoint_id)
        loop = asyncio.get_running_loop()
        channel = PipeChannel(nc, config.endpoint_id, direct=config.worker.data_plane == "tcp",
                              advertise_host=config.worker.data_plane_host)
        server: StageServer | None = None
        keep_awake = KeepAwake() if config.worker.keep_awake else None
        spinners = 0
        exit_code = 0
        try:
            await ensure_streams(nc.jetstream(), config.bus)
            await events.publish(EventKind.WORKER_STARTED, pid=os.getpid(), stage=config.stage,
                                 degree=config.degree, phases=dict(config.phases))
            try:
                runner = await loading
            except Exception as exc:
                await _publish(events, EventKind.WORKER_STOPPED, exit_code=1, error=repr(exc))
                raise

            def on_event(kind: str, data: dict[str, Any]) -> None:
                loop.call_soon_threadsafe(
                    lambda: loop.create_task(_publish(events, kind, **data)))

            server = StageServer(runner, stage=config.stage, send=channel.send_threadsafe,
                                 on_event=on_event,
                                 on_frame=keep_awake.poke if keep_awake else None)
            server.start()
            await channel.start(config.stage, server.inbox.put,
                                on_direct_frame=server.handle_now)
            config.phases["ready_at"] = time.time()
            load_s = round(time.monotonic() - started, 6)
            record_startup(config.phases, load_s=load_s)
            await events.publish(EventKind.WORKER_READY, load_s=load_s, stage=config.stage,
                                 degree=config.degree, start_layer=runner.stage.start_layer,
                                 end_layer=runner.stage.end_layer, phases=dict(config.phases))
            logger.info("stage %d of endpoint %s ready: layers [%d, %d)", config.stage,
                        config.endpoint_id, runner.stage.start_layer, runner.stage.end_layer)
            if keep_awake is not None:  # after ready: not on the cold start's path
                keep_awake.start()
            await stop.wait()
        finally:
            if not loading.done():
                loading.cancel()
            if keep_awake is not None:
                spinners = keep_awake.num_spinners
                await asyncio.to_thread(keep_awake.stop)
            if server is not None:
                await asyncio.to_thread(server.stop, 10.0)
                exit_code = 1 if server.error is not None else 0
            await channel.close()
            await _publish(events, EventKind.WORKER_STOPPED, exit_code=exit_code,
                           num_steps=server.num_steps if server else 0,
                           compute_s=round(server.compute_s, 6) if server else 0.0,
                           frame_s=round(server.frame_s, 6) if server else 0.0,
                           keep_awake_cpus=spinners)
            with contextlib.suppress(NatsError):
                await nc.drain()
        return exit_code


async def _publish(events: EventPublisher, kind: str, **data: Any) -> None:
    try:
        await events.publish(kind, **data)
    except NatsError as exc:  # events are the debugging record, never worth the stage
        logger.warning("event %s not published: %s", kind, exc)
