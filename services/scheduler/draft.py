"""A copy-on-write working copy of a ClusterState, private to one `decide` call.

Handlers edit the draft in place for readability; only the mappings they write are copied,
and `freeze()` returns a new ClusterState sharing everything untouched with the old one, so
`decide` stays a pure function of its arguments.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Generic, TypeVar

from services.scheduler.events import Command
from services.scheduler.state import ClusterState, Fetch, NodeState, WorkerState

K = TypeVar("K")
V = TypeVar("V")


class CowMap(Generic[K, V]):
    """A mapping that copies its base on the first write."""

    def __init__(self, base: Mapping[K, V]) -> None:
        self._base = base
        self._own: dict[K, V] | None = None

    @property
    def view(self) -> Mapping[K, V]:
        return self._base if self._own is None else self._own

    def __getitem__(self, key: K) -> V:
        return self.view[key]

    def __contains__(self, key: object) -> bool:
        return key in self.view

    def get(self, key: K) -> V | None:
        return self.view.get(key)

    def values(self) -> Iterator[V]:
        return iter(list(self.view.values()))

    def __setitem__(self, key: K, value: V) -> None:
        self._writable()[key] = value

    def pop(self, key: K) -> V:
        return self._writable().pop(key)

    def _writable(self) -> dict[K, V]:
        if self._own is None:
            self._own = dict(self._base)
        return self._own


class Draft:
    def __init__(self, state: ClusterState) -> None:
        self.models = CowMap(state.models)
        self.nodes = CowMap(state.nodes)
        self.endpoints = CowMap(state.endpoints)
        self.workers = CowMap(state.workers)
        self.requests = CowMap(state.requests)
        self.next_endpoint_id = state.next_endpoint_id
        self.next_worker_id = state.next_worker_id
        self.calibration = state.calibration
        self.commands: list[Command] = []

    def freeze(self) -> ClusterState:
        return ClusterState(models=self.models.view, nodes=self.nodes.view,
                            endpoints=self.endpoints.view, workers=self.workers.view,
                            requests=self.requests.view, next_endpoint_id=self.next_endpoint_id,
                            next_worker_id=self.next_worker_id, calibration=self.calibration)

    def new_endpoint_id(self) -> int:
        self.next_endpoint_id += 1
        return self.next_endpoint_id - 1

    def new_worker_id(self) -> int:
        self.next_worker_id += 1
        return self.next_worker_id - 1

    def add_worker(self, worker: WorkerState, fetch: Fetch) -> None:
        """Record a placed worker: its node gives up the memory and starts the fetch (none
        when the node has the bytes in its host-memory cache: the NIC stays free)."""
        node = self.nodes[worker.node_id]
        self.workers[worker.worker_id] = worker
        fetches = (*node.fetches, fetch) if fetch.num_bytes > 0 else node.fetches
        self.nodes[node.node_id] = replace(
            node, free_gpu_memory_bytes=node.free_gpu_memory_bytes - worker.gpu_memory_bytes,
            fetches=fetches)

    def remove_worker(self, worker_id: int) -> WorkerState:
        """Forget a worker that is gone: its node gets the memory back, its fetch ends."""
        worker = self.workers.pop(worker_id)
        node = self.nodes[worker.node_id]
        self.nodes[node.node_id] = replace(
            node, free_gpu_memory_bytes=node.free_gpu_memory_bytes + worker.gpu_memory_bytes,
            fetches=_without_fetch(node, worker_id))
        return worker

    def end_fetch(self, worker: WorkerState) -> None:
        node = self.nodes[worker.node_id]
        if any(f.worker_id == worker.worker_id for f in node.fetches):
            self.nodes[node.node_id] = replace(node, fetches=_without_fetch(node,
                                                                            worker.worker_id))

    def workers_of(self, endpoint_id: int) -> list[WorkerState]:
        return sorted((w for w in self.workers.values() if w.endpoint_id == endpoint_id),
                      key=lambda w: w.worker_id)


def _without_fetch(node: NodeState, worker_id: int) -> tuple[Fetch, ...]:
    return tuple(f for f in node.fetches if f.worker_id != worker_id)
