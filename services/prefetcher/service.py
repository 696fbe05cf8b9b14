"""The node agent service: NATS wiring around `NodeAgent`.

Registers the node (a `node.registered` event, then `node.heartbeat` every few seconds),
pulls this node's commands from `HS_COMMANDS` through a durable consumer (`node-<id>`), hands
each to the agent (with the trace context of its `traceparent` header) and acks it once
handled; the agent's reports go out as events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from libs.common.bus import connect, ensure_streams, publish_event
from libs.common.messages import (
    ConsolidateCommand,
    Event,
    EventKind,
    NodeInfo,
    PlaceWorkerCommand,
    parse_node_command,
)
from libs.common.settings import BusSettings, NatsSettings
from libs.common.subjects import COMMANDS_STREAM, command_subject, encode_token
from libs.common.tracing import extract_context
from services.prefetcher.agent import AgentConfig, NodeAgent
from services.prefetcher.fetch import fetch_partition
from services.prefetcher.launcher import Launcher, LocalLauncher
from services.storage.throttle import TokenBucket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    agent: AgentConfig
    gpu_memory_bytes: int
    nic_bandwidth_bytes_per_s: int
    gpu_type: str = "cpu"
    heartbeat_interval_s: float = 2.0
    # a command not acked in this time (agent died mid-command) is redelivered
    command_ack_wait_s: float = 120.0


class NodeAgentService:
    def __init__(self, config: NodeConfig, *, nats: NatsSettings, bus: BusSettings,
                 launcher: Launcher | None = None) -> None:
        self.config = config
        self._nats = nats
        self._bus = bus
        self._launcher = launcher or LocalLauncher()
        self._nc: NATS | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> int:
        node_id = self.config.agent.node_id
        nc = self._nc = await connect(self._nats, name=f"node-agent-{node_id}")
        js = nc.jetstream()
        agent = NodeAgent(self.config.agent, launcher=self._launcher, fetch=fetch_partition,
                          report=self._report,
                          nic=TokenBucket(self.config.nic_bandwidth_bytes_per_s))
        try:
            await ensure_streams(js, self._bus)
            subscription = await self._subscribe(js)
            await self._report(EventKind.NODE_REGISTERED, **self._info(agent))
            heartbeat = asyncio.create_task(self._heartbeat_loop(agent))
            pulling = asyncio.create_task(self._pull_loop(subscription, agent))
            await stop.wait()
            pulling.cancel()
            heartbeat.cancel()
            await asyncio.gather(pulling, heartbeat, return_exceptions=True)
            await agent.stop_all()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            return 0
        finally:
            # not drain(): draining a pull subscription whose fetch was cancelled waits out
            # the whole drain timeout; flushing delivers the last events just as well
            with contextlib.suppress(NatsError):
                await nc.flush(timeout=5)
            await nc.close()

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        node_id = self.config.agent.node_id
        name = f"node-{encode_token(node_id)}"
        await js.add_consumer(COMMANDS_STREAM, ConsumerConfig(
            name=name, durable_name=name, filter_subject=command_subject("node", node_id),
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.config.command_ack_wait_s))
        return await js.pull_subscribe_bind(durable=name, stream=COMMANDS_STREAM)

    async def _pull_loop(self, subscription: JetStreamContext.PullSubscription,
                         agent: NodeAgent) -> None:
        while True:
            try:
                messages = await subscription.fetch(1, timeout=1.0)
            except NatsTimeoutError:
                continue
            for msg in messages:
                await self._handle(msg, agent)

    async def _handle(self, msg: Msg, agent: NodeAgent) -> None:
        try:
            command = parse_node_command(msg.data)
        except ValidationError as exc:
            logger.error("dropping a malformed command: %s", exc)
            await msg.term()
            return
        # the scheduler's decision, when a request's arrival led to this command
        trace_context = extract_context(msg.headers)
        if isinstance(command, PlaceWorkerCommand):
            await agent.place(command, trace_context=trace_context)
        elif isinstance(command, ConsolidateCommand):
            await agent.consolidate(command, trace_context=trace_context)
        else:
            # stopping waits for the worker to drain: not on the command loop
            self._spawn(agent.stop(command))
        await msg.ack()

    async def _heartbeat_loop(self, agent: NodeAgent) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval_s)
            await self._report(EventKind.NODE_HEARTBEAT, **self._info(agent))

    def _info(self, agent: NodeAgent) -> dict[str, Any]:
        return NodeInfo(node_id=self.config.agent.node_id, gpu_type=self.config.gpu_type,
                        gpu_memory_bytes=self.config.gpu_memory_bytes,
                        nic_bandwidth_bytes_per_s=self.config.nic_bandwidth_bytes_per_s,
                        worker_ids=agent.worker_ids,
                        cached=agent.cache.labels if agent.cache else []).model_dump()

    async def _report(self, kind: str, *, model: str | None = None,
                      worker_id: str | None = None, **data: Any) -> None:
        assert self._nc is not None
        event = Event(kind=kind, model=model, worker_id=worker_id,
                      node_id=self.config.agent.node_id, data=data)
        try:
            await publish_event(self._nc, event)
        except NatsError as exc:
            logger.warning("event %s not published: %s", kind, exc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
