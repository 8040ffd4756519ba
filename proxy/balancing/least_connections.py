"""``least_connections``: fewest in-flight requests per unit of weight.

Theory of operation. The score of an upstream is ``active / weight`` (nginx
``least_conn``). Ties are broken by rotation, so equal upstreams take turns instead of
the first one taking every request.

- Fast path, O(1): a cursor walks nginx's smooth weighted round-robin order; the
  first idle upstream among its next ``PROBES`` turns is the answer. Zero is the
  lowest possible score, so it is a correct one, and while the pool is lightly loaded
  the picks follow the weighted round robin exactly (nginx breaks ties the same way).
- Otherwise the lowest score wins: the first lowest at or after ``next``, which then
  moves just past it, so tied upstreams are served in turn (HAProxy's round robin
  within a load level). Scores live in one list that the pool keeps current through
  ``on_active_change`` (called whenever a request starts or ends on an upstream), so a
  pick is one C-speed ``min`` and ``index`` over floats, not a walk over upstreams.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.balancing.base import RequestView, effective_weights, integer_weights
from proxy.balancing.weighted_round_robin import smooth_schedule

#: Turns looked at for an idle upstream before scanning every counter.
PROBES = 4
class LeastConnections:
    """Lowest ``active / weight``; ties in weighted round-robin turn."""

    __slots__ = ("_cursor", "_index", "_next", "_order", "_scores", "_targets", "_weights")

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

    def on_active_change(self, upstream: Any) -> None:
        """The pool's hook: ``upstream.active`` just changed."""
        i = self._index.get(upstream)
        if i is not None:
            self._scores[i] = upstream.active / self._weights[i]

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
