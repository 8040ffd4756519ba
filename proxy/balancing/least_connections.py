"""``least_connections``: fewest in-flight requests per unit of weight.

Theory of operation. The score of an upstream is ``active / weight`` (nginx
``least_conn``). Ties are broken by rotation, so equal upstreams take turns instead of
the first one taking every request.

- Fast path, O(1): a cursor walks nginx's smooth weighted round-robin order; the
  first idle upstream among its next ``PROBES`` turns (the next one only, in a pool
  that is scanned, below) is the answer. Zero is the lowest possible score, so it is
  a correct one, and while the pool is lightly loaded the picks follow the weighted
  round robin exactly (nginx breaks ties the same way).
- Otherwise the lowest score wins: the first lowest at or after ``next``, which then
  moves just past it, so tied upstreams are served in turn (HAProxy's round robin
  within a load level). In a pool of up to ``SCAN_LIMIT`` upstreams the pick computes
  the scores as it walks them. In a larger pool they live in one list that the pool
  keeps current through ``on_active_change`` (called whenever a request starts or ends
  on an upstream), so a pick is one C-speed ``min`` and ``index`` over floats, not a
  walk over upstreams; small pools go without the hook, which would cost two calls on
  every request to save less than it costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from proxy.balancing.base import RequestView, effective_weights, integer_weights
from proxy.balancing.weighted_round_robin import smooth_schedule

#: Turns looked at for an idle upstream before scanning every counter.
PROBES = 4
#: Pools up to this size are scanned at pick time instead of indexed.
SCAN_LIMIT = 8


class LeastConnections:
    """Lowest ``active / weight``; ties in weighted round-robin turn."""

    __slots__ = (
        "_cursor",
        "_index",
        "_next",
        "_order",
        "_scores",
        "_targets",
        "_weights",
        "on_active_change",
    )

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
    ) -> None:
        self._targets = tuple(upstreams)
        self._weights = tuple(effective_weights(upstreams, weights))
        self._index = {u: i for i, u in enumerate(self._targets)}
        self._scores = [u.active / w for u, w in zip(self._targets, self._weights, strict=True)]
        #: the pool's hook, called after ``upstream.active`` changed; None: not needed
        self.on_active_change: Callable[[Any], None] | None = (
            self._track if len(self._targets) > SCAN_LIMIT else None
        )
        order = smooth_schedule(integer_weights(self._weights)) if self._targets else []
        self._order: tuple[int, ...] = tuple(order or range(len(self._targets)))
        self._cursor = 0  # position in ``_order``: the fast path's weighted turn
        self._next = 0  # index in ``_targets``: where the scan starts looking for ties

    def pick(self, request: RequestView) -> Any | None:
        order = self._order
        if not order:
            return None
        pos = self._cursor
        self._cursor = pos + 1 if pos + 1 < len(order) else 0
        candidate = self._targets[order[pos]]
        if not candidate.active:  # the common case, inline
            return candidate
        if self.on_active_change is None:  # a small pool: one scan finds an idle one too
            best = self._scan(self._next)
        else:
            candidate = self._later_idle(order)
            if candidate is not None:
                return candidate
            best = self._lowest(self._next)
        self._next = best + 1
        return self._targets[best]

    def _later_idle(self, order: tuple[int, ...]) -> Any | None:
        """The first idle upstream in the turns after the cursor's first (``PROBES`` in
        all), the cursor moved past it; None and the cursor unmoved if all are busy."""
        targets, size = self._targets, len(order)
        pos = self._cursor
        for _ in range(min(PROBES, size) - 1):
            candidate = targets[order[pos]]
            pos = pos + 1 if pos + 1 < size else 0
            if not candidate.active:
                self._cursor = pos
                return candidate
        return None

    def _track(self, upstream: Any) -> None:
        """``on_active_change`` of an indexed pool: keep the score list current."""
        i = self._index.get(upstream)
        if i is not None:
            self._scores[i] = upstream.active / self._weights[i]

    def _scan(self, start: int) -> int:
        """Position of the first lowest score at or after ``start``, wrapping around,
        computed from the upstreams (a small pool)."""
        targets, weights = self._targets, self._weights
        n = len(targets)
        best = start if start < n else 0
        low = targets[best].active / weights[best]
        i = best
        for _ in range(n - 1):
            i = i + 1 if i + 1 < n else 0
            score = targets[i].active / weights[i]
            if score < low:
                low, best = score, i
        return best

    def _lowest(self, start: int) -> int:
        """Position of the first lowest score at or after ``start``, wrapping around."""
        scores = self._scores
        low = min(scores)
        try:
            return scores.index(low, start)
        except ValueError:
            return scores.index(low)

    def __repr__(self) -> str:
        active = sum(u.active for u in self._targets)
        return (
            f"<LeastConnections [{len(self._targets)} upstreams, {active} active, "
            f"cursor {self._cursor}/{len(self._order)}, next {self._next}]>"
        )
