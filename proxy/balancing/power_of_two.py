"""``power_of_two``: the power of two choices (Envoy's least-request balancer).

Two independent weighted random draws; the upstream with fewer requests in flight
wins, the first draw on a tie. That is nearly as good as scanning every upstream for
the least loaded one, at the cost of two draws: O(log n), or O(1) with equal weights.
The draws may pick the same upstream twice (as Envoy's), so an upstream's share with
equal load is exactly its weight's share, and a busy upstream still gets a trickle.
"""

from __future__ import annotations

import random as _random
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.balancing.base import RequestView, effective_weights
from proxy.balancing.random import WeightedDraw


class PowerOfTwo:
    """Two weighted draws, fewer ``active`` wins; ``rng`` is for tests."""

    __slots__ = ("_draw", "_targets")

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
        *,
        rng: _random.Random | None = None,
    ) -> None:
        self._targets = tuple(upstreams)
        self._draw = WeightedDraw(effective_weights(upstreams, weights), rng)

    def pick(self, request: RequestView) -> Any | None:
        targets = self._targets
        if not targets:
            return None
        draw = self._draw.draw
        first = targets[draw()]
        second = targets[draw()]
        return second if second.active < first.active else first

    def __repr__(self) -> str:
        active = sum(u.active for u in self._targets)
        return f"<PowerOfTwo [{len(self._targets)} upstreams, {active} active]>"
