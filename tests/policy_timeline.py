"""For the policy tests: nodes and clusters to start from, and feeding a timeline of events to
a policy."""

from __future__ import annotations

from collections.abc import Sequence

from libs.common.db.enums import NodeStatus
from services.scheduler.events import Command, Event, PlaceWorker
from services.scheduler.policy import Policy
from services.scheduler.state import ClusterState, Fetch, ModelSpec, NodeState

GB = 10**9
GBPS = 10**9 // 8  # bytes per second in one gigabit per second


def node_state(node_id: str, gpu_gb: int, *, nic_gbps: int = 16, last_heartbeat: float = 0.0,
               fetches: tuple[Fetch, ...] = (), nic_id: str = "") -> NodeState:
    """An UP A10 node with all of its `gpu_gb` free (`nic_id`: the NIC it shares)."""
    return NodeState(node_id=node_id, gpu_type="A10", gpu_memory_bytes=gpu_gb * GB,
                     free_gpu_memory_bytes=gpu_gb * GB, nic_bandwidth_bytes_per_s=nic_gbps * GBPS,
                     state=NodeStatus.UP, last_heartbeat=last_heartbeat, fetches=fetches,
                     nic_id=nic_id)


def cluster(models: Sequence[ModelSpec], nodes: Sequence[NodeState]) -> ClusterState:
    return ClusterState(models={m.name: m for m in models}, nodes={n.node_id: n for n in nodes})


def run_balanced(policy: Policy, state: ClusterState, timeline: Sequence[tuple[float, Event]]
                 ) -> tuple[ClusterState, list[Command]]:
    """Feed events in order; every intermediate state must keep its memory books balanced."""
    commands: list[Command] = []
    for now, event in timeline:
        state, new_commands = policy.decide(state, event, now)
        for node in state.nodes.values():
            used = sum(w.gpu_memory_bytes for w in state.workers_on(node.node_id))
            assert node.free_gpu_memory_bytes == node.gpu_memory_bytes - used, node
        commands += new_commands
    return state, commands


def place_whole(worker_id: int, node_id: str, model: ModelSpec, *,
                endpoint_id: int | None = None) -> PlaceWorker:
    """The placement of one whole-model worker (degree 1) of `model`, in endpoint
    `endpoint_id` (default: numbered like the worker)."""
    return PlaceWorker(worker_id=worker_id,
                       endpoint_id=worker_id if endpoint_id is None else endpoint_id,
                       node_id=node_id, model=model.name, pipeline_degree=1, stage=0,
                       start_layer=0, end_layer=model.num_layers,
                       gpu_memory_bytes=model.size_bytes + model.kv_cache_bytes,
                       is_full_size=True)
