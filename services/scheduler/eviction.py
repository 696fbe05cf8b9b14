"""Making room for cold starts: stop idle endpoints, least recently used first.

Without it a queued cold start that fits on no node waits until some idle endpoint's
keep-alive runs out, even when idle endpoints hold all the memory it needs. With it
(`Policy.evict_idle`) the queue is served in the policy's order (`Policy._queue_key`)
against three views of each node's GPU memory:

- **now**: what is free, less what older queued models have claimed of it;
- **soon**: plus what STOPPING workers hold (freed at their `WorkerStopped`): a model that
  fits there waits and claims that memory, so no younger model takes it and nothing more is
  stopped for it on the next event;
- **with victims**: plus the memory of idle endpoints (live, READY, every worker READY, no
  request of their model queued or running), least recently used first. The shortest LRU
  prefix the placer accepts is found by bisection (a placer that finds room keeps finding it
  with more free memory); the victims not on the chosen nodes are dropped, then each victim
  the placement does without, most recently used first. The rest are scaled to zero and the
  model claims the memory, to be placed once their `WorkerStopped` frees it.

Starting, stopping and serving workers are never victims. Claims live for one pass of the
queue: every event recomputes them in the same order, so the policy stays a pure function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from libs.common.db.enums import EndpointStatus, WorkerStatus
from services.scheduler.placement import WorkerPlan
from services.scheduler.state import ClusterState, EndpointState, NodeState

# nodes -> the placer's plans for the model at hand, or None (no room)
PlaceOn = Callable[[Mapping[str, NodeState]], "tuple[WorkerPlan, ...] | None"]


class _Attempt(Protocol):
    def __call__(self, *, now: bool, victims: Sequence[EndpointState] = ()
                 ) -> tuple[WorkerPlan, ...] | None: ...


@dataclass(frozen=True)
class Room:
    """How a queued cold start proceeds: place `plans` now, or wait for memory to come free
    (after stopping `victims`, possibly none); `plans` None: no room even with every victim."""

    plans: tuple[WorkerPlan, ...] | None
    is_now: bool = False
    # endpoints to scale to zero first, least recently used first
    victims: tuple[EndpointState, ...] = ()


def idle_endpoints(state: ClusterState) -> list[EndpointState]:
    """Endpoints that could be stopped without hurting a request, least recently used first:
    READY, every worker READY, and no request of their model queued or running."""
    busy = {r.model for r in state.requests.values()}
    not_ready = {w.endpoint_id for w in state.workers.values()
                 if w.state is not WorkerStatus.READY}
    idle = [e for e in state.endpoints.values()
            if e.state is EndpointStatus.READY and e.model not in busy
            and e.endpoint_id not in not_ready]
    return sorted(idle, key=lambda e: (e.last_request_at, e.endpoint_id))


class MemoryBook:
    """The now / soon / with-victims views of one pass over the queue. With `may_evict`
    False nothing is ever claimed, so the placer sees the nodes exactly as they are."""

    def __init__(self, state: ClusterState, *, may_evict: bool = True) -> None:
        self._nodes = state.nodes
        self._may_evict = may_evict
        # node -> bytes STOPPING workers will give back
        self._stopping: dict[str, int] = {}
        for worker in state.workers.values():
            if worker.state is WorkerStatus.STOPPING:
                _add(self._stopping, worker.node_id, worker.gpu_memory_bytes)
        # node -> bytes older queued models wait for
        self._claims: dict[str, int] = {}
        self._victims = idle_endpoints(state) if may_evict else []
        # victim endpoint -> node -> bytes its workers hold
        self._held: dict[int, dict[str, int]] = {e.endpoint_id: {} for e in self._victims}
        for worker in state.workers.values():
            if worker.endpoint_id in self._held:
                _add(self._held[worker.endpoint_id], worker.node_id, worker.gpu_memory_bytes)

    def update(self, nodes: Mapping[str, NodeState]) -> None:
        """The policy placed workers: the book follows the draft's nodes."""
        self._nodes = nodes

    def make_room(self, place_on: PlaceOn, *, worker_bytes: int, may_wait: bool = True) -> Room:
        """`worker_bytes`: the whole-model worker every placer needs one node to hold (stage
        0 is full size); views where no node has that much are not worth a placer call.
        `may_wait` False (a scale-out): place now or not at all, claiming and stopping
        nothing."""
        attempt = functools.partial(self._attempt, place_on, worker_bytes=worker_bytes)
        plans = attempt(now=True)
        if plans is not None:
            return Room(plans, is_now=True)
        if not self._may_evict or not may_wait:
            # the placer sees the nodes as they are: a cold start waits for keep-alive
            return Room(None)
        plans = attempt(now=False)
        if plans is not None:
            self._claim(plans)
            return Room(plans)
        victims = self._choose_victims(attempt)
        if victims is None:
            return Room(None)
        plans = attempt(now=False, victims=victims)
        assert plans is not None
        self._claim(plans)
        stopped = {v.endpoint_id for v in victims}
        self._victims = [v for v in self._victims if v.endpoint_id not in stopped]
        for endpoint_id in stopped:
            for node_id, num_bytes in self._held[endpoint_id].items():
                _add(self._stopping, node_id, num_bytes)
        return Room(plans, victims=tuple(victims))

    def _choose_victims(self, attempt: _Attempt) -> list[EndpointState] | None:
        candidates = self._victims
        if not candidates or attempt(now=False, victims=candidates) is None:
            return None
        low, high = 1, len(candidates)  # the shortest prefix that fits is in [low, high]
        while low < high:
            middle = (low + high) // 2
            if attempt(now=False, victims=candidates[:middle]) is not None:
                high = middle
            else:
                low = middle + 1
        chosen = candidates[:low]
        plans = attempt(now=False, victims=chosen)
        assert plans is not None
        used = {p.node_id for p in plans}
        on_used = [v for v in chosen if used & self._held[v.endpoint_id].keys()]
        if on_used and attempt(now=False, victims=on_used) is not None:
            chosen = on_used
        for victim in reversed(list(chosen)):
            fewer = [v for v in chosen if v is not victim]
            if attempt(now=False, victims=fewer) is not None:
                chosen = fewer
        return chosen

    def _claim(self, plans: Sequence[WorkerPlan]) -> None:
        for plan in plans:
            _add(self._claims, plan.node_id, plan.gpu_memory_bytes)

    def _attempt(self, place_on: PlaceOn, *, worker_bytes: int, now: bool,
                 victims: Sequence[EndpointState] = ()) -> tuple[WorkerPlan, ...] | None:
        """The placer's plans on a view, or None; without a call when no node has room."""
        nodes = self._nodes
        free = self._free(now=now, victims=victims)
        if not any(node.is_up and free.get(node_id, node.free_gpu_memory_bytes) >= worker_bytes
                   for node_id, node in nodes.items()):
            return None
        if not free:
            return place_on(nodes)
        view = dict(nodes)
        for node_id, num_bytes in free.items():
            view[node_id] = replace(nodes[node_id], free_gpu_memory_bytes=num_bytes)
        return place_on(view)

    def _free(self, *, now: bool, victims: Sequence[EndpointState]) -> dict[str, int]:
        """Free memory in the view of every node where it differs from the node's own."""
        nodes = self._nodes
        extra: dict[str, int] = {}
        for endpoint in victims:
            for node_id, num_bytes in self._held[endpoint.endpoint_id].items():
                _add(extra, node_id, num_bytes)
        changed = (self._claims.keys() | extra.keys()
                   | (set() if now else self._stopping.keys())) & nodes.keys()
        free = {}
        for node_id in changed:
            node_free = nodes[node_id].free_gpu_memory_bytes
            stopping = self._stopping.get(node_id, 0)
            claimed = self._claims.get(node_id, 0)
            # now: claims come out of the stopping memory first, only the rest out of the free
            free[node_id] = (node_free - max(0, claimed - stopping) if now
                             else node_free + stopping - claimed + extra.get(node_id, 0))
        return free


def reclaimable_bytes(state: ClusterState) -> dict[str, int]:
    """Node -> GPU memory that stopping workers and idle endpoints hold: what a cold start
    could get there by waiting for stops or by evicting (for callers that must know whether
    a placement is possible at all)."""
    held: dict[str, int] = {}
    idle = {e.endpoint_id for e in idle_endpoints(state)}
    for worker in state.workers.values():
        if worker.state is WorkerStatus.STOPPING or worker.endpoint_id in idle:
            _add(held, worker.node_id, worker.gpu_memory_bytes)
    return held


def _add(totals: dict[str, int], node_id: str, num_bytes: int) -> None:
    totals[node_id] = totals.get(node_id, 0) + num_bytes
