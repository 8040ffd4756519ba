"""A traced request's part in its trace: a sampled one's spans (``ServerSpan``: one
SERVER span, one CLIENT span per upstream attempt), or an unsampled child's parent ids
(``Relay``).

The head sent upstream carries ``traceparent: 00-TRACE-PARENT-00`` with the listener's
parent id for unsampled new traces (``proxy.http.headers.head_template``): right for
the common request, and rewritten by the request's ``ex.span`` when it has one, which
``Tracer.begin`` gives a sampled request and an unsampled child of a client's trace.
The exchange tells it when an attempt starts (``attempt``, with the head it sends: the
first after the pick, each retry after its backoff; each attempt's ``traceparent`` names
a parent id of its own, the CLIENT span's when sampled), when one fails (``failed``) or
is answered with a status that is retried (``answered``), and when the request ends
(``end``): then a ``ServerSpan`` encodes every span (``proxy.tracing.otlp``) and hands
them to the exporter. Attributes follow OpenTelemetry's stable HTTP semantic
conventions, plus ``aiolb.*`` for the listener, route, pool, upstream and cache.
"""

from __future__ import annotations

import time
from random import getrandbits
from time import perf_counter_ns
from typing import TYPE_CHECKING, Final

from proxy.http.headers import TRACED_END, TRACED_END_SIZE
from proxy.tracing.otlp import CLIENT, SERVER, AttributeValue, span

if TYPE_CHECKING:
    from proxy.errors import ProxyError
    from proxy.tracing.export import Exporter
    from proxy.tracing.traced import TracedExchange, TracedRoute
    from proxy.upstream.pool import Upstream

#: Methods the semantic conventions name; any other is ``_OTHER``.
KNOWN_METHODS: Final = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
)


class Attempt:
    """One CLIENT span: an upstream tried, when, and how it ended."""

    __slots__ = ("end", "error", "span_id", "start", "status", "upstream")

    def __init__(self, span_id: int, upstream: Upstream, start: int) -> None:
        self.span_id = span_id
        self.upstream = upstream
        self.start = start
        self.end = 0
        self.status = 0
        self.error = ""


def _named(head: bytes, span_id: int, flags: int) -> bytes:
    """``head`` with ``span_id`` and ``flags`` as its ``traceparent``'s last fields (the
    line is the head's last: ``proxy.http.headers.head_template``)."""
    return head[:-TRACED_END_SIZE] + TRACED_END % (span_id, flags)


class Relay:
    """Unsampled requests continuing a client's trace with ``flags``: nothing is
    recorded, but each attempt names a parent id of its own (a child each time) and
    keeps the client's flags. Stateless, so one per flags value (``Tracer.begin``)."""

    __slots__ = ("flags",)

    def __init__(self, flags: int) -> None:
        self.flags = flags

    def attempt(self, upstream: Upstream, head: bytes) -> bytes:
        """An attempt starts: ``head`` with a new parent id."""
        return _named(head, getrandbits(64) or 1, self.flags)

    def failed(self, error: ProxyError) -> None:
        pass

    def answered(self, status: int) -> None:
        pass

    def end(self, ex: TracedExchange) -> None:
        pass


class ServerSpan(Relay):
    """What a sampled request's spans need, gathered while it runs."""

    __slots__ = (
        "attempts", "exporter", "offset", "parent", "route", "span_id", "start", "state",
        "trace",
    )  # fmt: skip

    def __init__(
        self,
        exporter: Exporter,
        ex: TracedExchange,
        route: TracedRoute,
        trace: bytes,
        parent: bytes | None,
        flags: int,
        state: bytes | None,
    ) -> None:
        super().__init__(flags)
        self.exporter = exporter
        self.trace = trace  # 32 hex digits
        self.parent = parent  # the client's span (16 hex digits), None for a new trace
        self.state = state  # the client's tracestate, passed on
        self.route = route
        self.span_id = getrandbits(64) or 1
        #: Unix time in ns = perf_counter_ns() + offset (the exchange times with
        #: perf_counter)
        self.offset = time.time_ns() - perf_counter_ns()
        self.start = int(ex.started * 1e9) + self.offset
        self.attempts: list[Attempt] = []

    def attempt(self, upstream: Upstream, head: bytes) -> bytes:
        """An attempt on ``upstream`` starts: a new CLIENT span, ``head`` with it as
        the parent its ``traceparent`` names."""
        now = perf_counter_ns() + self.offset
        attempts = self.attempts
        if attempts:
            last = attempts[-1]
            if not last.end:
                last.end = now
        span_id = getrandbits(64) or 1
        attempts.append(Attempt(span_id, upstream, now))
        return _named(head, span_id, self.flags)

    def failed(self, error: ProxyError) -> None:
        """The current attempt failed before a response (``error.type``: its
        ``retry_on`` condition, else the error's class)."""
        if self.attempts:
            last = self.attempts[-1]
            last.end = perf_counter_ns() + self.offset
            last.error = error.condition or type(error).__name__

    def answered(self, status: int) -> None:
        """The current attempt was answered with ``status``, which is retried."""
        if self.attempts:
            last = self.attempts[-1]
            last.end = perf_counter_ns() + self.offset
            last.status = status

    def end(self, ex: TracedExchange) -> None:
        """The request ended: encode its spans and queue them for export."""
        now = perf_counter_ns() + self.offset
        trace = bytes.fromhex(self.trace.decode())
        server_id = self.span_id.to_bytes(8, "big")
        method = ex.method.decode("latin-1")
        if ex.method not in KNOWN_METHODS:
            method = "_OTHER"
        spans = []
        attempts = self.attempts
        for i, a in enumerate(attempts):
            if not a.end:
                a.end = now
                if ex.resp_started and not a.status and not a.error:
                    a.status = ex.status
            attrs = _client_attributes(ex, a, method, i)
            error = bool(a.error) or a.status >= 400 or not a.status
            spans.append(span(trace, a.span_id.to_bytes(8, "big"), server_id, method, CLIENT,
                              a.start, a.end, attrs, error))  # fmt: skip
        attrs = _server_attributes(ex, self.route, method, len(attempts))
        parent = None if self.parent is None else bytes.fromhex(self.parent.decode())
        spans.append(span(trace, server_id, parent, method, SERVER, self.start, now, attrs,
                          ex.status >= 500 or not ex.status, self.state))  # fmt: skip
        self.exporter.add(spans)


