"""The lifecycle states stored in the database, shared with the scheduler's pure policy.

Standard library only: the policy and the simulator import these without SQLAlchemy.
"""

from __future__ import annotations

from enum import StrEnum


class NodeStatus(StrEnum):
    UP = "up"
    # missed heartbeats for longer than the scheduler's timeout, or reported gone
    DOWN = "down"


class EndpointStatus(StrEnum):
    # written by a scheduler before its placement commands are acknowledged
    PLANNED = "planned"
    STARTING = "starting"
    READY = "ready"
    # its workers were told to stop (scale to zero or a broken pipeline)
    DRAINING = "draining"
    STOPPED = "stopped"


class WorkerStatus(StrEnum):
    # placed: weights being fetched, process starting
    STARTING = "starting"
    READY = "ready"
    # told to stop; still holds its GPU memory until the node agent reports it gone
    STOPPING = "stopping"
    STOPPED = "stopped"


LIVE_ENDPOINT_STATUSES = frozenset(
    {EndpointStatus.PLANNED, EndpointStatus.STARTING, EndpointStatus.READY}
)
