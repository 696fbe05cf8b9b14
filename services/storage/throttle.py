"""A token bucket in bytes per second, shared by every stream of a process (or a node).

It emulates a NIC: the storage service paces its responses with one (egress), and the node
agent paces what it receives with one (ingress). Callers take tokens in small pieces; waiters
are served in arrival order (asyncio.Lock is FIFO), so concurrent streams share the rate
fairly, piece by piece.
"""

from __future__ import annotations

import asyncio
import time

# Pieces up to this size keep each waiter's turn short (fairness) without making the pacing
# itself the bottleneck.
MAX_PIECE_BYTES = 1 << 20
MIN_PIECE_BYTES = 16 << 10


class TokenBucket:
    def __init__(self, rate_bytes_per_s: float, *, burst_bytes: int | None = None) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate must be positive, got {rate_bytes_per_s}")
        self.rate = float(rate_bytes_per_s)
        # at most this many bytes pass at once after an idle spell (~10 ms of traffic)
        self.burst = burst_bytes if burst_bytes is not None else self.piece_bytes
        # a full bucket would let the first `burst` bytes through unpaced; start empty so a
        # transfer of N bytes takes at least N / rate
        self._tokens = 0.0
        self._updated = time.monotonic()
        self._lock = asyncio.Lock()

    @property
    def piece_bytes(self) -> int:
        """A good size for the pieces callers take: ~10 ms of traffic, within bounds."""
        return int(min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, self.rate / 100)))

    async def acquire(self, num_bytes: int) -> None:
        """Wait until `num_bytes` may pass. The lock is held while waiting, which both keeps
        arrival order and lets one waiter run the bucket into debt it then sleeps off."""
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= num_bytes
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)
