"""What tracing reads of a request, as Protocols this package owns.

``proxy.tracing`` sits below ``proxy.forwarding`` and beside ``proxy.cache`` (see
``.importlinter``), yet ``Tracer.begin`` and ``ServerSpan`` take the exchange and its
route. They name here exactly what they read (and the two attributes ``begin`` writes)
rather than importing ``Exchange``, ``Route`` or the cache's classes (STYLE.md 15):
``forwarding.exchange.Exchange`` is a ``TracedExchange`` and ``forwarding.router.Route``
a ``TracedRoute`` without naming them; mypy checks that where the exchange calls
``Tracer.begin``. Objects of the layers below (``Pool``, ``Upstream``,
``RequestHeaders``) keep their own types.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from proxy.http.headers import RequestHeaders
    from proxy.tracing.span import Relay
    from proxy.upstream.pool import Pool, Upstream


class Named(Protocol):
    @property
    def name(self) -> str: ...


class TracedListener(Protocol):
    """The listener a request came in on: its name, and whether it is TLS (``tls``
    not None: the request's scheme is https)."""

    @property
    def name(self) -> str: ...

    @property
    def tls(self) -> object | None: ...


class TracedClient(Protocol):
    """The client connection of a request."""

    @property
    def listener(self) -> TracedListener: ...

    @property
    def client_ip(self) -> str: ...


class CacheStatus(Protocol):
    """What a route's cache did for a forwarded request (``cache.flow.CacheState``)."""

    @property
    def status(self) -> bytes:
        """The ``Cache-Status`` parameters: ``fwd=miss``, ``fwd=stale``, ..."""
        ...


class TracedRoute(Protocol):
    """The route a traced request took (``forwarding.router.Route``)."""

    @property
    def name(self) -> str: ...

    @property
    def cache(self) -> Named | None: ...


class TracedExchange(Protocol):
    """A request as tracing sees it (``forwarding.exchange.Exchange``). ``begin``
    reads ``found`` (and rewrites its ``parts``: the headers sent upstream) and sets
    ``trace_id`` and ``span``; the span reads the rest when the request ends."""

    #: the trace id sent upstream (set by ``Exchange.start`` or ``Tracer.begin``)
    trace_id: bytes
    #: the request's spans when it is sampled, its parent ids when it is an unsampled
    #: child of the client's trace (set by ``Tracer.begin``)
    span: Relay | None

    @property
    def found(self) -> RequestHeaders:
        """The request's headers: ``traceparent``, ``tracestate``, ``parts``."""
        ...

    @property
    def started(self) -> float:
        """``time.perf_counter()`` when the request head was read."""
        ...

    @property
    def method(self) -> bytes: ...

    @property
    def target(self) -> bytes:
        """The normalised request target (path and query)."""
        ...

    @property
    def host(self) -> bytes | None: ...

    @property
    def http_minor(self) -> int: ...

    @property
    def request_id(self) -> bytes: ...

    @property
    def client(self) -> TracedClient: ...

    @property
    def pool(self) -> Pool | None: ...

    @property
    def upstream(self) -> Upstream | None:
        """The upstream tried last; None when none was."""
        ...

    @property
    def resp_started(self) -> bool:
        """A response head went to the client."""
        ...

    @property
    def status(self) -> int:
        """What the client was answered; 0 until then."""
        ...

    @property
    def answer(self) -> object:
        """A response made in place of an upstream's (the cache's, a filter's, the
        proxy's own), or None."""
        ...

    @property
    def cache_state(self) -> CacheStatus | None:
        """The route's cache at work for this request; None without a cache, or when a
        fresh memory hit answered at once."""
        ...
