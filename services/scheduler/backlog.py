"""The request backlog in `HS_REQUESTS`, seen by the scheduler: what waits that it may not know.

The policy learns of a request from its `request.received` event. It misses some: a scheduler
started for the first time (its event consumer delivers only new events), a restarted one
(the requests it knew of were in memory only), a lost event. A request it does not know of
never triggers a cold start and would wait until the gateway gives up. The stream itself is
the truth: a request message stays in the work-queue stream until a worker acks (or terms)
it, or the gateway withdraws it. So the service reconciles the policy with the stream:

- `arrivals`: for a model with messages waiting, the request ids read from the stream (by
  sequence, without consuming them) that the policy does not know, as `RequestArrived`, in
  stream order. Real ids, so the `request.done` the worker publishes later clears them, and
  a `request.received` delivered as well is a no-op (the policy ignores a known id).
- `stale_requests`: a model with no message at all in the stream has no request waiting or
  in flight; any request the policy still holds for it (a request the gateway withdrew on
  timeout, which no `request.done` follows) is ended with `RequestDone`, so keep-alive sees
  the model idle. Only sound for requests whose message was in the stream before the count
  was read: the gateway publishes a request before its `request.received` event, and the
  service checks between events, with the state every processed event led to.

The reading is I/O (`read_counts`, `read_request_ids`); what to feed the policy is pure.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from libs.common.bus import MSG_ID_HEADER
from libs.common.subjects import REQUESTS_STREAM, REQUESTS_SUBJECTS, request_subject
from services.scheduler.events import RequestArrived, RequestDone
from services.scheduler.state import ClusterState

logger = logging.getLogger(__name__)

# ids read per model and pass; the policy needs one to cold-start, all for exact keep-alive
MAX_IDS_PER_MODEL = 10_000


@dataclass(frozen=True)
class BacklogCounts:
    """Messages per model in `HS_REQUESTS` (waiting, or held unacked by a worker)."""

    counts: Mapping[str, int]
    first_seq: int
    # the per-subject counts add up to the stream's total: no subject was left out of the
    # answer, so a model missing from it truly has no message
    complete: bool

    def of(self, model: str) -> int:
        return self.counts.get(model, 0)


async def read_counts(js: JetStreamContext, models: Iterable[str]) -> BacklogCounts:
    info = await js.stream_info(REQUESTS_STREAM, subjects_filter=REQUESTS_SUBJECTS)
    by_subject = info.state.subjects or {}
    counts = {model: by_subject.get(request_subject(model), 0) for model in models}
    return BacklogCounts(counts={m: n for m, n in counts.items() if n > 0},
                         first_seq=info.state.first_seq,
                         complete=sum(by_subject.values()) == info.state.messages)


async def read_request_ids(js: JetStreamContext, model: str, *, first_seq: int,
                           limit: int = MAX_IDS_PER_MODEL) -> list[str]:
    """The ids of `model`'s request messages in stream order, read without consuming them."""
    subject = request_subject(model)
    ids: list[str] = []
    seq = max(1, first_seq)
    while len(ids) < limit:
        try:
            raw = await js.get_msg(REQUESTS_STREAM, seq=seq, subject=subject, next=True)
        except NotFoundError:
            break
        if raw.seq is None:
            break
        seq = raw.seq + 1
        request_id = _request_id(raw.headers, raw.data)
        if request_id is None:
            logger.warning("request message %d on %s has no request id; skipped", raw.seq,
                           subject)
        else:
            ids.append(request_id)
    else:
        logger.warning("model %s: %d or more requests waiting; read the first %d", model,
                       limit, limit)
    return ids


def _request_id(headers: Mapping[str, str] | None, data: bytes | None) -> str | None:
    # the gateway publishes with the request id as the message id
    if headers and (msg_id := headers.get(MSG_ID_HEADER)):
        return msg_id
    try:
        request_id = json.loads(data or b"{}").get("request_id")
    except (ValueError, AttributeError):
        return None
    return request_id if isinstance(request_id, str) and request_id else None


def models_to_scan(state: ClusterState, counts: BacklogCounts, *, all_waiting: bool) -> list[str]:
    """Models whose waiting request ids to read, sorted.

    `all_waiting` (at start-up): every model with messages. Otherwise (on a tick) only the
    models that would hang: messages waiting, no live endpoint to take them, and no queued
    request the policy knows of (which would make it cold-start the model on its own).
    """
    live = {e.model for e in state.endpoints.values() if e.is_live}
    queued = {r.model for r in state.requests.values() if r.worker_id is None}
    return sorted(m for m in counts.counts if m in state.models and (
        all_waiting or (m not in live and m not in queued)))


def arrivals(state: ClusterState, model: str, request_ids: Iterable[str]) -> list[RequestArrived]:
    """`RequestArrived` for the ids the policy does not know, in the given (stream) order."""
    seen: set[str] = set()
    events = []
    for request_id in request_ids:
        if request_id not in state.requests and request_id not in seen:
            seen.add(request_id)
            events.append(RequestArrived(request_id, model))
    return events


def stale_requests(state: ClusterState, counts: BacklogCounts) -> list[RequestDone]:
    """`RequestDone` for the requests of models without any message in the stream, by id."""
    if not counts.complete:
        return []
    return [RequestDone(r.request_id)
            for r in sorted(state.requests.values(), key=lambda r: r.request_id)
            if r.model in state.models and counts.of(r.model) == 0]
