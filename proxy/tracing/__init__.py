"""OpenTelemetry tracing: W3C Trace Context upstream, spans exported over OTLP/HTTP.

Theory of operation
-------------------
With ``tracing`` configured, each process has one ``Tracer`` (the listeners hold it).
``Exchange.start`` calls ``begin`` once a request is routed to a pool, before the
route's filters, the cache and the pick:

- the client's ``traceparent`` (``RequestHeaders.traceparent``, noted while the
  headers were scanned) is parsed; a valid one makes this request its child and its
  sampled flag decides (parent-based sampling), a missing or invalid one starts a new
  trace, sampled with probability ``sample_rate`` (an invalid one's ``tracestate`` is
  dropped with it);
- the ``traceparent`` sent upstream replaces the client's in the header list the head is
  built from: the same trace, a new parent id (the CLIENT span's when sampled), the
  flags of the decision. ``tracestate`` passes through unchanged;
- only a sampled request gets a ``ServerSpan`` (``ex.span``): an unsampled one costs a
  call of a C iterator over blocks of ``traceparent`` lines made 256 at a time, in the
  exchange itself (``next``), and two stores.

The exporter (``export.py``) sends what sampled requests produced from the event loop
of the process that served them. Without ``tracing`` there is no tracer: the trace
headers pass through as any other header, and nothing is added.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from itertools import chain, repeat
from random import getrandbits, random
from typing import TYPE_CHECKING, Final

from proxy.http.headers import without
from proxy.tracing.context import SAMPLED, parse_traceparent
from proxy.tracing.export import Exporter
from proxy.tracing.span import ServerSpan

if TYPE_CHECKING:
    from proxy.config.models import TracingSpec
    from proxy.http.headers import RequestHeaders
    from proxy.tracing.traced import TracedExchange, TracedRoute

__all__ = ["ServerSpan", "Tracer"]

_TRACEPARENT: Final = b"traceparent"
_BOTH: Final = (b"traceparent", b"tracestate")
#: ``_NEW % (trace id, span id)`` (hex): a new trace's unsampled ``traceparent``
_NEW: Final = b"00-%s-%s-00"
#: ``_CHILD % (trace id, span id, flags)`` (hex): a child of the client's
_CHILD: Final = b"00-%s-%s-%s"
#: New traces decided at a time (``Tracer._block``): their sampling and their ids, from
#: one ``os.urandom`` call.
_BLOCK: Final = 256

#: A block's ``traceparent`` values, one per line, their ids' digits to be filled in:
#: ``_COLUMNS`` are where the 48 hex digits of a trace id and a span id go in each.
_RECORD: Final = b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-00"
_TEMPLATE: Final = b"\n".join([_RECORD] * _BLOCK)
_COLUMNS: Final = (*range(3, 35), *range(36, 52))

#: A request's ``traceparent`` line, as the pieces ``RequestHeaders.parts`` holds.
Line = tuple[bytes, bytes, bytes, bytes]


class Tracer:
    """One process's tracing: the sampling decision, the headers, the exporter."""

    __slots__ = ("_skip", "exporter", "next", "sample_rate")

    def __init__(self, config: TracingSpec) -> None:
        self.sample_rate = config.sample_rate
        self.exporter = Exporter(config)
        #: new traces to leave unsampled before the next sampled one
        self._skip = self._gap()
        #: ``next()``: a new trace's ``traceparent`` line (unsampled), or None when it is
        #: sampled (then ``begin`` decides). A C iterator over blocks made ``_BLOCK`` at
        #: a time, in C but for the sampled places: no Python frame per request, which
        #: is what an unsampled request with no ``traceparent`` costs
        #: (``Exchange.start`` calls it before ``begin``).
        self.next: Callable[[], Line | None] = chain.from_iterable(
            map(self._block, repeat(_BLOCK))
        ).__next__

    def _gap(self) -> int:
        """How many new traces go unsampled before the next sampled one (geometric)."""
        rate = self.sample_rate
        if rate <= 0.0:
            return sys.maxsize
        if rate >= 1.0:
            return 0
        return int(math.log(1.0 - random()) / math.log1p(-rate))

    def _block(self, n: int) -> list[Line | None]:
        """``n`` (``_BLOCK``) new traces: their ``traceparent`` lines (new trace and
        span ids, not sampled), None in the places sampled (probability ``sample_rate``
        each). The random digits are written into a template a column at a time (48
        slice assignments in C), then split: nothing per trace in Python."""
        digits = os.urandom(24 * n).hex().encode()
        values = bytearray(_TEMPLATE)
        for i, column in enumerate(_COLUMNS):
            values[column::56] = digits[i::48]
        block: list[Line | None] = list(
            zip(repeat(_TRACEPARENT), repeat(b": "), bytes(values).split(b"\n"),
                repeat(b"\r\n"))
        )  # fmt: skip
        at = self._skip
        while at < n:
            block[at] = None
            at += 1 + self._gap()
        self._skip = at - n
        return block

    def begin(self, ex: TracedExchange, route: TracedRoute) -> None:
        """Decide ``ex``'s trace and put its ``traceparent`` in the upstream headers;
        a sampled request gets ``ex.span``. (A request with no trace headers whose
        ``next()`` gave a line never gets here.)"""
        found = ex.found
        if found.traceparent is None and found.tracestate is None:
            self._sampled(ex, route, b"%032x" % getrandbits(128), None, SAMPLED, None)
            return
        value = found.traceparent
        parent = parse_traceparent(value) if value else None
        if parent is None:  # a new trace
            _drop(found, _BOTH)
            sampled = random() < self.sample_rate
            if sampled:
                self._sampled(ex, route, b"%032x" % getrandbits(128), None, SAMPLED, None)
                return
            tp = ex.traceparent = _NEW % (b"%032x" % getrandbits(128), b"%016x" % getrandbits(64))
            found.parts += (_TRACEPARENT, b": ", tp, b"\r\n")
            return
        trace, parent_id, flags = parent
        if flags & SAMPLED:
            _drop(found, (_TRACEPARENT,))
            self._sampled(ex, route, trace, parent_id, flags, found.tracestate)
            return
        tp = ex.traceparent = _CHILD % (trace, b"%016x" % (getrandbits(64) or 1), b"%02x" % flags)
        _replace(found, value, tp)  # type: ignore[arg-type]

    def _sampled(
        self, ex: TracedExchange, route: TracedRoute, trace: bytes, parent: bytes | None,
        flags: int, state: bytes | None,
    ) -> None:  # fmt: skip
        span = ex.span = ServerSpan(self.exporter, ex, route, trace, parent, flags, state)
        tp = ex.traceparent = span.traceparent()
        ex.found.parts += (_TRACEPARENT, b": ", tp, b"\r\n")

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


def _replace(found: RequestHeaders, old: bytes, new: bytes) -> None:
    """Forward ``new`` in place of the client's ``traceparent`` value ``old`` (found
    by a C search, not a loop over the headers)."""
    parts = found.parts
    try:
        at = parts.index(old)
    except ValueError:
        at = -1
    if at % 4 == 2 and parts[at - 2].lower() == _TRACEPARENT:
        parts[at] = new
    else:  # the value stood elsewhere too (another header's value)
        _drop(found, (_TRACEPARENT,))
        found.parts += (_TRACEPARENT, b": ", new, b"\r\n")
