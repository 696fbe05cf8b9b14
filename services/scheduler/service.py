"""The scheduler service: the I/O around the pure policy.

One loop, one event at a time: bus events (a durable consumer on `HS_EVENTS`) and a tick every
`tick_s` are mapped to policy events and fed to `decide`; the new state is written to Postgres
(`StateStore.apply`) before the commands go out on `hs.cmd.node.<id>`, so a restarted
scheduler never re-decides what it already commanded. Models are registered at start-up.

Requests are not in Postgres: they wait in `HS_REQUESTS`. Right after subscribing to the
events (so nothing falls between the two), the service reads that backlog and feeds the policy
a `RequestArrived` for every waiting request it does not know, and on ticks (every
`backlog_check_s`) it checks again for models with requests waiting but nothing to take them,
and ends requests that left the stream without a `request.done` (`services.scheduler.backlog`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.context import Context
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from libs.common.bus import MSG_ID_HEADER, connect, ensure_streams, publish_event
from libs.common.db.migrate import upgrade_async
from libs.common.db.session import create_engine, create_sessionmaker
from libs.common.messages import Event, EventKind
from libs.common.settings import BusSettings, NatsSettings
from libs.common.subjects import EVENTS_STREAM, EVENTS_SUBJECTS
from libs.common.tracing import (
    TRACEPARENT_HEADER,
    extract_context,
    inject_headers,
    record_span,
    tracer,
)
from services.scheduler import backlog
from services.scheduler import events as policy_events
from services.scheduler.commands import model_registered_event, to_outgoing, to_policy_event
from services.scheduler.observe import record_decision
from services.scheduler.policy import HYDRASERVE, Policy
from services.scheduler.registration import (
    ModelRegistration,
    load_model,
    load_storage_names,
    register_model,
)
from services.scheduler.state import ClusterState
from services.scheduler.state_store import StateStore

logger = logging.getLogger(__name__)
_tracer = tracer(__name__)

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
    # how often (at a tick) to reconcile the policy's requests with the HS_REQUESTS backlog;
    # 0 disables the periodic check (the one at start-up always runs)
    backlog_check_s: float = 1.0
    # the policy's name, for the cold-start metrics
    policy_name: str = "hydraserve"


class SchedulerService:
    def __init__(self, config: SchedulerConfig, *, nats: NatsSettings, bus: BusSettings,
                 policy: Policy = HYDRASERVE) -> None:
        self.config = config
        self._nats = nats
        self._bus = bus
        self._policy = policy
        self.state = ClusterState()
        # model -> its name in the model store
        self._storage_names: dict[str, str] = {}
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        self._queue: asyncio.Queue[tuple[policy_events.Event, Msg | None]] = asyncio.Queue()
        self._last_backlog_check = 0.0
        # Worker ids restart at 1 with a fresh database, so command ids carry this process's
        # epoch: JetStream's duplicate window must not drop a new placement as a repeat of an
        # old cluster's. A command re-sent after a crash gets a new id; the node agent is
        # idempotent per worker id.
        self._epoch = uuid.uuid4().hex[:8]
        # request id -> the `traceparent` its request.received carried, until decided
        self._trace_parents: dict[str, str] = {}

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
            # after subscribing: a request queued from here on is in the backlog or its
            # event is delivered (or both; the policy ignores a known request id)
            await self._reconcile_backlog(store, nc, js, at_start=True)
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
        # This loop must outlive any one failure: if it ended, the scheduler would keep
        # ticking on a frozen view (no heartbeats: nodes marked down, nothing placed).
        while True:
            try:
                messages = await subscription.fetch(64, timeout=1.0)
            except NatsTimeoutError:
                continue
            except Exception:  # e.g. a JetStream API status under load; pull again
                logger.exception("pulling events failed; retrying")
                await asyncio.sleep(0.5)
                continue
            for msg in messages:
                try:
                    event = await self._to_policy_event(Event.model_validate_json(msg.data))
                except ValidationError as exc:
                    logger.warning("skipping a malformed event: %s", exc)
                    event = None
                except Exception:  # unacked: JetStream redelivers it after ack_wait
                    logger.exception("reading event %r failed; left for redelivery", msg.data)
                    continue
                if event is None:
                    with contextlib.suppress(NatsError):  # redelivered and ignored again
                        await msg.ack()
                else:
                    self._queue.put_nowait((event, msg))

    async def _to_policy_event(self, event: Event) -> policy_events.Event | None:
        if event.kind != ADMIN_MODEL_REGISTERED or event.model is None:
            arrived = to_policy_event(event)
            if (isinstance(arrived, policy_events.RequestArrived)
                    and isinstance(parent := event.data.get(TRACEPARENT_HEADER), str)):
                self._trace_parents[arrived.request_id] = parent
            return arrived
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
            if (isinstance(event, policy_events.Tick) and self.config.backlog_check_s > 0
                    and time.monotonic() - self._last_backlog_check
                    >= self.config.backlog_check_s):
                await self._reconcile_backlog(store, nc, js, at_start=False)
            await self._decide(store, nc, js, event)
            if msg is not None:
                await msg.ack()

    async def _reconcile_backlog(self, store: StateStore, nc: NATS, js: JetStreamContext, *,
                                 at_start: bool) -> None:
        """Feed the policy what waits in HS_REQUESTS that it does not know (see `backlog`).

        Runs between events (in the processing loop, or before it starts), so `self.state`
        reflects every event decided so far; a failed read skips this check, not the loop.
        """
        self._last_backlog_check = time.monotonic()
        try:
            counts = await backlog.read_counts(js, self.state.models)
            found: list[tuple[str, list[str]]] = []
            for model in backlog.models_to_scan(self.state, counts, all_waiting=at_start):
                found.append((model, await backlog.read_request_ids(
                    js, model, first_seq=counts.first_seq)))
        except (NatsError, TimeoutError) as exc:
            logger.warning("could not read the request backlog: %s", exc)
            return
        if at_start:
            logger.info("request backlog at start: %s",
                        dict(sorted(counts.counts.items())) or "none")
        for model, request_ids in found:
            arrived = backlog.arrivals(self.state, model, request_ids)
            if arrived:
                logger.log(logging.INFO if at_start else logging.WARNING,
                           "model %s: %d requests waiting in %s that the policy did not "
                           "know of (%s); treating them as arrived", model, len(arrived),
                           "the backlog at start" if at_start else "the stream",
                           ", ".join(e.request_id for e in arrived[:5])
                           + (", ..." if len(arrived) > 5 else ""))
            for event in arrived:
                await self._decide(store, nc, js, event)
        if at_start:
            return
        for done in backlog.stale_requests(self.state, counts):
            logger.info("request %s is no longer in the request stream; ending it",
                        done.request_id)
            await self._decide(store, nc, js, done)

    async def _decide(self, store: StateStore, nc: NATS, js: JetStreamContext,
                      event: policy_events.Event) -> None:
        now = time.time()
        before = self.state
        after, commands = self._policy.decide(before, event, now)
        if _has_stored_changes(before, after):
            await _apply_until_stored(store, before, after, now=now)
        self.state = after
        record_decision(before, after, commands, policy=self.config.policy_name)
        trace_context = None
        if isinstance(event, policy_events.RequestArrived):
            trace_context = self._trace_decision(event, commands, started=now)
        if isinstance(event, policy_events.ModelRegistered):
            # recorded for replay: the policy's models come from flags and the database
            await publish_event(nc, model_registered_event(event.model, now=now))
        for command in commands:
            await self._send(nc, js, command, trace_context=trace_context)

    async def _send(self, nc: NATS, js: JetStreamContext, command: policy_events.Command, *,
                    trace_context: Context | None = None) -> None:
        """Publish a command (with `trace_context` in its headers, if any) and its event."""
        model = (command.model if isinstance(command, policy_events.PlaceWorker
                                             | policy_events.Consolidate) else None)
        outgoing = to_outgoing(command, storage_url=self.config.storage_url,
                               storage_model=self._storage_names.get(model or ""),
                               epoch=self._epoch)
        if outgoing is None:
            if isinstance(command, policy_events.MarkNodeDown):
                await publish_event(nc, Event(kind=EventKind.NODE_DOWN,
                                              node_id=command.node_id))
            logger.info("policy command %s", command)
            return
        if outgoing.message is not None:
            assert outgoing.subject is not None and outgoing.command_id is not None, outgoing
            headers = {MSG_ID_HEADER: outgoing.command_id}
            if trace_context is not None:
                headers = inject_headers(headers, context=trace_context)
            await js.publish(outgoing.subject, outgoing.message.model_dump_json().encode(),
                             headers=headers)
            logger.info("sent %s to %s", type(outgoing.message).__name__, outgoing.subject)
        await publish_event(nc, outgoing.event)


    def _trace_decision(self, event: policy_events.RequestArrived,
                        commands: Sequence[policy_events.Command], *,
                        started: float) -> Context | None:
        """The decision a request's arrival triggered, as a span of the request's trace; the
        context its commands carry (None if the request came without one)."""
        parent = self._trace_parents.pop(event.request_id, None)
        if parent is None:
            return None
        parent_context = extract_context({TRACEPARENT_HEADER: parent})
        placed = [c for c in commands if isinstance(c, policy_events.PlaceWorker)]
        span = record_span(
            _tracer, "scheduler.decide", start=started, end=time.time(), context=parent_context,
            attributes={"hydraserve.request_id": event.request_id,
                        "hydraserve.model": event.model,
                        "hydraserve.num_commands": len(commands),
                        "hydraserve.placed_nodes": [c.node_id for c in placed],
                        "hydraserve.pipeline_degree": placed[0].pipeline_degree if placed else 0})
        # without an SDK the span is the parent's context again: the chain stays whole
        return trace.set_span_in_context(span, parent_context)


async def _apply_until_stored(store: StateStore, before: ClusterState, after: ClusterState,
                              *, now: float) -> None:
    """Write the new state, waiting out a database outage: it must be stored before its
    commands go out, and exiting would lose the in-memory requests until a restart."""
    delay_s = 0.5
    while True:
        try:
            await store.apply(before, after, now=now)
            return
        except (SQLAlchemyError, OSError) as exc:
            logger.warning("storing the cluster state failed, retrying in %.1fs: %r",
                           delay_s, exc)
            await asyncio.sleep(delay_s)
            delay_s = min(2 * delay_s, 5.0)


def _has_stored_changes(before: ClusterState, after: ClusterState) -> bool:
    """Whether the part of the state that Postgres holds (not requests) changed."""
    return (before.nodes is not after.nodes or before.endpoints is not after.endpoints
            or before.workers is not after.workers)
