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
  random number, two slices of random hex and one format.

The exporter (``export.py``) sends what sampled requests produced from the event loop
of the process that served them. Without ``tracing`` there is no tracer: the trace
headers pass through as any other header, and nothing is added.
"""

from __future__ import annotations

import os
from random import getrandbits, random
from typing import TYPE_CHECKING, Final

from proxy.tracing.context import SAMPLED, parse_traceparent
from proxy.tracing.export import Exporter
from proxy.tracing.span import ServerSpan

if TYPE_CHECKING:
    from proxy.config.models import Tracing
    from proxy.forwarding.exchange import Exchange
    from proxy.forwarding.router import Route
    from proxy.http.headers import RequestHeaders

__all__ = ["ServerSpan", "Tracer"]

_TRACEPARENT: Final = b"traceparent"
_BOTH: Final = (b"traceparent", b"tracestate")
#: ``_NEW % (trace id, span id)`` (hex): a new trace's unsampled ``traceparent``
_NEW: Final = b"00-%s-%s-00"
#: ``_CHILD % (trace id, span id, flags)`` (hex): a child of the client's
_CHILD: Final = b"00-%s-%s-%s"
#: Random bytes drawn at a time for new ids: 256 requests' trace and span ids, as hex
#: (slicing a block costs a fraction of formatting a random 128-bit int per request).
_BLOCK: Final = 24 * 256


class Tracer:
    """One process's tracing: the sampling decision, the headers, the exporter."""

    __slots__ = ("_at", "_ids", "exporter", "sample_rate")

    def __init__(self, config: Tracing) -> None:
        self.sample_rate = config.sample_rate
        self.exporter = Exporter(config)
        self._ids = b""  # random hex digits, 48 per request (``_BLOCK``)
        self._at = 0

    def begin(self, ex: Exchange, route: Route) -> None:
        """Decide ``ex``'s trace and put its ``traceparent`` in the upstream headers;
        a sampled request gets ``ex.span``."""
        found = ex.found
        if found.traceparent is None and found.tracestate is None:
            if random() >= self.sample_rate:  # the common case: two slices, one format
                at, ids = self._at, self._ids
                if at == len(ids):
                    ids = self._ids = os.urandom(_BLOCK).hex().encode()
                    at = 0
                self._at = at + 48
                tp = ex.traceparent = _NEW % (ids[at : at + 32], ids[at + 32 : at + 48])
                found.parts += (_TRACEPARENT, b": ", tp, b"\r\n")
                return
            self._sampled(ex, route, b"%032x" % getrandbits(128), None, SAMPLED, None)
            return
        parent = None if not found.traceparent else parse_traceparent(found.traceparent)
        _drop(found, _BOTH if parent is None else (_TRACEPARENT,))
        if parent is None:  # a new trace
            sampled = random() < self.sample_rate
            if sampled:
                self._sampled(ex, route, b"%032x" % getrandbits(128), None, SAMPLED, None)
                return
            tp = ex.traceparent = _NEW % (b"%032x" % getrandbits(128), b"%016x" % getrandbits(64))
            found.parts += (_TRACEPARENT, b": ", tp, b"\r\n")
            return
        trace, parent_id, flags = parent
        if flags & SAMPLED:
            self._sampled(ex, route, trace, parent_id, flags, found.tracestate)
            return
        tp = ex.traceparent = _CHILD % (trace, b"%016x" % (getrandbits(64) or 1), b"%02x" % flags)
        found.parts += (_TRACEPARENT, b": ", tp, b"\r\n")

    def _sampled(
        self, ex: Exchange, route: Route, trace: bytes, parent: bytes | None, flags: int,
        state: bytes | None,
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
    parts = found.parts
    kept: list[bytes] = []
    for i in range(0, len(parts), 4):
        if parts[i].lower() not in names:
            kept += parts[i : i + 4]
    found.parts = kept
