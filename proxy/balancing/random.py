"""``random``: weighted random choice, independent per pick.

One uniform draw scaled to the total weight, located in the running totals of the
weights by bisection: O(log n), C speed. Equal weights skip the bisection. Each
upstream's long-run share is its weight over the total; short runs are as lumpy as
chance makes them (use ``weighted_round_robin`` for an even spread).
"""

from __future__ import annotations

import random as _random
from bisect import bisect
from collections.abc import Callable, Mapping, Sequence
from itertools import accumulate
from typing import Any

from proxy.balancing.base import RequestView, effective_weights


class WeightedDraw:
    """Draw one index with probability ``weight / total``: the core of two balancers."""

    __slots__ = ("_bounds", "_equal", "_random", "_total", "size")

    def __init__(self, weights: Sequence[float], rng: _random.Random | None = None) -> None:
        self.size = len(weights)
        self._equal = len(set(weights)) <= 1
        self._bounds = list(accumulate(weights))
        self._total = self._bounds[-1] if weights else 0.0
        self._random: Callable[[], float] = (rng or _random).random

    def draw(self) -> int:
        """An index in ``range(size)``; ``size`` must be at least 1."""
        if self._equal:
            return int(self._random() * self.size)
        i = bisect(self._bounds, self._random() * self._total)
        return i if i < self.size else self.size - 1  # float rounding at the very top

    def __repr__(self) -> str:
        kind = "equal" if self._equal else f"total {self._total:g}"
        return f"<WeightedDraw [{self.size} weights, {kind}]>"


class WeightedRandom:
    """Weighted random; ``rng`` is for tests (default: the ``random`` module)."""

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
        if not self._targets:
            return None
        return self._targets[self._draw.draw()]

    def __repr__(self) -> str:
        return f"<WeightedRandom [{len(self._targets)} upstreams, {self._draw!r}]>"
