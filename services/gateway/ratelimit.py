"""Per-tenant limits: requests per minute, tokens per minute and requests in flight.

Each limited subject (a tenant, or a key from the settings) has two sliding windows of the
last 60 s — admitted requests, and tokens (the prompt's estimate at admission, completion
tokens as they stream in) — and a count of requests in flight. A request is admitted when all
three have room; then it counts in all three, and its `Lease` takes the completion tokens and
frees its concurrency slot when the request ends, however it ends. A refused request counts
nowhere and gets a `RateLimitError` (429) whose `retry_after_s` is when the window that refused
it will have room.

The state lives in this process: with several gateway replicas each enforces the limits on
its own share of the traffic (docs/TENANTS.md).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from libs.common.errors import HydraError
from libs.common.settings import GatewaySettings

WINDOW_S = 60.0
# completion tokens arriving within this long of the window's last entry join that entry,
# so a long answer costs a few entries rather than one per token
_COALESCE_S = 1.0
# what a refusal by the concurrency quota suggests: slots free when requests end
_CONCURRENCY_RETRY_AFTER_S = 1
# idle subjects are forgotten every this many admissions
_SWEEP_EVERY = 1024


class RateLimitError(HydraError):
    """A tenant is over one of its limits: 429 with `Retry-After`."""

    code = "rate_limit_exceeded"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int, limit_type: str) -> None:
        super().__init__(message)
        # whole seconds until the limit that refused the request has room
        self.retry_after_s = retry_after_s
        # OpenAI's error `type`: "requests" (rate or concurrency) or "tokens"
        self.limit_type = limit_type


@dataclass(frozen=True)
class Limits:
    """A subject's limits; None: no limit (or, on a tenant, the gateway's default)."""

    max_requests_per_minute: int | None = None
    max_tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None

    def or_defaults(self, defaults: Limits) -> Limits:
        """These limits with every unset one taken from `defaults`."""
        return Limits(
            max_requests_per_minute=_first(self.max_requests_per_minute,
                                           defaults.max_requests_per_minute),
            max_tokens_per_minute=_first(self.max_tokens_per_minute,
                                         defaults.max_tokens_per_minute),
            max_concurrent_requests=_first(self.max_concurrent_requests,
                                           defaults.max_concurrent_requests))


def default_limits(settings: GatewaySettings) -> Limits:
    return Limits(max_requests_per_minute=settings.default_max_requests_per_minute,
                  max_tokens_per_minute=settings.default_max_tokens_per_minute,
                  max_concurrent_requests=settings.default_max_concurrent_requests)


def estimate_prompt_tokens(*, prompt: str | None = None,
                           prompt_token_ids: Sequence[int] | None = None,
                           message_texts: Sequence[str] = ()) -> int:
    """The prompt's tokens as the gateway (which does not tokenize) guesses them: the ids
    given, or about 4 characters a token, and 4 tokens of chat template per message."""
    if prompt_token_ids is not None:
        return len(prompt_token_ids)
    if prompt is not None:
        return math.ceil(len(prompt) / 4)
    return sum(math.ceil(len(text) / 4) + 4 for text in message_texts)


class _Window:
    """Amounts timestamped in the last WINDOW_S seconds, oldest first."""

    def __init__(self) -> None:
        # [time, amount]
        self._entries: deque[list[float]] = deque()
        self.total = 0.0

    def expire(self, now: float) -> None:
        while self._entries and self._entries[0][0] <= now - WINDOW_S:
            self.total -= self._entries.popleft()[1]

    def add(self, now: float, amount: float, *, coalesce_s: float = 0.0) -> None:
        if amount <= 0:
            return
        if self._entries and now - self._entries[-1][0] < coalesce_s:
            self._entries[-1][1] += amount
        else:
            self._entries.append([now, amount])
        self.total += amount

    def seconds_until_room(self, now: float, *, limit: int, amount: float) -> float:
        """How long until `total + amount <= limit` as entries expire (after `expire(now)`)."""
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        for at, entry_amount in self._entries:
            excess -= entry_amount
            if excess <= 0:
                return at + WINDOW_S - now
        return WINDOW_S  # more than the limit even in an empty window

    @property
    def is_empty(self) -> bool:
        return not self._entries


@dataclass
class _Usage:
    requests: _Window = field(default_factory=_Window)
    tokens: _Window = field(default_factory=_Window)
    in_flight: int = 0


class Lease:
    """An admitted request's hold on its subject's limits."""

    def __init__(self, usage: _Usage | None, clock: Callable[[], float], *,
                 prompt_tokens: int) -> None:
        # None: an unlimited subject (the admin key)
        self._usage = usage
        self._clock = clock
        # the prompt's estimate charged at admission
        self.prompt_tokens = prompt_tokens
        self.is_released = False

    def charge(self, num_tokens: int) -> None:
        """Count `num_tokens` more tokens against the tokens-per-minute window."""
        if self._usage is not None:
            self._usage.tokens.add(self._clock(), num_tokens, coalesce_s=_COALESCE_S)

    def release(self) -> None:
        """The request has ended: free its concurrency slot (idempotent)."""
        if self._usage is not None and not self.is_released:
            self._usage.in_flight -= 1
        self.is_released = True


class RateLimiter:
    """The limits of every subject, enforced in this process."""

    def __init__(self, defaults: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._defaults = defaults
        self._clock = clock
        self._usage: dict[str, _Usage] = {}
        self._num_admitted = 0

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> RateLimiter:
        return cls(default_limits(settings))

    def in_flight(self, subject: str) -> int:
        usage = self._usage.get(subject)
        return usage.in_flight if usage is not None else 0

    def admit(self, subject: str | None, limits: Limits | None, *,
              prompt_tokens: int) -> Lease:
        """A lease for one request of `subject` (None: unlimited) whose prompt is about
        `prompt_tokens` long; RateLimitError if any of its limits has no room."""
        if subject is None:
            return Lease(None, self._clock, prompt_tokens=prompt_tokens)
        effective = (limits or Limits()).or_defaults(self._defaults)
        now = self._clock()
        usage = self._usage.setdefault(subject, _Usage())
        usage.requests.expire(now)
        usage.tokens.expire(now)
        _check(usage, effective, now, prompt_tokens)
        usage.requests.add(now, 1)
        usage.tokens.add(now, prompt_tokens)
        usage.in_flight += 1
        self._num_admitted += 1
        if self._num_admitted % _SWEEP_EVERY == 0:
            self._sweep(now)
        return Lease(usage, self._clock, prompt_tokens=prompt_tokens)

    def _sweep(self, now: float) -> None:
        for subject, usage in list(self._usage.items()):
            usage.requests.expire(now)
            usage.tokens.expire(now)
            if usage.in_flight == 0 and usage.requests.is_empty and usage.tokens.is_empty:
                del self._usage[subject]


def _check(usage: _Usage, limits: Limits, now: float, prompt_tokens: int) -> None:
    if (limit := limits.max_concurrent_requests) is not None and usage.in_flight >= limit:
        raise RateLimitError(
            f"Too many requests in flight: the limit is {limit} at a time. Retry when one "
            "of them has finished.", retry_after_s=_CONCURRENCY_RETRY_AFTER_S,
            limit_type="requests")
    if (limit := limits.max_requests_per_minute) is not None:
        wait = usage.requests.seconds_until_room(now, limit=limit, amount=1)
        if wait > 0:
            raise RateLimitError(
                f"Rate limit reached for requests: the limit is {limit} per minute. "
                f"Please try again in {_whole(wait)}s.", retry_after_s=_whole(wait),
                limit_type="requests")
    if (limit := limits.max_tokens_per_minute) is not None:
        if prompt_tokens > limit:
            raise RateLimitError(
                f"Request too large for tokens per minute: the limit is {limit}, the prompt "
                f"is about {prompt_tokens} tokens.", retry_after_s=_whole(WINDOW_S),
                limit_type="tokens")
        wait = usage.tokens.seconds_until_room(now, limit=limit, amount=prompt_tokens)
        if wait > 0:
            raise RateLimitError(
                f"Rate limit reached for tokens: the limit is {limit} per minute, "
                f"{math.ceil(usage.tokens.total)} used, this prompt is about {prompt_tokens}. "
                f"Please try again in {_whole(wait)}s.", retry_after_s=_whole(wait),
                limit_type="tokens")


def _whole(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _first(value: int | None, default: int | None) -> int | None:
    return value if value is not None else default
