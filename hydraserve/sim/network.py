"""Fetches sharing links (processor sharing) and the nodes' host-memory caches (LRU).

A transfer crosses a few links (its server's NIC, its storage node's egress); each link is
shared equally among the transfers crossing it, and a transfer moves at the smallest of its
shares. Shares are recomputed whenever a transfer starts or ends. Leftover capacity of a link
whose transfers are held back elsewhere is not handed to the others (no max-min fairness).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class _Transfer:
    transfer_id: int
    num_bytes: float
    links: tuple[str, ...]
    remaining: float
    rate: float = 0.0


class Network:
    def __init__(self) -> None:
        self._capacity: dict[str, float] = {}
        self._users: dict[str, set[int]] = {}
        self._transfers: dict[int, _Transfer] = {}
        self._at = 0.0

    def add_link(self, name: str, bytes_per_s: float) -> None:
        if bytes_per_s <= 0:
            raise ValueError(f"link {name!r}: bandwidth must be > 0, got {bytes_per_s}")
        self._capacity[name] = bytes_per_s
        self._users[name] = set()

    def start(self, transfer_id: int, num_bytes: float, links: Iterable[str], now: float) -> None:
        self._advance(now)
        transfer = _Transfer(transfer_id, num_bytes, tuple(links), remaining=num_bytes)
        self._transfers[transfer_id] = transfer
        for link in transfer.links:
            self._users[link].add(transfer_id)
        self._reshare()

    def cancel(self, transfer_id: int, now: float) -> None:
        if transfer_id in self._transfers:
            self._advance(now)
            self._remove(transfer_id)
            self._reshare()

    def pop_done(self, now: float) -> list[int]:
        """The transfers whose last byte is in by `now`, in id order; they leave the links."""
        self._advance(now)
        done = sorted(t.transfer_id for t in self._transfers.values()
                      if t.remaining <= max(1.0, 1e-9 * t.num_bytes))
        for transfer_id in done:
            self._remove(transfer_id)
        if done:
            self._reshare()
        return done

    def next_done_at(self) -> float | None:
        times = [self._at + t.remaining / t.rate for t in self._transfers.values() if t.rate > 0]
        return min(times, default=None)

    def rate_of(self, transfer_id: int) -> float:
        return self._transfers[transfer_id].rate

    def _advance(self, now: float) -> None:
        elapsed = now - self._at
        if elapsed > 0:
            for transfer in self._transfers.values():
                transfer.remaining = max(0.0, transfer.remaining - transfer.rate * elapsed)
        self._at = max(self._at, now)

    def _remove(self, transfer_id: int) -> None:
        transfer = self._transfers.pop(transfer_id)
        for link in transfer.links:
            self._users[link].discard(transfer_id)

    def _reshare(self) -> None:
        for transfer in self._transfers.values():
            transfer.rate = min(self._capacity[link] / len(self._users[link])
                                for link in transfer.links)


class HostCache:
    """One server's host-memory cache: partitions (`<model>/<degree>/<stage>`) by recency."""

    def __init__(self, capacity_bytes: float) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, float] = OrderedDict()

    def keys(self) -> frozenset[str]:
        return frozenset(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def touch(self, key: str) -> None:
        self._entries.move_to_end(key)

    def add(self, key: str, num_bytes: float) -> bool:
        """Keep the partition, evicting least recently used ones; True if the keys changed."""
        if num_bytes > self.capacity_bytes:
            return False
        if key in self._entries:
            self._entries.move_to_end(key)
            return False
        self._entries[key] = num_bytes
        while sum(self._entries.values()) > self.capacity_bytes:
            self._entries.popitem(last=False)
        return True
