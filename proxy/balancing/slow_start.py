"""Slow start: a newly available upstream's weight ramps from 10% to 100%.

HAProxy's ``slowstart`` and Envoy's slow start: an upstream that has just come back
(healthy again, enabled again, no longer ejected) starts with 10% of its weight and
reaches 100% linearly over ``duration``, so a cold cache or JIT is not flooded.

The pool owns one ``SlowStart`` and tells it, on every rebuild, which upstreams are
available (``update``). The upstreams present at the first update are the pool's
starting set and do not ramp (all of them ramping together would change nothing).
``weights`` gives the effective weights for the balancer, or None once nothing is
ramping; while something is, the pool rebuilds its balancer every ``step`` seconds
(from its periodic sweep), so the ramp advances in ten steps. Balancers themselves
stay static tables: they only ever see the weights they were built with.

It matters to the weighted algorithms (``weighted_round_robin``, ``least_connections``,
``random``, ``power_of_two``, ``consistent_hash``, ``ip_hash``, ``peak_ewma``);
``round_robin`` ignores weights. On a hash ring a ramping upstream grows its points
from a prefix of its final set, so keys move to it gradually and never away.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

START = 0.1  # the fraction of its weight an upstream starts with
STEPS = 10  # rebuilds over one ramp


def ramp(elapsed: float, duration: float) -> float:
    """The weight factor ``elapsed`` seconds into a ramp of ``duration`` seconds."""
    if elapsed >= duration:
        return 1.0
    return START + (1.0 - START) * max(0.0, elapsed) / duration


class SlowStart:
    """When each ramping upstream became available; the weights that follow from it."""

    __slots__ = ("_available", "_primed", "_since", "duration")

    def __init__(self, duration: float) -> None:
        if duration <= 0:
            raise ValueError("slow start duration must be > 0")
        self.duration = duration
        self._since: dict[Hashable, float] = {}
        self._available: set[Hashable] = set()
        self._primed = False

    @property
    def step(self) -> float:
        """Seconds between re-weighting rebuilds while a ramp runs."""
        return self.duration / STEPS

    def update(self, available: Iterable[Hashable], now: float) -> None:
        """Record which upstreams are available at ``now``: the new ones start ramping."""
        current = set(available)
        if self._primed:
            for upstream in current - self._available:
                self._since[upstream] = now
        self._primed = True
        self._available = current
        end = now - self.duration
        self._since = {u: t for u, t in self._since.items() if u in current and t > end}

    def factor(self, upstream: Hashable, now: float) -> float:
        since = self._since.get(upstream)
        return 1.0 if since is None else ramp(now - since, self.duration)

    def ramping(self, now: float) -> bool:
        end = now - self.duration
        return any(t > end for t in self._since.values())

    def weights(self, upstreams: Sequence[Any], now: float) -> list[float] | None:
        """Effective weights of ``upstreams`` at ``now``, or None if none is ramping."""
        if not self.ramping(now):
            return None
        return [u.weight * self.factor(u, now) for u in upstreams]

    def __repr__(self) -> str:
        return f"<SlowStart [{self.duration:g}s, {len(self._since)} ramping]>"
