"""`hydraserve events` against a real NATS: `show` and `tail` print exactly the events that
match their filters, and `timeline` orders a request's cold-start phases relative to its
arrival."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import nats
import pytest

from hydraserve.cli import main
from libs.common.bus import EventPublisher, ensure_streams, publish_event
from libs.common.messages import Event
from libs.common.settings import BusSettings
from libs.common.subjects import EVENTS_STREAM, event_subject

pytestmark = pytest.mark.service

T0 = 1_900_000_000.0


@dataclass(frozen=True)
class Published:
    model: str
    other_model: str
    request_id: str
    endpoint_id: str
    events: list[Event]


async def _publish(nats_url: str, publish_events: list[Event] | None = None) -> Published:
    suffix = uuid.uuid4().hex[:8]
    model, other = f"org/model-{suffix}", f"other-{suffix}"
    request_id, endpoint_id = f"cmpl-{suffix}", f"ep-{suffix}"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_streams(js, BusSettings())
        gateway = EventPublisher(nc)
        worker = EventPublisher(nc, model=model, worker_id=f"w-{suffix}", node_id="node-a",
                                endpoint_id=endpoint_id)
        events = [
            await gateway.publish("request.received", request_id=request_id, model=model),
            await worker.publish("worker.started", pid=123),
            await gateway.publish("request.received", request_id=f"x-{suffix}", model=other),
            await worker.publish("worker.ready", load_s=1.25),
            await worker.publish("request.first_token", request_id=request_id),
        ]
        for event in publish_events or []:
            await publish_event(nc, event)
        # acked, on the same connection: every event above is stored once this returns
        await js.publish(event_subject("test.sentinel"), b"{}", stream=EVENTS_STREAM)
    finally:
        await nc.close()
    return Published(model, other, request_id, endpoint_id, events)


def show(capsys: pytest.CaptureFixture[str], nats_url: str, *args: str) -> list[str]:
    assert main(["events", "show", "--nats", nats_url, *args]) == 0
    return capsys.readouterr().out.splitlines()


def test_show_by_model_prints_exactly_that_models_events_in_order(
    nats_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    published = asyncio.run(_publish(nats_url))

    lines = show(capsys, nats_url, "--model", published.model)

    assert [line.split()[1] for line in lines] == [
        "request.received", "worker.started", "worker.ready", "request.first_token"]
    assert all(f"model={published.model}" in line for line in lines)
    assert "load_s=1.25" in lines[2] and f"ep={published.endpoint_id}" in lines[2]


@pytest.mark.parametrize(("flag", "expected_kinds"), [
    ("--kind", ["worker.ready"]),
    ("--request", ["request.received", "request.first_token"]),
    ("--endpoint", ["worker.started", "worker.ready", "request.first_token"]),
])
def test_show_with_a_filter_prints_exactly_the_matching_events(
    nats_url: str, capsys: pytest.CaptureFixture[str], flag: str, expected_kinds: list[str],
) -> None:
    published = asyncio.run(_publish(nats_url))
    value = {"--kind": "worker.ready", "--request": published.request_id,
             "--endpoint": published.endpoint_id}[flag]

    lines = show(capsys, nats_url, "--model", published.model, flag, value)

    assert [line.split()[1] for line in lines] == expected_kinds


def test_show_since_leaves_out_events_older_than_the_duration(
    nats_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    old = Event(kind="worker.ready", model=f"aged-{uuid.uuid4().hex[:8]}", time=time.time() - 3600)
    published = asyncio.run(_publish(nats_url, [old]))

    recent = show(capsys, nats_url, "--model", published.model, "--since", "10m")
    aged = show(capsys, nats_url, "--model", old.model or "", "--since", "10m")

    assert (len(recent), aged) == (4, [])


def test_tail_since_prints_the_matching_events_and_stops_at_count(
    nats_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    published = asyncio.run(_publish(nats_url))

    assert main(["events", "tail", "--nats", nats_url, "--model", published.other_model,
                 "--since", "5m", "--count", "1"]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"model={published.other_model}" in lines[0]


def test_timeline_orders_the_phases_linked_to_a_request_relative_to_its_arrival(
    nats_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    tag = uuid.uuid4().hex[:8]
    rid, ep, worker, model = f"cmpl-t{tag}", f"ep-t{tag}", f"w-t{tag}", f"tl-{tag}"
    # published out of time order, as several services would
    phases = [
        Event(kind="request.first_token", request_id=rid, worker_id=worker, model=model,
              time=T0 + 3.5),
        Event(kind="endpoint.planned", request_id=rid, endpoint_id=ep, model=model,
              time=T0 + 0.01, data={"pipeline_degree": 2}),
        Event(kind="request.received", request_id=rid, model=model, time=T0),
        Event(kind="worker.started", endpoint_id=ep, worker_id=worker, model=model,
              time=T0 + 0.2),
        Event(kind="worker.ready", endpoint_id=ep, worker_id=worker, model=model,
              time=T0 + 3.0),
        # another request on the same worker, and another endpoint: not part of it
        Event(kind="request.received", request_id=f"other-{tag}", worker_id=worker,
              model=model, time=T0 + 3.2),
        Event(kind="worker.ready", endpoint_id=f"ep-x{tag}", worker_id=f"w-x{tag}",
              model=model, time=T0 + 1.0),
    ]
    asyncio.run(_publish(nats_url, phases))

    assert main(["events", "timeline", "--nats", nats_url, rid]) == 0

    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()]
    assert rows == [["+0.000s", "request.received"], ["+0.010s", "endpoint.planned"],
                    ["+0.200s", "worker.started"], ["+3.000s", "worker.ready"],
                    ["+3.500s", "request.first_token"]]


def test_timeline_of_an_unknown_request_exits_1(
    nats_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(_publish(nats_url))

    assert main(["events", "timeline", "--nats", nats_url, "no-such-request"]) == 1
    assert "no events of request 'no-such-request'" in capsys.readouterr().err
