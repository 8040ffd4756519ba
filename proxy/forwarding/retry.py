"""When a failed attempt may be tried again, and how much retrying a pool may do.

``RetryPolicy`` is a pool's ``retries`` config in the form the exchange reads per
failure: booleans per condition, a set of statuses, the backoff. ``RetryBudget``
bounds retries per pool so that an outage of every upstream cannot multiply the load
on them: a retry spends one token; every request routed to the pool deposits
``percent``/100 of one; the balance decays towards zero with a ten-second time
constant (Finagle's retry budget), and ``min_retries`` tokens are always in reserve
so that a quiet pool can retry at all. Over any stretch of time, retries are at most
``percent`` % of the requests plus the reserve: attempts stay within about
``(1 + percent/100)`` times the client requests however many upstreams fail.

Envoy's budget counts *concurrent* retries instead. Why not here: when an upstream
dies, every request in flight on it (a third of them, with three upstreams) needs a
retry in the same instant, more than 20% of the requests in flight, so that budget
would fail requests the surviving upstreams could serve; a balance accumulated over
seconds of traffic absorbs that burst and still caps a sustained storm.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from proxy.config import Retries

#: Methods RFC 9110 9.2.2 calls idempotent: safe to send twice.
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

BUDGET_TTL: Final = 10.0  # seconds: how long deposits count


class RetryBudget:
    __slots__ = ("balance", "denied", "ratio", "reserve", "seen", "ttl", "updated")

    def __init__(self, percent: float, reserve: int, ttl: float = BUDGET_TTL) -> None:
        self.ratio = percent / 100
        self.reserve = reserve
        self.ttl = ttl
        self.balance = 0.0  # deposits minus withdrawals, decaying towards 0
        self.seen = 0  # the pool's request count at the last update
        self.updated = 0.0
        self.denied = 0  # retries refused, for the admin API

    def allow(self, requests: int, now: float) -> bool:
        """May one more retry start? ``requests``: the pool's requests so far. Spends."""
        if self.updated:
            self.balance *= math.exp(-(now - self.updated) / self.ttl)
        self.updated = now
        self.balance += self.ratio * (requests - self.seen)
        self.seen = requests
        if self.reserve + self.balance < 1:
            self.denied += 1
            return False
        self.balance -= 1
        return True

    def available(self, requests: int, now: float) -> float:
        """Retries ``allow`` would grant now, for the admin API (changes nothing)."""
        balance = self.balance
        if self.updated:
            balance *= math.exp(-(now - self.updated) / self.ttl)
        return max(0.0, self.reserve + balance + self.ratio * (requests - self.seen))

    def __repr__(self) -> str:
        return f"<RetryBudget [{self.reserve + self.balance:.1f} tokens, {self.denied} denied]>"


class RetryPolicy:
    """A pool's ``retries`` config, ready for the exchange."""

    __slots__ = (
        "attempts",
        "backoff_base",
        "backoff_max",
        "budget",
        "buffer",
        "conditions",
        "statuses",
    )

    def __init__(self, config: Retries) -> None:
        on = set(config.retry_on)
        self.attempts = config.attempts
        #: the named conditions (``ProxyError.condition`` values) that allow a retry
        self.conditions = frozenset(c for c in on if isinstance(c, str))
        self.statuses = frozenset(c for c in on if isinstance(c, int))
        self.backoff_base = config.backoff.base
        self.backoff_max = config.backoff.max
        self.buffer = config.buffer
        self.budget = RetryBudget(config.budget.percent, config.budget.min_retries)

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): full jitter."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1))
        return random.uniform(0, ceiling) if ceiling > 0 else 0.0

    def __repr__(self) -> str:
        return f"<RetryPolicy [{self.attempts} attempts, {self.budget!r}]>"
