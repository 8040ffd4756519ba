"""A request with no client: a cache's background revalidation, sent through the pool.

Theory of operation
-------------------
A ``stale-while-revalidate`` hit answers its client with the stale entry at once and
asks for the entry again behind the client's back (``proxy.cache.flow.refresh``, which
calls ``Exchange.revalidate`` with a ``CacheState`` that revalidates the entry). That
request is an ordinary ``Exchange``, built here from the one that triggered it
(``revalidation``), whose downstream is a ``Background``: a ``Downstream`` with no
client. It starts at the cache phase (``Exchange.start_refresh``): the route's request
filters ran for the triggering request and do not run again (its forwarded headers are
taken as they left them); the pick, ``max_connections``, retries, passive health, the
forwarding headers, the metrics and the access log apply as to any request, and the
``CacheState`` stores what comes back as a forwarded request's would. On a route with
``compress``, that filter alone encodes the body as the triggering request's variant
(``_encoded_as``).

``Background`` carries what the exchange reads of its downstream, copied from the
triggering request's (its listener, so the metrics' ``listener`` label and the access
log; its client's address, so ``X-Forwarded-For``; its head template, so the
``X-Forwarded-Proto`` and ``Forwarded`` it would have had), never pauses, drops
whatever would be written, and ends with its exchange: there is no connection to keep
alive. The exchange's deadlines (the queue, the response header, reads) are swept on
the clock's tick as a client connection sweeps its current exchange's.

Its request id is a fresh one with ``REVALIDATION`` after it: the access log line and
the upstream's ``X-Request-ID`` tell a background refresh apart.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Final

from proxy.cache.flow import NOT_REVALIDATED
from proxy.filters.base import Request
from proxy.filters.chain import FilterChain
from proxy.http.headers import RequestHeaders, without

if TYPE_CHECKING:
    import asyncio

    from proxy.cache.flow import CacheState
    from proxy.clock import Clock
    from proxy.forwarding.core import ExchangeCore
    from proxy.forwarding.downstream import Answer, Downstream, Site
    from proxy.forwarding.exchange import Exchange
    from proxy.http.headers import RequestIds, ResponseHead
    from proxy.metrics.access_log import AccessLog
    from proxy.proxy_protocol import Addresses
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

#: What a background refresh's request id ends with (``X-Request-ID``, the access log).
REVALIDATION: Final = b"-revalidate"


def revalidation(ex: Exchange, state: CacheState, target: bytes) -> None:
    """Start, on the next loop iteration (the stale answer goes out first), the
    background exchange that revalidates ``state``'s entry for ``ex``'s request: a GET
    of ``target`` (the upstream target ``ex`` would have sent) on ``ex``'s host, with the
    headers ``ex`` would have forwarded but ``NOT_REVALIDATED`` ones, a fresh request id
    and ``ex``'s client's address."""
    pool = ex.pool
    assert pool is not None
    given = ex.found
    found = RequestHeaders([])
    found.parts = without(given.parts, NOT_REVALIDATED)
    found.host = given.host
    found.forwarded_for = given.forwarded_for
    client = Background(ex.client)
    found.request_id = next(client.request_ids) + REVALIDATION
    background = type(ex)(client, b"GET", ex.target, state.request.headers, found, 1, False)
    background.trace_id = ex.trace_id  # the same trace (``tracing``), not sampled
    _encoded_as(ex, background, target)
    client.exchange = background
    client.loop.call_soon(client.begin, pool, state, target)


def _encoded_as(ex: Exchange, background: Exchange, target: bytes) -> None:
    """A route with ``compress``: the refresh stores what the entry's clients get, the
    body encoded as ``ex``'s request chose (its variant), by that filter alone (a chain
    of it only: the route's other filters do not run again)."""
    filters = ex.filters
    if filters is None or filters.encoding is None or filters.chain.encoder is None:
        return
    given = filters.chain
    chain = FilterChain(given.route, given.pool, [("compress", given.encoder)])  # type: ignore[list-item]
    req = Request(chain, background, target)
    req.encoding = filters.encoding
    background.filters = req


