"""``peak_ewma``: latency-aware choice (Finagle's and Linkerd's peak EWMA).

Option: ``decay`` (seconds, default 10): how long the balancer remembers. Within one
decay time a latency change is fully learned and an upstream that recovered is back
to its fair share.

Theory of operation. For each upstream we keep ``cost``, a peak-sensitive moving
average of its response time (time to the response head, fed by the pool through
``observe``), and ``stamp``, when it was last updated. A pick compares the *load*
``cost * (active + 1) / weight`` of two distinct upstreams drawn at random (the power
of two choices, as Linkerd: O(1); with two upstreams that is both of them). The lower
load wins only if lower by more than 1/8: closer estimates are within the noise, and
taking the first draw then keeps equal upstreams at equal shares.

Peak-sensitive: a response slower than the cost replaces it at once; a faster one is
averaged in with weight ``1 - exp(-dt / T)``, ``dt`` being the time since the
upstream's previous update and ``T = decay / 5`` (Finagle uses ``T = decay``; with
ours, less than 1% of what came before one decay time ago is left).

Never starving. An upstream that answered slowly loses its traffic, so it produces no
new answers and its cost would stay high forever (Traefik's ``leasttime`` was reported
to stop sending to an identical upstream after a few slow responses). Here stale
knowledge fades: read ``dt`` after its last update, a cost is
``floor + (cost - floor) * (1 - 2 * dt / decay)``, reaching ``floor`` after half a
decay time, where ``floor`` is the lowest cost among upstreams updated within the
last decay time. A starved upstream soon looks as good as the best one, gets a
request, and the answer either restores its high cost (it is still slow: that costs
about one request per half decay time) or, being fast, replaces the faded estimate
(little of it is left by then). An upstream never measured reads as ``floor``; one
that joins a pool with history starts at the pool's median cost. The pool calls
``inherit`` on every rebuild, so all of this survives changes of the upstream set.

Cost per request. No balancer reads a clock: the pool passes the time to ``observe``
(the ``perf_counter`` the exchange read when the response head arrived) and to
``inherit``. A pick reads each upstream's faded cost, already divided by its weight,
from a list instead of computing the fade: ``observe`` stores a fresh cost there and,
every decay / 32, recomputes the floor and all faded costs. Fading thus moves in steps
of decay / 32 (and, with less than one response per step, waits for the next
response), which changes none of the above. With two upstreams a pick compares both
and, when neither is lower by the margin, they take turns: no random draw.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Mapping, Sequence
from math import exp
from typing import Any

from proxy.balancing.base import RequestView, effective_weights
from proxy.config.balancer import DEFAULT_DECAY

_REFRESHES = 32  # the floor and the faded costs are recomputed this often per decay
_EPSILON = 1e-6  # with no costs known yet, fewer in-flight requests still wins
_FADE_SPEED = 2.0  # what we learned fades to the floor within decay / _FADE_SPEED
_TIME_CONSTANTS = 5.0  # decay / _TIME_CONSTANTS is the moving average's time constant
_MARGIN = 1.125  # a load must be lower by more than this factor to count as lower
_NEVER = float("-inf")
_LINEAR = 0.01  # below this, 1 - exp(-x) is x within 0.5%: no exp() call


class Score:
    """What one upstream's answers have taught us."""

    __slots__ = ("cost", "stamp")

    def __init__(self, cost: float = 0.0, stamp: float = _NEVER) -> None:
        self.cost = cost  # seconds, peak-sensitive EWMA of time to the response head
        self.stamp = stamp  # clock time of the last update; -inf: never measured

    def __repr__(self) -> str:
        return f"<Score [cost {self.cost * 1000:.3f} ms, stamp {self.stamp:.3f}]>"


