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
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable, Mapping, Sequence
from math import exp
from typing import Any

from proxy.balancing.base import RequestView, effective_weights

DEFAULT_DECAY = 10.0
_FLOOR_REFRESHES = 16  # the floor is recomputed this many times per decay time
_EPSILON = 1e-6  # with no costs known yet, fewer in-flight requests still wins
_FADE_SPEED = 2.0  # what we learned fades to the floor within decay / _FADE_SPEED
_TIME_CONSTANTS = 5.0  # decay / _TIME_CONSTANTS is the moving average's time constant
_MARGIN = 1.125  # a load must be lower by more than this factor to count as lower
_NEVER = float("-inf")


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

    ``clock`` (seconds, monotonic) and ``rng`` are for tests.
    """

    __slots__ = (
        "_by_upstream",
        "_clock",
        "_decay",
        "_fade_rate",
        "_floor",
        "_floor_due",
        "_forget_rate",
        "_inverse",
        "_random",
        "_scores",
        "_targets",
    )

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: _random.Random | None = None,
    ) -> None:
        self._targets = tuple(upstreams)
        self._inverse = tuple(1.0 / w for w in effective_weights(upstreams, weights))
        self._decay = float(options.get("decay", DEFAULT_DECAY))
        if self._decay <= 0:
            raise ValueError("decay must be > 0")
        self._fade_rate = _FADE_SPEED / self._decay
        self._forget_rate = _TIME_CONSTANTS / self._decay
        self._clock = clock
        self._random: Callable[[], float] = (rng or _random).random
        self._scores = tuple(Score() for _ in self._targets)
        self._by_upstream = dict(zip(self._targets, self._scores, strict=True))
        self._floor = 0.0
        self._floor_due = _NEVER

    # -- picking ---------------------------------------------------------------------

    def pick(self, request: RequestView) -> Any | None:
        targets = self._targets
        n = len(targets)
        if n < 2:
            return targets[0] if n else None
        draw = self._random
        i = int(draw() * n)
        j = int(draw() * (n - 1))
        if j >= i:
            j += 1
        now = self._clock()
        return targets[j] if self._load(j, now) * _MARGIN < self._load(i, now) else targets[i]

    def _load(self, i: int, now: float) -> float:
        active: int = self._targets[i].active
        return (self.cost(self._scores[i], now) + _EPSILON) * (active + 1) * self._inverse[i]

    def cost(self, score: Score, now: float) -> float:
        """``score``'s cost as of ``now``: faded toward the floor with time unmeasured."""
        fade = 1.0 - (now - score.stamp) * self._fade_rate
        if fade <= 0.0:
            return self._floor
        floor = self._floor
        return floor + (score.cost - floor) * fade

    # -- learning --------------------------------------------------------------------

    def observe(self, upstream: Any, seconds: float) -> None:
        """Learn from one response: ``seconds`` from sending to the response head."""
        score = self._by_upstream.get(upstream)
        if score is None:  # left this balancer while its request was in flight
            return
        now = self._clock()
        prior = self.cost(score, now)
        if seconds >= prior:
            score.cost = seconds
        else:
            keep = exp((score.stamp - now) * self._forget_rate)
            score.cost = prior * keep + seconds * (1.0 - keep)
        score.stamp = now
        if now >= self._floor_due:
            self._refresh_floor(now)

    def _refresh_floor(self, now: float) -> None:
        since = now - self._decay
        recent = [s.cost for s in self._scores if s.stamp > since]
        if recent:
            self._floor = min(recent)
        self._floor_due = now + self._decay / _FLOOR_REFRESHES

    def inherit(self, old: object) -> None:
        """Keep what ``old`` (the balancer this one replaces) learned."""
        if not isinstance(old, PeakEwma):
            return
        known = [s.cost for s in old._scores if s.stamp != _NEVER]
        now = self._clock()
        median = sorted(known)[len(known) // 2] if known else 0.0
        scores = []
        for upstream in self._targets:
            score = old._by_upstream.get(upstream)
            if score is None:
                score = Score(median, now) if known else Score()
            scores.append(score)
        self._scores = tuple(scores)
        self._by_upstream = dict(zip(self._targets, self._scores, strict=True))
        self._floor = old._floor
        self._floor_due = old._floor_due

    def __repr__(self) -> str:
        now = self._clock()
        costs = ", ".join(
            f"{u.address} {self.cost(s, now) * 1000:.2f}ms/{u.active}"
            for u, s in zip(self._targets[:8], self._scores, strict=False)
        )
        more = ", ..." if len(self._targets) > 8 else ""
        return (
            f"<PeakEwma [decay {self._decay:g}s, floor {self._floor * 1000:.2f}ms | "
            f"{costs}{more}]>"
        )