def _split_host(host: bytes | None, https: bool) -> tuple[str, int]:
    """``server.address`` and ``server.port`` from a ``Host`` value."""
    if not host:
        return "", 443 if https else 80
    text = host.decode("latin-1")
    name, colon, port = text.rpartition(":")
    if colon and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name.strip("[]"), int(port)
    return text.strip("[]"), 443 if https else 80


def _server_attributes(ex: TracedExchange, route: TracedRoute, method: str, attempts: int
                       ) -> dict[str, AttributeValue]:  # fmt: skip
    client = ex.client
    https = client.listener.tls is not None
    address, port = _split_host(ex.host, https)
    attrs: dict[str, AttributeValue] = {
        "http.request.method": method,
        "url.path": _path(ex),
        "url.scheme": "https" if https else "http",
        "server.address": address,
        "server.port": port,
        "client.address": client.client_ip,
        "network.protocol.version": "1.1" if ex.http_minor else "1.0",
        "aiolb.listener": client.listener.name,
        "aiolb.route": route.name,
        "aiolb.request_id": ex.request_id.decode("latin-1"),
    }
    if method == "_OTHER":
        attrs["http.request.method_original"] = ex.method.decode("latin-1")
    if ex.status:
        attrs["http.response.status_code"] = ex.status
        if ex.status >= 500:
            attrs["error.type"] = str(ex.status)
    else:
        attrs["error.type"] = "incomplete"  # the client went away before an answer
    if ex.pool is not None:
        attrs["aiolb.pool"] = ex.pool.name
    if ex.upstream is not None and ex.resp_started:
        attrs["aiolb.upstream"] = ex.upstream.address
    if attempts:
        attrs["aiolb.attempts"] = attempts
    if route.cache is not None:
        attrs["aiolb.cache"] = route.cache.name
        attrs["aiolb.cache.result"] = _cache_result(ex)
    return attrs


def _cache_result(ex: TracedExchange) -> str:
    """``hit`` when the cache answered, else the ``fwd`` of ``Cache-Status`` (``miss``,
    ``stale``, ``request``, ``method``...)."""
    if getattr(ex.answer, "framing", None) is not None:  # only the cache's answers have one
        return "hit"
    state = ex.cache_state
    if state is None:
        return "hit"  # a fresh memory hit keeps no state
    return state.status.partition(b";")[0].removeprefix(b"fwd=").decode("latin-1")


def _client_attributes(ex: TracedExchange, a: Attempt, method: str, index: int
                       ) -> dict[str, AttributeValue]:  # fmt: skip
    upstream = a.upstream
    scheme = "https" if upstream.ssl is not None else "http"
    attrs: dict[str, AttributeValue] = {
        "http.request.method": method,
        "server.address": upstream.host,
        "server.port": upstream.port,
        "url.full": f"{scheme}://{upstream.address}{_path(ex)}",
        "network.protocol.version": "1.1",
        "aiolb.pool": upstream.pool.name,
        "aiolb.upstream": upstream.address,
    }
    if index:
        attrs["http.request.resend_count"] = index
    if a.status:
        attrs["http.response.status_code"] = a.status
        if a.status >= 400:
            attrs["error.type"] = str(a.status)
    elif a.error:
        attrs["error.type"] = a.error
    else:
        attrs["error.type"] = "incomplete"
    return attrs


def _path(ex: TracedExchange) -> str:
    """The normalised target's path: the query is left out of spans (it may carry
    tokens, and the conventions ask for it to be redacted then)."""
    return ex.target.partition(b"?")[0].decode("latin-1")
