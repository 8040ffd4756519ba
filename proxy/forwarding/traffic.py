"""Where a route's requests go besides one pool: a weighted split, and mirror copies.

Theory of operation
-------------------
A route with ``pools`` (or a ``mirror``) has a ``Split``; its ``Route.pool`` is None,
so the exchange asks the split for the pool, off the common route's path
(``Exchange.start``). ``Split.choose`` is smooth weighted round robin (nginx's): over
any run of ``sum(weights)`` requests each pool gets exactly its weight, evenly spread,
with no random numbers. With ``sticky``, the request key (``proxy.config.keys``: a
cookie, a header, the client address) is hashed (CRC-32, the same in every worker and
process) onto the cumulative weights, so a client keeps its pool while the weights
stay; a request without the key is split as if not sticky. A split does not fail over:
the chosen pool's retries and 503 apply as to any route (Envoy's weighted clusters).

A ``Mirror`` copies a sampled request (``fraction``) to its pool when the real request
is dispatched (``Attempts.dispatch``), after the route's filters, so a request they
refuse is not copied. The copy is an ``Exchange`` of its own whose downstream is a
``Copy``: a ``Background`` (``proxy.forwarding.background``) that writes nothing and
counts how the copy ended. It starts on the next loop iteration, after the real
request's head went out, and shares nothing with it but immutable bytes: its answer,
its failure or its slowness never reach the real request. At most ``max_in_flight``
copies of a route are in flight; more are dropped and counted. Only a body already
read whole (``limits.body_buffer_size``; none at all is the common case) is copied: a
streamed body would tie the real request's pace to the mirror's, or need an unbounded
buffer (nginx's ``mirror_request_body`` buffers it before the real request goes on);
such requests are counted as ``skipped``.

The copy keeps the client's ``Host`` (nginx's ``mirror``; Envoy appends ``-shadow``):
the shadow service sees the request as the real one would. Its ``X-Request-ID`` is the
real request's with ``-mirror`` after it, so the two can be joined in logs.
"""

from __future__ import annotations

import logging
import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import TYPE_CHECKING, Final
from zlib import crc32

from proxy.forwarding.background import Background
from proxy.http.headers import RequestHeaders

if TYPE_CHECKING:
    from proxy.balancing.base import RequestView
    from proxy.filters.context import FilterContext, Tally
    from proxy.forwarding.core import ExchangeCore
    from proxy.forwarding.downstream import Answer, Downstream
    from proxy.forwarding.exchange import Exchange
    from proxy.http.headers import ResponseHead
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

#: What a mirror copy's request id ends with (``X-Request-ID``, the access log).
MIRRORED: Final = b"-mirror"
#: The ``outcome`` label values of ``aiolb_mirror_requests_total``.
OUTCOMES: Final = ("answered", "failed", "dropped", "skipped")


