"""Small NATS helpers shared by the services: connect, declare the streams, publish events."""

from __future__ import annotations

import logging
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from libs.common.messages import Event
from libs.common.settings import BusSettings, NatsSettings
from libs.common.subjects import (
    COMMANDS_STREAM,
    COMMANDS_SUBJECTS,
    EVENTS_STREAM,
    EVENTS_SUBJECTS,
    REQUESTS_STREAM,
    REQUESTS_SUBJECTS,
    event_subject,
    request_consumer,
    request_subject,
)

logger = logging.getLogger(__name__)

# JetStream's error code for "stream name already in use with a different configuration"
_STREAM_NAME_IN_USE = 10058
# header JetStream deduplicates publishes by (within the stream's duplicate window)
MSG_ID_HEADER = "Nats-Msg-Id"


async def connect(settings: NatsSettings, *, name: str) -> NATS:
    """A client connection named after the process (`nats server report connections`)."""
    return await nats.connect(settings.url, name=name,
                              connect_timeout=int(max(1, settings.connect_timeout_s)))


def stream_configs(bus: BusSettings) -> list[StreamConfig]:
    """The three streams: requests (work queue), events (time-limited), commands."""

    def window(max_age_s: float) -> float:
        # JetStream refuses a duplicate window longer than the stream's max age
        return min(bus.duplicate_window_s, max_age_s)

    return [
        StreamConfig(
            name=REQUESTS_STREAM, subjects=[REQUESTS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            max_age=bus.requests_max_age_s, duplicate_window=window(bus.requests_max_age_s),
        ),
        StreamConfig(
            name=EVENTS_STREAM, subjects=[EVENTS_SUBJECTS], retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE, max_age=bus.events_max_age_s,
            max_bytes=bus.events_max_bytes, discard=DiscardPolicy.OLD,
            duplicate_window=window(bus.events_max_age_s),
        ),
        StreamConfig(
            name=COMMANDS_STREAM, subjects=[COMMANDS_SUBJECTS],
            retention=RetentionPolicy.WORK_QUEUE, storage=StorageType.FILE,
            max_age=bus.requests_max_age_s, duplicate_window=window(bus.requests_max_age_s),
        ),
    ]


async def ensure_streams(js: JetStreamContext, bus: BusSettings) -> None:
    """Create the streams, or bring an existing one's limits up to these settings.

    Idempotent, and safe when several services start at once.
    """
    for config in stream_configs(bus):
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_NAME_IN_USE:
                raise
            logger.info("stream %s exists with another configuration; updating it", config.name)
            await js.update_stream(config)


async def ensure_request_consumer(js: JetStreamContext, model: str, *, ack_wait_s: float,
                                  max_deliver: int) -> str:
    """The durable pull consumer on `hs.req.<model>` that all workers of `model` share.

    Creating it again with the same settings is a no-op; returns its name.
    """
    name = request_consumer(model)
    await js.add_consumer(REQUESTS_STREAM, ConsumerConfig(
        name=name, durable_name=name, filter_subject=request_subject(model),
        ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s, max_deliver=max_deliver,
    ))
    return name


class EventPublisher:
    """Publishes events into `HS_EVENTS`, filling in who is speaking.

    Fire-and-forget (core publish, no ack wait): an event must never slow down the request
    path. The event id rides in `Nats-Msg-Id`, so a re-published event is stored once.
    """

    def __init__(self, nc: NATS, *, model: str | None = None, worker_id: str | None = None,
                 node_id: str | None = None, endpoint_id: str | None = None) -> None:
        self._nc = nc
        self._model = model
        self._worker_id = worker_id
        self._node_id = node_id
        self._endpoint_id = endpoint_id

    async def publish(self, kind: str, *, request_id: str | None = None,
                      model: str | None = None, **data: Any) -> Event:
        """Publish an event of `kind` with `data`; `model` overrides the publisher's."""
        event = Event(kind=kind, request_id=request_id, data=data,
                      model=model if model is not None else self._model,
                      worker_id=self._worker_id, node_id=self._node_id,
                      endpoint_id=self._endpoint_id)
        await publish_event(self._nc, event)
        return event


async def publish_event(nc: NATS, event: Event) -> None:
    await nc.publish(event_subject(event.kind, event.model), event.model_dump_json().encode(),
                     headers={MSG_ID_HEADER: event.id})
