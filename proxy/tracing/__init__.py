"""OpenTelemetry tracing: W3C Trace Context upstream, spans exported over OTLP/HTTP.

Theory of operation
-------------------
With ``tracing`` configured, each process has one ``Tracer`` (the listeners hold it).
``Exchange.start`` decides a request's trace once it is routed to a pool, before the
route's filters, the cache and the pick: a request with no trace header takes the next
of ``ids`` (a new trace, unsampled), and ``begin`` decides the rest:

- the client's ``traceparent`` (``RequestHeaders.traceparent``, noted while the
  headers were scanned) is parsed; a valid one makes this request its child and its
  sampled flag decides (parent-based sampling), a missing or invalid one starts a new
  trace, sampled with probability ``sample_rate`` (an invalid one's ``tracestate`` is
  dropped with it);
- the ``traceparent`` sent upstream is the last line of a traced listener's head format
  (``proxy.http.headers.head_template``), ``00-TRACE-PARENT-00``: TRACE is
  the exchange's ``trace_id``, PARENT the tracer's ``parent`` (one per process: each new trace
  carries exactly one request from it, so the id is unique within each trace; no span
  is recorded under it). That is the whole of an unsampled new trace's part: the call of
  a C iterator over blocks of trace ids made 256 at a time, in the exchange itself
  (``ids``), and one store;
- a sampled request gets a ``ServerSpan`` (``ex.span``), an unsampled child of the
  client's trace a ``Relay``: at each attempt they rewrite that line in the head (a
  parent id of the attempt's own, the CLIENT span's when sampled; the client's flags
  or the sampled flag). The client's ``traceparent`` is taken out of the headers
  forwarded; ``tracestate`` passes through unchanged.

The exporter (``export.py``) sends what sampled requests produced from the event loop
of the process that served them. Without ``tracing`` there is no tracer: the trace
headers pass through as any other header, and nothing is added.
"""

from __future__ import annotations

import math
import os
import sys
from binascii import hexlify
from collections.abc import Iterator
from itertools import chain, repeat
from random import getrandbits, random
from typing import TYPE_CHECKING, Final

from proxy.http.headers import without
from proxy.tracing.context import SAMPLED, parse_traceparent
from proxy.tracing.export import Exporter
from proxy.tracing.span import Relay, ServerSpan

if TYPE_CHECKING:
    from proxy.config.models import TracingSpec
    from proxy.http.headers import RequestHeaders
    from proxy.tracing.traced import TracedExchange, TracedRoute

__all__ = ["Relay", "ServerSpan", "Tracer"]

_TRACEPARENT: Final = b"traceparent"
_BOTH: Final = (b"traceparent", b"tracestate")
#: New traces decided at a time (``Tracer._block``): their sampling and their ids, from
#: one ``os.urandom`` call.
_BLOCK: Final = 256


