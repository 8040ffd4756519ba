"""``least_connections``: fewest in-flight requests per unit of weight.

Theory of operation. The score of an upstream is ``active / weight`` (nginx
``least_conn``). Ties are broken by rotation, so equal upstreams take turns instead of
the first one taking every request.

- Fast path, O(1): a cursor walks nginx's smooth weighted round-robin order; the
  first idle upstream among its next ``PROBES`` turns is the answer. Zero is the
  lowest possible score, so it is a correct one, and while the pool is lightly loaded
  the picks follow the weighted round robin exactly (nginx breaks ties the same way).
- Otherwise the ``active`` counters are scanned for the lowest score; the first lowest
  at or after ``next`` wins and ``next`` moves just past it, so a set of tied
  upstreams is served in turn (HAProxy's round robin within a load level). Upstreams
  are grouped by weight at construction, so the scan is one list comprehension and
  one ``min`` per weight (C speed); with many distinct weights it divides each count
  by its weight instead.

The scan is the one O(n) pick among the balancers: the counters change when requests
end, which no balancer sees, so they cannot be kept in an index. With 100 upstreams it
costs a few microseconds; a release hook from the forwarding layer would allow a heap.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.balancing.base import RequestView, effective_weights, integer_weights
from proxy.balancing.weighted_round_robin import smooth_schedule

#: Turns looked at for an idle upstream before scanning every counter.
PROBES = 4
#: Group by weight only where groups average at least this many upstreams (or there is
#: one weight): otherwise one scan of ``active / weight`` is cheaper.
MIN_GROUP_SIZE = 4


class WeightGroup:
    """The upstreams of one weight: their lowest in-flight count is one C-speed ``min``."""

    __slots__ = ("indices", "members", "weight")

    def __init__(self, weight: float, indices: list[int], members: list[Any]) -> None:
        self.weight = weight
        self.indices = indices  # ascending positions in the balancer's list
        self.members = tuple(members)

    def lowest(self, start: int) -> tuple[int, int]:
        """The lowest ``active`` and the position of its first holder at/after ``start``."""
        actives = [u.active for u in self.members]
        low = min(actives)
        try:
            k = actives.index(low, bisect_left(self.indices, start))
        except ValueError:
            k = actives.index(low)
        return low, self.indices[k]

    def __repr__(self) -> str:
        return f"<WeightGroup [weight {self.weight:g}, {len(self.members)} upstreams]>"


def weight_groups(targets: Sequence[Any], weights: Sequence[float]) -> list[WeightGroup]:
    by_weight: dict[float, list[int]] = {}
    for i, weight in enumerate(weights):
        by_weight.setdefault(weight, []).append(i)
    return [WeightGroup(w, ix, [targets[i] for i in ix]) for w, ix in by_weight.items()]


class LeastConnections:
    """Lowest ``active / weight``; ties in weighted round-robin turn."""

    __slots__ = ("_cursor", "_groups", "_next", "_order", "_targets", "_weights")

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
    ) -> None:
        self._targets = tuple(upstreams)
        self._weights = tuple(effective_weights(upstreams, weights))
        groups = weight_groups(self._targets, self._weights)
        few = len(groups) == 1 or len(self._targets) >= MIN_GROUP_SIZE * len(groups)
        self._groups = groups if few else []
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

    def _lowest(self, start: int) -> int:
        """Position of the first lowest score at or after ``start``, wrapping around."""
        groups = self._groups
        if len(groups) == 1:
            return groups[0].lowest(start)[1]
        if not groups:
            return self._scan(start)
        n = len(self._targets)
        best, best_key = 0, (float("inf"), n)
        for group in groups:
            low, i = group.lowest(start)
            key = (low / group.weight, (i - start) % n)
            if key < best_key:
                best, best_key = i, key
        return best

    def _scan(self, start: int) -> int:
        scores = [u.active / w for u, w in zip(self._targets, self._weights, strict=True)]
        low = min(scores)
        try:
            return scores.index(low, start)
        except ValueError:
            return scores.index(low)

    def __repr__(self) -> str:
        active = sum(u.active for u in self._targets)
        return (
            f"<LeastConnections [{len(self._targets)} upstreams, {active} active, "
            f"{len(self._groups) or 'many'} weight groups, "
            f"cursor {self._cursor}/{len(self._order)}, next {self._next}]>"
        )
