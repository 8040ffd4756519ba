"""The one interface every balancing algorithm implements.

A balancer is built from the list of upstreams that are available *now* (healthy,
enabled, not ejected; backups only when no primary is available) and is rebuilt by
the pool whenever that list, a weight or an option changes: never per request. The
pool never hands a balancer an unavailable upstream, so ``pick`` needs no health
checks of its own; it may read live counters such as ``Upstream.active``.

Weights: ``weights``, when given, holds the *effective* weight of each upstream in the
same order (floats > 0; the pool passes it while a ``slow_start`` ramp is running).
When it is None each upstream's own ``weight`` applies. Unweighted algorithms ignore it.

Every ``pick`` is O(1) or O(log n) over tables precomputed at construction, except
``least_connections`` when its next candidate is busy (one C-speed scan of the
``active`` counters, which the balancer cannot index: it never sees a release).

Balancers that draw random numbers use the ``random`` module's functions unless a
``rng`` is given (tests): the module is reseeded in every forked worker, a private
``random.Random`` made before the fork would not be.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from math import gcd
from typing import Any, Protocol

FRACTION_SCALE = 100  # fractional weights: the largest becomes this integer


class Target(Protocol):
    """What a balancer may read from an upstream (``proxy.upstream.pool.Upstream``)."""

    address: str  # "host:port", stable identity used for hashing
    weight: int  # configured weight (>= 1)
    active: int  # requests in flight right now


class RequestView(Protocol):
    """What a balancer may read from the request being routed.

    Accessors are lazy: a balancer that needs no key costs nothing.
    """

    @property
    def client_ip(self) -> str: ...

    @property
    def target(self) -> bytes:
        """The raw request target, ``path?query`` (origin form)."""
        ...

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        ...


class Balancer(Protocol):
    """A selection strategy over a fixed list of available upstreams."""

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
    ) -> None: ...

    def pick(self, request: RequestView) -> Any | None:
        """Return one of the upstreams given at construction, or None if there are none."""
        ...


def effective_weights(upstreams: Sequence[Any], weights: Sequence[float] | None) -> list[float]:
    """``weights`` if given (checked against ``upstreams``), else each upstream's weight."""
    if weights is None:
        return [float(u.weight) for u in upstreams]
    if len(weights) != len(upstreams):
        raise ValueError(f"{len(weights)} weights for {len(upstreams)} upstreams")
    if any(w <= 0 for w in weights):
        raise ValueError("weights must be > 0")
    return [float(w) for w in weights]


def integer_weights(weights: Sequence[float]) -> list[int]:
    """Small integers in the same proportions, divided by their gcd.

    Whole weights keep their values (5, 1, 1 stays 5, 1, 1); fractional ones, which a
    slow-start ramp produces, are scaled so that the largest is 100 and rounded (at
    least 1): proportions to 1% of the largest weight.
    """
    if all(float(w).is_integer() for w in weights):
        ints = [max(1, int(w)) for w in weights]
    else:
        scale = FRACTION_SCALE / max(weights)
        ints = [max(1, round(w * scale)) for w in weights]
    common = 0
    for w in ints:
        common = gcd(common, w)
    return [w // common for w in ints] if common > 1 else ints