class Tracer:
    """One process's tracing: the sampling decision, the headers, the exporter."""

    __slots__ = ("_relays", "_skip", "exporter", "ids", "parent", "sample_rate")

    def __init__(self, config: TracingSpec) -> None:
        self.sample_rate = config.sample_rate
        self.exporter = Exporter(config)
        #: the parent id (16 hex digits) unsampled new traces name (see the module)
        self.parent = b"%016x" % (getrandbits(64) or 1)
        #: the ``Relay`` of each flags value seen on an unsampled client trace
        self._relays: dict[int, Relay] = {}
        #: new traces to leave unsampled before the next sampled one
        self._skip = self._gap()
        #: ``next(ids)``: a new trace's id (32 hex digits), not sampled, or None when
        #: it is sampled (then ``begin`` decides). A C iterator over blocks made
        #: ``_BLOCK`` at a time, in C but for the sampled places: no Python frame per
        #: request, which is what an unsampled request with no trace header costs
        #: (``Exchange.start`` takes one before calling ``begin``).
        self.ids: Iterator[bytes | None] = chain.from_iterable(map(self._block, repeat(_BLOCK)))

    def _gap(self) -> int:
        """How many new traces go unsampled before the next sampled one (geometric)."""
        rate = self.sample_rate
        if rate <= 0.0:
            return sys.maxsize
        if rate >= 1.0:
            return 0
        return int(math.log(1.0 - random()) / math.log1p(-rate))

    def _block(self, n: int) -> list[bytes | None]:
        """``n`` (``_BLOCK``) new trace ids, not sampled, None in the places sampled
        (probability ``sample_rate`` each). Nothing per trace in Python: 16 random bytes
        each, in hex with a ``|`` between, split."""
        block: list[bytes | None] = hexlify(os.urandom(16 * n), b"|", -16).split(b"|")  # type: ignore[assignment]
        at = self._skip
        while at < n:
            block[at] = None
            at += 1 + self._gap()
        self._skip = at - n
        return block

    def begin(self, ex: TracedExchange, route: TracedRoute) -> None:
        """Decide ``ex``'s trace: its ``trace_id``, and its ``span`` (a ``ServerSpan``
        when sampled, a ``Relay`` for an unsampled child of the client's trace). (A
        request with no trace headers whose ``ids`` gave an id never gets here.)"""
        found = ex.found
        value = found.traceparent
        if value is None:  # a new trace, sampled (``ids`` said so)
            self._sampled(ex, route, b"%032x" % getrandbits(128), None, SAMPLED, None)
            return
        parent = parse_traceparent(value)
        if parent is None:  # invalid: a new trace, without the client's trace headers
            _drop(found, _BOTH)
            trace = b"%032x" % getrandbits(128)
            if random() < self.sample_rate:
                self._sampled(ex, route, trace, None, SAMPLED, None)
            else:  # as a request with no trace header
                ex.trace_id = trace
            return
        _take_out(found, value)
        trace, parent_id, flags = parent
        if flags & SAMPLED:
            self._sampled(ex, route, trace, parent_id, flags, found.tracestate)
            return
        ex.trace_id = trace
        relay = self._relays.get(flags)
        if relay is None:
            relay = self._relays[flags] = Relay(flags)
        ex.span = relay

    def _sampled(
        self, ex: TracedExchange, route: TracedRoute, trace: bytes, parent: bytes | None,
        flags: int, state: bytes | None,
    ) -> None:  # fmt: skip
        ex.trace_id = trace
        ex.span = ServerSpan(self.exporter, ex, route, trace, parent, flags, state)

    def counts(self) -> dict[str, int]:
        """Spans exported and dropped by this process (``aiolb_trace_spans_*_total``)."""
        return {"exported": self.exporter.exported, "dropped": self.exporter.dropped}

    def absorb(self, counts: list[dict[str, int]]) -> None:
        """The workers' sums, in the supervisor (which exports nothing itself)."""
        self.exporter.exported = sum(c.get("exported", 0) for c in counts)
        self.exporter.dropped = sum(c.get("dropped", 0) for c in counts)

    def __repr__(self) -> str:
        return f"<Tracer [sample_rate {self.sample_rate}] {self.exporter!r}>"


def _drop(found: RequestHeaders, names: tuple[bytes, ...]) -> None:
    """Remove the client's headers ``names`` from what is forwarded."""
    found.parts = without(found.parts, names)


def _take_out(found: RequestHeaders, value: bytes) -> None:
    """Remove the client's (valid, so single) ``traceparent`` ``value`` from what is
    forwarded: found by a C search, not a loop over the headers."""
    parts = found.parts
    try:
        at = parts.index(value)
    except ValueError:
        at = -1
    if at % 4 == 2 and parts[at - 2].lower() == _TRACEPARENT:
        del parts[at - 2 : at + 2]
    else:  # the value stood elsewhere too (another header's value)
        _drop(found, (_TRACEPARENT,))