class Background:
    """The ``Downstream`` of a background request: no client, nothing written, no
    pauses; the deadlines of its one exchange swept on the clock's tick."""

    __slots__ = (
        "access_log",
        "body_buffer",
        "client_addresses",
        "client_ip",
        "client_ip_bytes",
        "clock",
        "draining",
        "exchange",
        "head_template",
        "listener",
        "log_times",
        "loop",
        "paused",
        "record",
        "request_ids",
        "write_paused",
    )

    def __init__(self, client: Downstream) -> None:
        """What the exchange reads of its downstream, as ``client`` (the triggering
        request's downstream) has it."""
        self.listener: Site = client.listener
        self.client_ip: str = client.client_ip
        self.client_ip_bytes: bytes = client.client_ip_bytes
        #: the triggering client's, for a ``send_proxy_protocol`` pool
        self.client_addresses: Addresses | None = client.addresses()
        self.head_template: bytes = client.head_template
        self.request_ids: RequestIds = client.request_ids
        self.loop: asyncio.AbstractEventLoop = client.loop
        self.clock: Clock = client.clock
        self.record: bool = client.record
        self.log_times: bool = client.log_times
        self.access_log: AccessLog | None = client.access_log
        self.body_buffer = 0  # there is no body
        self.draining = False
        self.paused = 0
        self.write_paused = False
        self.exchange: Exchange | None = None

    def addresses(self) -> Addresses | None:
        return self.client_addresses

    def begin(self, pool: Pool, state: CacheState, target: bytes) -> None:
        """Run the exchange from its cache phase, its deadlines swept from now on."""
        ex = self.exchange
        assert ex is not None
        self.clock.add_sweeper(self.sweep)
        try:
            ex.start_refresh(pool, state, target)
        except Exception as exc:  # a bug: it never escapes a loop callback
            log.error("bug in a background revalidation of %r", ex.target[:200], exc_info=exc)
            ex.abort()  # the cache's flight lands with it
            self.close()

    def sweep(self, now: float) -> None:
        """The clock's tick: the exchange's deadline (a queue, the response header, a
        read) is due."""
        ex = self.exchange
        if ex is None or ex.done:
            self.close()
        elif ex.deadline <= now:
            ex.on_timeout()

    # -- the Downstream interface: nothing to read, nothing to write -----------------------

    def pause(self, reason: int) -> None:
        pass

    def resume(self, reason: int) -> None:
        pass

    def send_continue(self, ex: ExchangeCore) -> None:
        pass

    def send_informational(self, ex: ExchangeCore, status: int, raw: bytes) -> None:
        pass

    def send_head(self, ex: ExchangeCore, status: int, found: ResponseHead) -> None:
        ex.keep_alive = False

    def send_body(self, ex: ExchangeCore, data: bytes | memoryview) -> None:
        pass

    def send_trailers(self, ex: ExchangeCore, trailers: list[tuple[bytes, bytes]]) -> None:
        pass

    def send_end(self, ex: ExchangeCore) -> None:
        pass

    def send_answer(self, ex: ExchangeCore, answer: Answer, close: bool) -> None:
        pass

    def flush(self) -> None:
        pass

    def send_whole(self, ex: ExchangeCore, found: ResponseHead, body: bytes | memoryview) -> None:
        pass

    def send_local(self, ex: ExchangeCore, status: int, answer: Answer | None, close: bool,
                   cause: str) -> None:  # fmt: skip
        pass

    def send_redirect(self, ex: ExchangeCore, location: bytes, close: bool) -> None:
        pass

    def switch(self, ex: ExchangeCore, conn: UpstreamConnection, protocol: str, head: bytes,
               rest: bytes) -> None:  # fmt: skip
        conn.close()  # never asked for: a GET without Upgrade gets no tunnel

    def exchange_done(self, ex: ExchangeCore, keep_alive: bool) -> None:
        self.close()

    def close(self) -> None:
        """The exchange is over: stop sweeping it."""
        self.exchange = None
        self.clock.remove_sweeper(self.sweep)

    def __repr__(self) -> str:
        ex = self.exchange
        return f"<Background {self.client_ip} [{ex!r}]>"
