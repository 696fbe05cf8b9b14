"""Feeding a timeline of events to a policy, for the policy tests."""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.events import Command, Event
from services.scheduler.policy import Policy
from services.scheduler.state import ClusterState


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
