"""Passive health: eject an upstream that real traffic sees failing, for a while.

Theory of operation
-------------------
Envoy's outlier detection, reduced to what a proxy of this size needs. The exchange
reports each attempt's outcome: ``failure`` for a connect error, a timeout, a reset
or an invalid response (and a 5xx status when ``consecutive_5xx`` is on), ``success``
otherwise. ``consecutive_failures`` failures in a row eject the upstream for
``ejection_time`` times the number of times it has been ejected, at most
``max_ejection_time``; the multiplier drops by one for every ``ejection_time`` the
upstream then stays in (Envoy does the same), so one bad minute is not held against
it forever. ``sweep`` returns ejected upstreams whose time is up; an active check
that sees the upstream healthy again returns it at once (``readmit``).

Guards: never more than ``max_ejection_percent`` of the pool ejected at once (at
least one upstream may be, as in Envoy), and never the pool's last available
upstream: failing over to nothing is worse than an upstream that fails sometimes.

The detector works on plain attributes of the upstream (``failures``, ``ejected``,
``ejected_until``, ``ejections``, ``eject_level``, ``returned_at``: ``Ejectable``) and
tells the caller whether the available set changed; the pool rebuilds its balancer then.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.config import PassiveHealthCheckSpec

log = logging.getLogger("aiolb")


class Named(Protocol):
    @property
    def name(self) -> str: ...


class Ejectable(Protocol):
    """An upstream as the detector sees it (``upstream.pool.Upstream`` is one): it reads
    ``address``, ``pool.name`` and ``available``, and keeps its state in the others."""

    failures: int  # consecutive failed attempts
    ejected: bool
    ejected_until: float  # loop time
    ejections: int  # times ejected
    eject_level: int  # the ejection time multiplier
    returned_at: float  # loop time of the last return to rotation
    passes: int  # consecutive passed probes (set to 0 on ejection)

    @property
    def address(self) -> str: ...

    @property
    def pool(self) -> Named: ...

    @property
    def available(self) -> bool:
        """Healthy, enabled and not ejected."""
        ...


class OutlierDetector:
    __slots__ = ("base", "cap", "max_percent", "threshold", "with_5xx")

    def __init__(self, config: PassiveHealthCheckSpec) -> None:
        self.threshold = config.consecutive_failures
        self.with_5xx = config.consecutive_5xx
        self.base = config.ejection_time
        self.cap = config.max_ejection_time
        self.max_percent = config.max_ejection_percent

    def failure(
        self, upstream: Ejectable, upstreams: Sequence[Ejectable], now: float, reason: str
    ) -> bool:
        """One failed attempt; True when it ejected ``upstream``."""
        upstream.failures += 1
        if upstream.failures < self.threshold or upstream.ejected:
            return False
        if not self._may_eject(upstream, upstreams):
            return False
        # the multiplier decays by one per ejection_time spent back in rotation
        calm = int((now - upstream.returned_at) / self.base) if upstream.ejections else 0
        level = max(0, upstream.eject_level - calm) + 1
        seconds = min(self.base * level, self.cap)
        upstream.eject_level = level
        upstream.ejected = True
        upstream.ejected_until = now + seconds
        upstream.ejections += 1
        upstream.failures = 0
        upstream.passes = 0  # active checks must pass again, after this, to end it early
        log.warning(
            "upstream %s/%s ejected for %gs: %d consecutive failures (last: %s)",
            upstream.pool.name, upstream.address, seconds, self.threshold, reason,
        )  # fmt: skip
        return True

    def _may_eject(self, upstream: Ejectable, upstreams: Sequence[Ejectable]) -> bool:
        ejected = sum(u.ejected for u in upstreams)
        allowed = max(1, len(upstreams) * self.max_percent // 100) if self.max_percent else 0
        if ejected + 1 > allowed:
            return False
        others = any(u.available for u in upstreams if u is not upstream)
        return others  # never the last available upstream

    def sweep(self, upstreams: Sequence[Ejectable], now: float) -> bool:
        """Return upstreams whose ejection is over; True when any returned."""
        changed = False
        for upstream in upstreams:
            if upstream.ejected and upstream.ejected_until <= now:
                readmit(upstream, now, "ejection time over")
                changed = True
        return changed

    def __repr__(self) -> str:
        return (
            f"<OutlierDetector [{self.threshold} failures, {self.base:g}s..{self.cap:g}s, "
            f"max {self.max_percent}%]>"
        )


def readmit(upstream: Ejectable, now: float, why: str) -> None:
    """End ``upstream``'s ejection (the caller rebuilds the pool's balancer)."""
    upstream.ejected = False
    upstream.ejected_until = 0.0
    upstream.returned_at = now
    upstream.failures = 0
    log.info("upstream %s/%s back in rotation: %s", upstream.pool.name, upstream.address, why)
