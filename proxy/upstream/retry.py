"""When a failed attempt may be tried again, and how much retrying a pool may do.

``RetryPolicy`` is a pool's ``retries`` config in the form the exchange reads per
failure: booleans per condition, a set of statuses, the backoff. ``RetryBudget``
bounds retries per pool so that an outage of every upstream cannot multiply the load
on them (Finagle's retry budget). Two sources of tokens, a retry spending one:

- the *balance*: every request routed to the pool deposits ``percent``/100 of a token,
  and the balance decays towards zero with a ten-second time constant;
- the *reserve*: ``min_retries_per_second`` tokens a second (Finagle's
  ``minRetriesPerSec``), held up to one second's worth, so that a quiet or freshly
  started pool, which has earned no balance yet, can still retry.

The balance is spent first. Over any stretch of ``T`` seconds with ``N`` requests,
retries are at most ``percent`` % of ``N`` plus the reserve's ``rate * T`` (and the one
second's worth it starts with): attempts stay within about
``(1 + percent/100) * N + rate * T`` however many upstreams fail.

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
    from proxy.config import RetriesSpec

#: Methods RFC 9110 9.2.2 calls idempotent: safe to send twice.
IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))

BUDGET_TTL: Final = 10.0  # seconds: how long deposits count


class RetryBudget:
    __slots__ = (
        "balance",
        "capacity",
        "denied",
        "rate",
        "ratio",
        "seen",
        "spare",
        "ttl",
        "updated",
    )

    def __init__(self, percent: float, per_second: float, ttl: float = BUDGET_TTL) -> None:
        self.ttl = ttl
        self.ratio = self.rate = self.capacity = 0.0
        self.retune(percent, per_second)
        self.balance = 0.0  # deposits minus withdrawals, decaying towards 0
        self.spare = self.capacity  # the reserve's tokens: it starts full
        self.seen = 0  # the pool's request count at the last update
        self.updated = 0.0
        self.denied = 0  # retries refused, for the admin API

    def retune(self, percent: float, per_second: float) -> None:
        """New settings (a reload); what was deposited or spent stays."""
        self.ratio = percent / 100
        self.rate = per_second
        #: the reserve holds one second's worth, and at least one token when it is on
        self.capacity = max(per_second, 1.0) if per_second > 0 else 0.0

    def allow(self, requests: int, now: float) -> bool:
        """May one more retry start? ``requests``: the pool's requests so far. Spends."""
        if self.updated:
            elapsed = now - self.updated
            self.balance *= math.exp(-elapsed / self.ttl)
            self.spare = min(self.capacity, self.spare + elapsed * self.rate)
        self.updated = now
        self.balance += self.ratio * (requests - self.seen)
        self.seen = requests
        if self.balance >= 1:
            self.balance -= 1
        elif self.spare >= 1:
            self.spare -= 1
        else:
            self.denied += 1
            return False
        return True

    def available(self, requests: int, now: float) -> float:
        """Tokens for retries now, earned and reserve (each retry ``allow`` grants spends
        one), for the admin API: computed as ``allow`` would, changing nothing."""
        balance, spare = self.balance, self.spare
        if self.updated:
            elapsed = now - self.updated
            balance *= math.exp(-elapsed / self.ttl)
            spare = min(self.capacity, spare + elapsed * self.rate)
        return max(0.0, balance + self.ratio * (requests - self.seen)) + spare

    def __repr__(self) -> str:
        return (
            f"<RetryBudget [{self.balance:.1f} earned + {self.spare:.1f} reserve tokens, "
            f"{self.denied} denied]>"
        )


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

    def __init__(self, config: RetriesSpec) -> None:
        on = set(config.retry_on)
        self.attempts = config.attempts
        #: the named conditions (``ProxyError.condition`` values) that allow a retry
        self.conditions = frozenset(c for c in on if isinstance(c, str))
        self.statuses = frozenset(c for c in on if isinstance(c, int))
        self.backoff_base = config.backoff.base
        self.backoff_max = config.backoff.max
        self.buffer = config.buffer
        self.budget = RetryBudget(config.budget.percent, config.budget.min_retries_per_second)

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1, 2, ...): full jitter."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1))
        return random.uniform(0, ceiling) if ceiling > 0 else 0.0

    def __repr__(self) -> str:
        return f"<RetryPolicy [{self.attempts} attempts, {self.budget!r}]>"
