"""Scale-out and scale-in: how many endpoints a busy model needs (`Policy.scale_out`).

All workers of a model pull from its one request consumer, so another endpoint shares the
model's queue the moment it is ready. What the policy decides with these:

- **Out** (`models_to_scale_out`): a model whose queued requests outnumber the free slots of
  its endpoints, all READY, gets another one (when no cold start waits and no fetch is in
  flight: `Policy._place_queued`). Slots are what each endpoint's stage-0 worker reported
  in `worker.ready` (`endpoint_capacities`), else the configured default.
- **Give way** (`starting_scale_outs`): scale-outs still starting are stopped for a cold
  start, whose requests have nowhere else to go.
- **In** (`needed_endpoints`, `endpoints_to_scale_in`): an endpoint after the model's oldest
  keeps its keep-alive clock running only while the endpoints before it cannot run all the
  model's requests; once the clock runs out one endpoint goes, an idle one first.

Pure functions of the state, like the rest of the policy.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from libs.common.db.enums import EndpointStatus
from services.scheduler.draft import Draft
from services.scheduler.state import ClusterState, EndpointState


@dataclass(frozen=True)
class _Load:
    """Where the models' requests are, in one pass over the state."""

    # model -> its live endpoints, oldest first
    live: dict[str, list[EndpointState]]
    # model -> its requests, queued or running (anywhere)
    demand: Counter[str]
    # model -> its requests waiting for a slot
    queued: Counter[str]
    # endpoint id -> the requests its workers run
    running: Counter[int]

    @classmethod
    def of(cls, state: ClusterState | Draft) -> _Load:
        live: dict[str, list[EndpointState]] = {}
        for endpoint in sorted(state.endpoints.values(), key=lambda e: e.endpoint_id):
            if endpoint.is_live:
                live.setdefault(endpoint.model, []).append(endpoint)
        demand: Counter[str] = Counter()
        queued: Counter[str] = Counter()
        running: Counter[int] = Counter()
        for request in state.requests.values():
            demand[request.model] += 1
            if request.worker_id is None:
                queued[request.model] += 1
            elif (worker := state.workers.get(request.worker_id)) is not None:
                running[worker.endpoint_id] += 1
        return cls(live, demand, queued, running)


def models_to_scale_out(draft: Draft, models: Iterable[str], *, default_capacity: int,
                        max_endpoints: int) -> list[str]:
    """Of `models` (each with queued requests and a live endpoint), those whose endpoints
    are all READY, whose queued requests outnumber the free slots of those endpoints, and
    that have fewer than `max_endpoints` of them."""
    wanted = set(models)
    if not wanted:
        return []
    load = _Load.of(draft)
    capacities = endpoint_capacities(draft, default=default_capacity)
    chosen = []
    for model in wanted:
        endpoints = load.live.get(model, [])
        if (len(endpoints) >= max_endpoints
                or any(e.state is not EndpointStatus.READY for e in endpoints)):
            continue
        free = sum(capacities.get(e.endpoint_id, default_capacity) - load.running[e.endpoint_id]
                   for e in endpoints)
        if load.queued[model] > free:
            chosen.append(model)
    return chosen


def starting_scale_outs(draft: Draft) -> list[EndpointState]:
    """Endpoints still starting while an older endpoint of their model is READY: scale-outs
    (a cold start happens only to a model with no live endpoint)."""
    ready = {e.model for e in draft.endpoints.values() if e.state is EndpointStatus.READY}
    return sorted((e for e in draft.endpoints.values()
                   if e.is_live and e.state is not EndpointStatus.READY and e.model in ready),
                  key=lambda e: e.endpoint_id)


def endpoint_capacities(state: ClusterState | Draft, *, default: int) -> dict[int, int]:
    """Endpoint id -> requests it runs at once: what its stage-0 worker reported when it got
    ready, else `default` (a starting worker)."""
    return {w.endpoint_id: w.capacity or default for w in state.workers.values()
            if w.stage == 0}


def _is_needed(endpoints: list[EndpointState], demand: int,
               capacities: Mapping[int, int]) -> list[bool]:
    """For a model's live endpoints, oldest first: whether each is needed, i.e. the oldest,
    or the model has more requests (`demand`, queued or running) than the ones before it
    run at once."""
    needed, before = [], 0
    for endpoint in endpoints:
        needed.append(not needed or demand > before)
        before += capacities.get(endpoint.endpoint_id, 0)
    return needed


def endpoints_to_scale_in(state: ClusterState | Draft, now: float, *,
                          default_capacity: int) -> list[EndpointState]:
    """The endpoints to stop because their model has more than its requests need.

    A model's endpoint after its oldest is needed while the model has more requests, queued
    or running, than the endpoints before it run at once (`_is_needed`, with each endpoint's
    capacity); `_touch_endpoints` restarts its keep-alive clock only then. Each endpoint not
    needed now that is READY and whose clock ran out is one too many; as many of the model's
    READY endpoints are stopped, those running the fewest requests first (the newest on a
    tie), so an idle one goes before a busy one drains."""
    load = _Load.of(state)
    if all(len(endpoints) < 2 for endpoints in load.live.values()):
        return []
    capacities = endpoint_capacities(state, default=default_capacity)
    due = []
    for model, endpoints in sorted(load.live.items()):
        if len(endpoints) < 2:
            continue
        keep_alive_s = state.models[model].keep_alive_s
        surplus = sum(
            1 for e, is_needed in zip(endpoints, _is_needed(endpoints, load.demand[model],
                                                            capacities), strict=True)
            if not is_needed and e.state is EndpointStatus.READY
            and now - e.last_request_at >= keep_alive_s)
        ready = sorted((e for e in endpoints if e.state is EndpointStatus.READY),
                       key=lambda e: (load.running[e.endpoint_id], -e.endpoint_id))
        due += ready[:surplus]
    return sorted(due, key=lambda e: e.endpoint_id)


def needed_endpoints(draft: Draft, model: str, *, default_capacity: int) -> list[EndpointState]:
    """The model's live endpoints its requests (queued or running) need, oldest first."""
    live = sorted((e for e in draft.endpoints.values() if e.model == model and e.is_live),
                  key=lambda e: e.endpoint_id)
    if len(live) < 2:
        return live
    demand = sum(1 for r in draft.requests.values() if r.model == model)
    is_needed = _is_needed(live, demand, endpoint_capacities(draft, default=default_capacity))
    return [e for e, needed in zip(live, is_needed, strict=True) if needed]
