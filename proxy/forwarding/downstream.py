"""The client side of a request, as the exchange sees it: the ``Downstream`` interface.

Theory of operation
-------------------
An ``Exchange`` never writes bytes to a client and never parses any: it talks to a
``Downstream``, which owns the client's protocol. ``proxy.server.protocol``'s
``ClientConnection`` is the HTTP/1.1 one (a connection serves its exchanges one at a
time, so it hands the current one as ``ex``); an HTTP/2 stream will be another, and
``proxy.forwarding.background.Background`` is one with no client at all (a cache
revalidation sent through the pool like any request).

The downstream decides everything its protocol frames: a response's framing
(``Content-Length`` kept, chunked or close-delimited, ``Connection``), whether an
informational response or ``100 Continue`` can be sent, how the proxy's own answers
are written, and whether a protocol switch (``101``) can become a tunnel. The
exchange decides what is sent: which head, which body bytes, when it ends.

Flow control both ways: the downstream pauses reading the request for the reasons
below (bits of ``paused``, resumed per reason), and tells the exchange when its own
write buffer fills (``Exchange.client_write_paused``), which then holds the upstream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    import asyncio

    from proxy.clock import Clock
    from proxy.forwarding.core import ExchangeCore as Exchange
    from proxy.forwarding.router import Route, Router
    from proxy.http.headers import RequestIds, ResponseHead
    from proxy.metrics.access_log import AccessLog
    from proxy.metrics.stats import Stats
    from proxy.proxy_protocol import Addresses
    from proxy.tls import ServerTLS
    from proxy.tracing import Tracer
    from proxy.upstream.connection import UpstreamConnection

# Why a downstream stops reading its request (bits of ``Downstream.paused``).
PIPELINE: Final = 1  # a pipelined request waits for the one before it
BODY_WAIT: Final = 2  # a request body waits for an upstream connection
UPSTREAM_FULL: Final = 4  # the upstream's write buffer is full
UPGRADE: Final = 8  # an Upgrade request waits for its answer
#: the reasons that belong to the current exchange: they end with it
EXCHANGE_PAUSES: Final = UPSTREAM_FULL | BODY_WAIT


class Site(Protocol):
    """What the exchange needs of the listener a request came in on."""

    @property
    def name(self) -> str: ...
    @property
    def router(self) -> Router[Route]: ...
    @property
    def tracer(self) -> Tracer | None: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def tls(self) -> ServerTLS | None: ...
    @property
    def bind(self) -> str:
        """The address it listens on (``host:port``)."""


class Answer(Protocol):
    """A response the proxy makes itself (a filter's ``LocalResponse``, a cache hit, a
    fixed page): the downstream asks it for its bytes."""

    def render(self, close: bool, head_only: bool) -> bytes | list[bytes]: ...


class Downstream(Protocol):
    """The client side of one request (``ex``: the exchange it concerns)."""

    @property
    def listener(self) -> Site: ...

    client_ip: str
    client_ip_bytes: bytes
    #: the upstream request head's format (``proxy.http.headers.request_head``)
    head_template: bytes
    request_ids: RequestIds
    loop: asyncio.AbstractEventLoop
    clock: Clock
    #: a request body up to this size is read whole before a connection is taken
    body_buffer: int
    draining: bool
    #: count finished requests (metrics on)
    record: bool
    #: the access log wants upstream header times
    log_times: bool
    access_log: AccessLog | None
    #: why the request is not read (bits above); its write buffer is full
    paused: int
    write_paused: bool

    def addresses(self) -> Addresses | None:
        """Who connected to whom (a PROXY header's addresses where one was received):
        what a pool's ``send_proxy_protocol`` header says; None when unknown."""

    def pause(self, reason: int) -> None:
        """Stop reading the request for ``reason`` (until ``resume(reason)``)."""

    def resume(self, reason: int) -> None:
        """Drop ``reason``; read again when no other holds reading."""

    def send_continue(self, ex: Exchange) -> None:
        """``Expect: 100-continue``: ask the client for the body."""

    def send_informational(self, ex: Exchange, status: int, raw: bytes) -> None:
        """A 1xx response (``raw``: its head as the upstream sent it), if it can go."""

    def send_head(self, ex: Exchange, status: int, found: ResponseHead) -> None:
        """The response head (rewritten: ``proxy.http.headers.ResponseHead``), framed
        for this client; sets ``ex.keep_alive`` to whether the connection stays."""

    def send_body(self, ex: Exchange, data: bytes | memoryview) -> None:
        """A piece of the response body (gathered until ``flush``)."""

    def send_trailers(self, ex: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response's trailer fields (lower-case names), before ``send_end``: sent
        where the client's protocol carries them, dropped elsewhere."""

    def send_end(self, ex: Exchange) -> None:
        """The response body is complete (then ``flush``)."""

    def send_answer(self, ex: Exchange, answer: Answer, close: bool) -> None:
        """A whole response the proxy makes in place of the upstream's head, after
        which the upstream's body is dropped (a cache's 304 merge, a stale answer)."""

    def flush(self) -> None:
        """Write what was gathered since the last flush, in one call."""

    def send_whole(self, ex: Exchange, found: ResponseHead, body: bytes | memoryview) -> None:
        """The fast path: a response whose head and whole body are at hand (``found``
        frames it with ``Content-Length``), written in one call."""

    def send_local(self, ex: Exchange, status: int, answer: Answer | None, close: bool,
                   cause: str) -> None:  # fmt: skip
        """The proxy's own answer (``answer``, or the error page for ``status``)."""

    def send_redirect(self, ex: Exchange, location: bytes, close: bool) -> None:
        """``308`` to ``location`` (``redirect_https``)."""

    def switch(self, ex: Exchange, conn: UpstreamConnection, protocol: str, head: bytes,
               rest: bytes) -> None:  # fmt: skip
        """The upstream switched protocols (``101``): relay ``head`` and join the two
        connections (``rest``: what the upstream sent after it)."""

    def exchange_done(self, ex: Exchange, keep_alive: bool) -> None:
        """``ex`` wrote its whole response (``keep_alive``: the connection may stay)."""

    def close(self) -> None:
        """Close after what is written has been sent."""
