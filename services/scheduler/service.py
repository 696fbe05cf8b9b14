"""The scheduler service: the I/O around the pure policy.

One loop, one event at a time: bus events (a durable consumer on `HS_EVENTS`) and a tick every
`tick_s` are mapped to policy events and fed to `decide`; the new state is written to Postgres
(`StateStore.apply`) before the commands go out on `hs.cmd.node.<id>`, so a restarted
scheduler never re-decides what it already commanded. Models are registered at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import MSG_ID_HEADER, connect, ensure_streams, publish_event
from libs.common.db.migrate import upgrade_async
from libs.common.db.session import create_engine, create_sessionmaker
from libs.common.messages import Event, EventKind
from libs.common.settings import BusSettings, NatsSettings
from libs.common.subjects import EVENTS_STREAM, EVENTS_SUBJECTS
from services.scheduler import events as policy_events
from services.scheduler.commands import to_outgoing, to_policy_event
from services.scheduler.policy import SINGLE_WORKER, Policy
from services.scheduler.registration import (
    ModelRegistration,
    load_model,
    load_storage_names,
    register_model,
)
from services.scheduler.state import ClusterState
from services.scheduler.state_store import StateStore

logger = logging.getLogger(__name__)

# published by the admin API once it has written a model's row
ADMIN_MODEL_REGISTERED = "admin.model_registered"


@dataclass(frozen=True)
class SchedulerConfig:
    database_url: str
    storage_url: str
    registrations: Sequence[ModelRegistration] = ()
    tick_s: float = 1.0
    # the durable consumer on HS_EVENTS; a restarted scheduler resumes where it stopped
    consumer: str = "scheduler"


class SchedulerService:
    def __init__(self, config: SchedulerConfig, *, nats: NatsSettings, bus: BusSettings,
                 policy: Policy = SINGLE_WORKER) -> None:
        self.config = config
        self._nats = nats
        self._bus = bus
        self._policy = policy
        self.state = ClusterState()
        # model -> its name in the model store
        self._storage_names: dict[str, str] = {}
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self._queue: asyncio.Queue[tuple[policy_events.Event, Msg | None]] = asyncio.Queue()

    async def run(self, stop: asyncio.Event) -> int:
        await upgrade_async(self.config.database_url)
        engine = create_engine(self.config.database_url)
        sessionmaker = self._sessionmaker = create_sessionmaker(engine)
        store = StateStore(sessionmaker)
        nc = await connect(self._nats, name="scheduler")
        try:
            js = nc.jetstream()
            await ensure_streams(js, self._bus)
            self.state = await store.load()
            self._storage_names = await load_storage_names(sessionmaker)
            for registration in self.config.registrations:
                spec = await register_model(sessionmaker, self.config.storage_url, registration)
                self._storage_names[spec.name] = spec.name
                await self._decide(store, nc, js, policy_events.ModelRegistered(spec))
            subscription = await self._subscribe(js)
            tasks = [asyncio.create_task(self._pull_loop(subscription)),
                     asyncio.create_task(self._tick_loop())]
            processing = asyncio.create_task(self._process_loop(store, nc, js))
            logger.info("scheduler running with %d models, %d nodes, %d workers",
                        len(self.state.models), len(self.state.nodes), len(self.state.workers))
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([stopping, processing], return_when=asyncio.FIRST_COMPLETED)
            for task in (*tasks, processing, stopping):
                task.cancel()
            results = await asyncio.gather(*tasks, processing, return_exceptions=True)
            errors = [r for r in results if isinstance(r, Exception)]
            for error in errors:
                logger.error("scheduler loop failed", exc_info=error)
            return 1 if errors else 0
        finally:
            # not drain(): draining a pull subscription whose fetch was cancelled waits out
            # the whole drain timeout; flushing delivers the last events just as well
            with contextlib.suppress(NatsError):
                await nc.flush(timeout=5)
            await nc.close()
            await engine.dispose()

    async def _subscribe(self, js: JetStreamContext) -> JetStreamContext.PullSubscription:
        name = self.config.consumer
        await js.add_consumer(EVENTS_STREAM, ConsumerConfig(
            name=name, durable_name=name, filter_subject=EVENTS_SUBJECTS,
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.NEW, ack_wait=30.0))
        return await js.pull_subscribe_bind(durable=name, stream=EVENTS_STREAM)

    async def _pull_loop(self, subscription: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                messages = await subscription.fetch(64, timeout=1.0)
            except NatsTimeoutError:
                continue
            for msg in messages:
                try:
                    event = await self._to_policy_event(Event.model_validate_json(msg.data))
                except ValidationError as exc:
                    logger.warning("skipping a malformed event: %s", exc)
                    event = None
                if event is None:
                    await msg.ack()
                else:
                    self._queue.put_nowait((event, msg))

    async def _to_policy_event(self, event: Event) -> policy_events.Event | None:
        if event.kind != ADMIN_MODEL_REGISTERED or event.model is None:
            return to_policy_event(event)
        assert self._sessionmaker is not None
        loaded = await load_model(self._sessionmaker, event.model)
        if loaded is None:
            logger.warning("model %r registered but not in the database", event.model)
            return None
        spec, storage_model = loaded
        self._storage_names[spec.name] = storage_model
        return policy_events.ModelRegistered(spec)

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_s)
            self._queue.put_nowait((policy_events.Tick(), None))

    async def _process_loop(self, store: StateStore, nc: NATS, js: JetStreamContext) -> None:
        while True:
            event, msg = await self._queue.get()
            await self._decide(store, nc, js, event)
            if msg is not None:
                await msg.ack()

    async def _decide(self, store: StateStore, nc: NATS, js: JetStreamContext,
                      event: policy_events.Event) -> None:
        now = time.time()
        before = self.state
        after, commands = self._policy.decide(before, event, now)
        if _has_stored_changes(before, after):
            await store.apply(before, after, now=now)
        self.state = after
        for command in commands:
            await self._send(nc, js, command)

    async def _send(self, nc: NATS, js: JetStreamContext,
                    command: policy_events.Command) -> None:
        model = command.model if isinstance(command, policy_events.PlaceWorker) else None
        outgoing = to_outgoing(command, storage_url=self.config.storage_url,
                               storage_model=self._storage_names.get(model or ""))
        if outgoing is None:
            if isinstance(command, policy_events.MarkNodeDown):
                await publish_event(nc, Event(kind=EventKind.NODE_DOWN,
                                              node_id=command.node_id))
            logger.info("policy command %s", command)
            return
        await js.publish(outgoing.subject, outgoing.message.model_dump_json().encode(),
                         headers={MSG_ID_HEADER: outgoing.command_id})
        await publish_event(nc, outgoing.event)
        logger.info("sent %s to %s", type(outgoing.message).__name__, outgoing.subject)


def _has_stored_changes(before: ClusterState, after: ClusterState) -> bool:
    """Whether the part of the state that Postgres holds (not requests) changed."""
    return (before.nodes is not after.nodes or before.endpoints is not after.endpoints
            or before.workers is not after.workers)