class PeakEwma:
    """Power of two choices on ``cost * (active + 1) / weight``; learns via ``observe``.

    ``rng`` is for tests.
    """

    __slots__ = (
        "_decay",
        "_fade_rate",
        "_faded",
        "_floor",
        "_forget_rate",
        "_index",
        "_inverse",
        "_last",
        "_random",
        "_refresh_due",
        "_scores",
        "_targets",
        "_turn",
        "_weighted",
    )

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
        *,
        rng: _random.Random | None = None,
    ) -> None:
        self._targets = tuple(upstreams)
        self._inverse = tuple(1.0 / w for w in effective_weights(upstreams, weights))
        self._decay = float(options.get("decay", DEFAULT_DECAY))
        if self._decay <= 0:
            raise ValueError("decay must be > 0")
        self._fade_rate = _FADE_SPEED / self._decay
        self._forget_rate = _TIME_CONSTANTS / self._decay
        self._random: Callable[[], float] = (rng or _random).random
        self._scores = tuple(Score() for _ in self._targets)
        self._index = {u: i for i, u in enumerate(self._targets)}
        #: each upstream's cost as picks read it: set by ``observe``, faded by ``_refresh``
        self._faded = [0.0] * len(self._targets)
        #: ``(faded + epsilon) / weight`` per upstream: a pick's load is this * (active + 1)
        self._weighted = [_EPSILON * inv for inv in self._inverse]
        self._floor = 0.0
        self._refresh_due = _NEVER
        self._last = _NEVER  # the latest time passed in (for ``repr``)
        self._turn = 0  # two upstreams with equal loads take turns

    # -- picking ---------------------------------------------------------------------

    def pick(self, request: RequestView) -> Any | None:
        targets, weighted = self._targets, self._weighted
        n = len(targets)
        if n == 2:
            a, b = targets
            load_a = weighted[0] * (a.active + 1)
            load_b = weighted[1] * (b.active + 1)
            if load_b * _MARGIN < load_a:
                return b
            if load_a * _MARGIN < load_b:
                return a
            self._turn = turn = 1 - self._turn
            return targets[turn]
        if n < 2:
            return targets[0] if n else None
        r = self._random() * n  # one draw for both: its fraction is uniform again
        i = int(r)
        j = int((r - i) * (n - 1))
        if j >= i:
            j += 1
        load_i = weighted[i] * (targets[i].active + 1)
        load_j = weighted[j] * (targets[j].active + 1)
        return targets[j] if load_j * _MARGIN < load_i else targets[i]

    def cost(self, score: Score, now: float) -> float:
        """``score``'s cost as of ``now``: faded toward the floor with time unmeasured."""
        fade = 1.0 - (now - score.stamp) * self._fade_rate
        if fade <= 0.0:
            return self._floor
        floor = self._floor
        return floor + (score.cost - floor) * fade

    def _refresh(self, now: float) -> None:
        """Recompute the floor and every faded cost (``_REFRESHES`` times per decay)."""
        since = now - self._decay
        recent = [s.cost for s in self._scores if s.stamp > since]
        if recent:
            self._floor = min(recent)
        self._faded = [self.cost(s, now) for s in self._scores]
        pairs = zip(self._faded, self._inverse, strict=True)
        self._weighted = [(faded + _EPSILON) * inverse for faded, inverse in pairs]
        self._refresh_due = now + self._decay / _REFRESHES

    # -- learning --------------------------------------------------------------------

    def observe(self, upstream: Any, seconds: float, now: float) -> None:
        """Learn from one response: ``seconds`` from the attempt's start to the response
        head, which arrived at ``now`` (``perf_counter``, read by the caller)."""
        i = self._index.get(upstream)
        if i is None:  # left this balancer while its request was in flight
            return
        score = self._scores[i]
        prior = self._faded[i]  # faded at the last refresh, at most decay / 32 ago
        if seconds >= prior:
            cost = seconds
        else:  # the new answer's weight is 1 - exp(-x); about x while x is small
            x = (now - score.stamp) * self._forget_rate
            cost = prior + (seconds - prior) * (x if x < _LINEAR else 1.0 - exp(-x))
        score.cost = self._faded[i] = cost
        self._weighted[i] = (cost + _EPSILON) * self._inverse[i]
        score.stamp = self._last = now
        if now >= self._refresh_due:
            self._refresh(now)

    def inherit(self, old: object, now: float) -> None:
        """Keep what ``old`` (the balancer this one replaces) learned; ``now`` as for
        ``observe``."""
        if not isinstance(old, PeakEwma):
            return
        known = [s.cost for s in old._scores if s.stamp != _NEVER]
        median = sorted(known)[len(known) // 2] if known else 0.0
        scores = []
        for upstream in self._targets:
            i = old._index.get(upstream)
            if i is None:
                scores.append(Score(median, now) if known else Score())
            else:
                scores.append(old._scores[i])
        self._scores = tuple(scores)
        self._floor = old._floor
        self._turn = old._turn
        self._last = now
        self._refresh(now)

    def __repr__(self) -> str:
        now = self._last  # costs as of the latest time the pool passed in
        costs = ", ".join(
            f"{u.address} {(s.cost if now == _NEVER else self.cost(s, now)) * 1000:.2f}ms"
            f"/{u.active}"
            for u, s in zip(self._targets[:8], self._scores, strict=False)
        )
        more = ", ..." if len(self._targets) > 8 else ""
        return (
            f"<PeakEwma [decay {self._decay:g}s, floor {self._floor * 1000:.2f}ms | "
            f"{costs}{more}]>"
        )
