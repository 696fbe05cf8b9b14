"""The scheduler's metrics, updated from each decision: the state it left and what it sent."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from libs.common.db.enums import EndpointStatus, WorkerStatus
from libs.common.metrics import (
    COLD_STARTS,
    ENDPOINTS,
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_TOTAL,
    PLACEMENTS,
    QUEUED_REQUESTS,
    SCALE_OUTS,
    WORKERS,
)
from services.scheduler import events as policy_events
from services.scheduler.state import ClusterState


def record_decision(before: ClusterState, after: ClusterState,
                    commands: Sequence[policy_events.Command], *, policy: str) -> None:
    """Counters from the commands; gauges only for the parts of the state that changed."""
    for command in commands:
        if isinstance(command, policy_events.PlaceWorker):
            PLACEMENTS.labels(node=command.node_id).inc()
            if command.stage == 0:  # one per new endpoint
                started = SCALE_OUTS if command.is_scale_out else COLD_STARTS
                started.labels(policy=policy, degree=str(command.pipeline_degree)).inc()
    if before.requests is not after.requests or before.models is not after.models:
        queued = Counter(r.model for r in after.requests.values() if r.worker_id is None)
        for model in after.models:
            QUEUED_REQUESTS.labels(model=model).set(queued[model])
    if before.endpoints is not after.endpoints:
        by_state = Counter(e.state for e in after.endpoints.values())
        for state in EndpointStatus:
            ENDPOINTS.labels(state=state.value).set(by_state[state])
    if before.workers is not after.workers:
        by_state = Counter(w.state for w in after.workers.values())
        for state in WorkerStatus:
            WORKERS.labels(state=state.value).set(by_state[state])
    if before.nodes is not after.nodes or before.workers is not after.workers:
        for node in after.nodes.values():
            GPU_MEMORY_TOTAL.labels(node=node.node_id).set(node.gpu_memory_bytes)
            GPU_MEMORY_ALLOCATED.labels(node=node.node_id).set(
                node.gpu_memory_bytes - node.free_gpu_memory_bytes)