class Split:
    """The pools of a route and their weights; ``choose`` gives one per request."""

    __slots__ = ("_bounds", "_current", "_key", "_tallies", "_total", "_weights", "pools")

    def __init__(
        self,
        pools: Sequence[Pool],
        weights: Sequence[int],
        key: Callable[[RequestView], bytes | None] | None = None,
        tallies: Sequence[Tally] | None = None,
    ) -> None:
        """``pools`` with their ``weights`` (those of weight 0 are left out); ``key``:
        the sticky key's reader; ``tallies``: one count per pool (None: not counted)."""
        kept = [i for i, w in enumerate(weights) if w > 0]
        self.pools = tuple(pools[i] for i in kept)
        self._weights = tuple(weights[i] for i in kept)
        self._tallies = tuple(tallies[i] for i in kept) if tallies is not None else None
        self._total = sum(self._weights)
        self._bounds = tuple(accumulate(self._weights))
        self._current = [0] * len(self.pools)
        self._key = key

    def choose(self, request: RequestView) -> Pool:
        """The pool for this request (and its count)."""
        if len(self.pools) == 1:
            i = 0
        else:
            key = self._key(request) if self._key is not None else None
            i = self._hashed(key) if key else self._next()
        if self._tallies is not None:
            self._tallies[i].n += 1
        return self.pools[i]

    def _next(self) -> int:
        """Smooth weighted round robin: the largest current weight wins, then gives
        back the total."""
        current = self._current
        best = 0
        for i, weight in enumerate(self._weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return best

    def _hashed(self, key: bytes) -> int:
        return bisect_right(self._bounds, crc32(key) % self._total)

    def __repr__(self) -> str:
        shares = ", ".join(f"{p.name} {w}" for p, w in zip(self.pools, self._weights, strict=True))
        return f"<Split [{shares}]{' sticky' if self._key is not None else ''}>"


class Mirror:
    """Where a route's copies go, how many, and how they ended."""

    __slots__ = ("fraction", "in_flight", "limit", "pool", "tallies")

    def __init__(
        self, route: str, pool: Pool, fraction: float, limit: int, context: FilterContext
    ) -> None:
        self.pool = pool
        self.fraction = fraction
        self.limit = limit
        self.in_flight = 0
        #: by outcome (``OUTCOMES``)
        self.tallies = {o: context.tally("mirror", route, pool.name, o) for o in OUTCOMES}

    def sample(self) -> bool:
        """Copy this request? (``fraction`` of them, at random.)"""
        fraction = self.fraction
        return fraction >= 1.0 or (fraction > 0.0 and random.random() < fraction)

    def copy(self, ex: Exchange, target: bytes, body: tuple[bytes, ...], size: int) -> None:
        """Send a copy of ``ex``'s request for ``target`` with ``body`` (framed as the
        request's own), from the next loop iteration; or count it dropped."""
        if self.in_flight >= self.limit or ex.found.upgrade is not None:
            self.tallies["dropped"].n += 1
            return
        given = ex.found
        found = RequestHeaders([])
        found.parts = list(given.parts)
        found.host = given.host
        found.forwarded_for = given.forwarded_for
        found.content_length = given.content_length
        found.chunked = given.chunked
        found.request_id = ex.request_id + MIRRORED
        client = Copy(ex.client, self)
        copy = type(ex)(client, ex.method, target, ex.headers, found, ex.http_minor, False)
        copy.trace_id = ex.trace_id  # the same trace (``tracing``), not sampled
        client.exchange = copy
        self.in_flight += 1
        client.loop.call_soon(client.begin_copy, body, size, target)

    def skipped(self) -> None:
        """A sampled request whose body streams: not copied."""
        self.tallies["skipped"].n += 1

    def __repr__(self) -> str:
        return f"<Mirror {self.pool.name} {self.fraction:g} [{self.in_flight}/{self.limit}]>"


class Copy(Background):
    """The downstream of a mirror copy: nothing written, its outcome counted once."""

    __slots__ = ("answered", "mirror")

    def __init__(self, client: Downstream, mirror: Mirror) -> None:
        super().__init__(client)
        self.mirror: Mirror | None = mirror
        self.answered = False

    def begin_copy(self, body: tuple[bytes, ...], size: int, target: bytes) -> None:
        """Send the copy, its deadlines swept from now on."""
        ex = self.exchange
        assert ex is not None and self.mirror is not None
        self.clock.add_sweeper(self.sweep)
        try:
            ex.start_copy(self.mirror.pool, body, size, target)
        except Exception as exc:  # a bug: it never escapes a loop callback
            log.error("bug in a mirror copy of %r", target[:200], exc_info=exc)
            ex.abort()
            self.close()

    def send_head(self, ex: ExchangeCore, status: int, found: ResponseHead) -> None:
        self.answered = True
        ex.keep_alive = False

    def send_whole(self, ex: ExchangeCore, found: ResponseHead, body: bytes | memoryview) -> None:
        self.answered = True

    def send_answer(self, ex: ExchangeCore, answer: Answer, close: bool) -> None:
        self.answered = True

    def close(self) -> None:
        """The copy is over (or abandoned): count it once and free its place."""
        mirror = self.mirror
        if mirror is not None:
            self.mirror = None
            mirror.in_flight -= 1
            mirror.tallies["answered" if self.answered else "failed"].n += 1
        super().close()

    def __repr__(self) -> str:
        return f"<Copy {self.client_ip} [{self.exchange!r}]>"
