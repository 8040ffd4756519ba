"""``weighted_round_robin``: nginx's smooth weighted round robin, precomputed.

Theory of operation. nginx keeps a ``current`` counter per upstream; each pick adds
every upstream's weight to its counter, takes the first upstream with the largest
counter and subtracts the total weight from it. Weights 5, 1, 1 give
``a a b a c a a``: each upstream's share is spread through the cycle, never a burst.
After ``sum(weights)`` picks every counter is back at zero, so the sequence is
periodic: we run the algorithm once at construction and each pick is one table read.

Weights are reduced to small integers first (``integer_weights``: tenths are kept for
slow-start ramps, the gcd divides out). If one period would cost too much to build
(``MAX_BUILD`` counter updates), picks fall back to earliest-deadline-first over a
heap (Envoy's weighted round robin): O(log n), the same shares, a different order.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.balancing.base import RequestView, effective_weights, integer_weights

#: Largest ``period * len(upstreams)`` built into a table (about 10 ms of work).
MAX_BUILD = 200_000


def smooth_schedule(weights: Sequence[int]) -> list[int] | None:
    """One period of nginx's smooth WRR as upstream indices, or None if too long."""
    period = sum(weights)
    if period * len(weights) > MAX_BUILD:
        return None
    current = [0] * len(weights)
    order: list[int] = []
    for _ in range(period):
        current = [c + w for c, w in zip(current, weights, strict=True)]
        best = current.index(max(current))  # the first of equals, as nginx
        current[best] -= period
        order.append(best)
    return order


class WeightedRoundRobin:
    """Smooth weighted turns: a table read per pick, or an EDF heap for huge periods."""

    __slots__ = ("_heap", "_next", "_order", "_steps", "_targets", "_weights")

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
    ) -> None:
        self._targets = tuple(upstreams)
        self._weights = integer_weights(effective_weights(upstreams, weights))
        schedule = smooth_schedule(self._weights) if self._targets else []
        self._order = tuple(self._targets[i] for i in schedule) if schedule is not None else ()
        self._next = 0
        self._steps = [1.0 / w for w in self._weights]
        self._heap: list[tuple[float, int]] = []
        if schedule is None:
            self._heap = [(step, i) for i, step in enumerate(self._steps)]
            heapq.heapify(self._heap)

    def pick(self, request: RequestView) -> Any | None:
        order = self._order
        if not order:
            return self._pick_edf()
        i = self._next
        if i >= len(order):
            i = 0
        self._next = i + 1
        return order[i]

    def _pick_edf(self) -> Any | None:
        heap = self._heap
        if not heap:
            return None
        deadline, i = heap[0]
        heapq.heapreplace(heap, (deadline + self._steps[i], i))
        return self._targets[i]

    def __repr__(self) -> str:
        mode = f"period {len(self._order)}, next {self._next}" if self._order else "edf"
        weights = ",".join(map(str, self._weights[:8])) + (",..." if len(self._weights) > 8 else "")
        return f"<WeightedRoundRobin [{len(self._targets)} upstreams, weights {weights}, {mode}]>"
