"""What an upstream session offers the request it carries, and what it calls back.

Two ``typing.Protocol``s owned by ``upstream/`` (STYLE 15), so that the layer above
(``proxy.forwarding``) types against them and this layer imports nothing from it:

- ``UpstreamSession``: one request's channel to an upstream. ``UpstreamConnection``
  (a pooled HTTP/1.1 connection) implements it; an HTTP/2 stream will.
- ``ResponseSink``: the request a session carries (``Exchange``), told of the response
  as it is read: its head, body pieces, end, or a failure.

A session carries one request at a time; ``send_head`` attaches the sink and
``release`` (or ``close``) detaches it. Every sink callback runs inside the session's
read callback, so ``flush_client`` ends each read: what one read produced is written to
the client in one call.

The reasons a session's reading is paused live here too (bits of ``reading_paused``):
it reads again once no reason is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from proxy.errors import ProxyError
    from proxy.http.headers import RequestHeaders, ResponseHead
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import Upstream

# Why a session's reading is paused (bits of ``UpstreamSession.reading_paused``).
CLIENT_SLOW: Final = 1  # the client's write buffer is full
STORE_BEHIND: Final = 2  # the cache's Redis store is behind the body
FILTER_HOLD: Final = 4  # an async response filter holds the response


class UpstreamSession(Protocol):
    """One request's channel to an upstream: send the request, read the response.

    The request goes out as ``send_head`` (the head and the body gathered so far),
    then ``send_body`` for each later run of body pieces; the body's end is in its
    pieces (HTTP/1.1: the terminating chunk or the ``Content-Length``); request
    trailers are not forwarded. The response comes back to the ``ResponseSink`` given
    to ``send_head``: ``on_response_head``, ``on_response_body``,
    ``on_response_trailers`` (if any), ``on_response_complete`` (the end), or
    ``on_upstream_lost`` (a reset, a close, an invalid response). ``close`` is the
    reset: it abandons the request, and a session closed so is never reused.
    """

    @property
    def upstream(self) -> Upstream:
        """The upstream this session belongs to."""

    @property
    def uses(self) -> int:
        """Requests sent on it so far (more than one: it was reused from the pool)."""

    @property
    def responded(self) -> bool:
        """Any byte of the current response has arrived."""

    @property
    def reading_paused(self) -> int:
        """The reasons (``CLIENT_SLOW``, ...) reading is paused for; 0: reading."""

    def send_head(self, sink: ResponseSink, head: bytes, body: Sequence[bytes]) -> None:
        """Start a request: write ``head`` and the ``body`` pieces gathered so far (one
        write); the response goes to ``sink``."""

    def send_body(self, pieces: list[bytes]) -> None:
        """Write more of the request body, framed as it goes on the wire, in one write."""

    def write_buffer_size(self) -> int:
        """Request bytes written but not yet taken by the upstream."""

    def pause_reading(self, reason: int) -> None:
        """Stop reading the response for ``reason`` (a bit; see the module's reasons)."""

    def resume_reading(self, reason: int) -> None:
        """Drop ``reason``; read again when no other holds it back."""

    def release(self) -> None:
        """The request is over (its response complete): detach the sink. Where the
        session goes next (idle, to a waiting request, closed) is the pool's call."""

    def reusable(self) -> bool:
        """Open, detached and not closing: it may carry another request."""

    def close(self) -> None:
        """Reset: abandon the current request (if any) and close the session."""


class ResponseSink(Protocol):
    """The request an ``UpstreamSession`` carries, told of its response as it is read.

    Called only from the session's read and write callbacks, synchronously, in this
    order: ``on_informational`` (any 1xx), then ``on_response_head`` and
    ``on_response_body`` for each piece, then ``on_response_complete``; or
    ``relay_whole`` for a whole response framed by a known head (the fast path), or
    ``on_switch`` for a ``101`` to an Upgrade request; ``on_upstream_lost`` when it ends
    otherwise. After ``on_response_complete``, ``on_switch``, ``on_upstream_lost`` or a
    False from ``on_response_head``, the session no longer calls the sink.
    ``flush_client`` ends every read.
    """

    @property
    def parse_only(self) -> bool:
        """True: every response goes through the parser (a HEAD, an Upgrade request):
        never framed from a known head, never ``relay_whole``."""

    @property
    def head_request(self) -> bool:
        """The request is a HEAD: its response has no body whatever its head says."""

    @property
    def found(self) -> RequestHeaders:
        """The request's head as parsed: ``upgrade`` (None: a ``101`` is invalid),
        ``trailers`` (the client keeps trailer fields)."""

    def on_informational(self, status: int, raw: bytes) -> None:
        """A 1xx head (``raw``) before the final response."""

    def on_response_head(self, status: int, found: ResponseHead) -> bool:
        """The final response head. False: the sink refused it (to retry elsewhere, or
        a filter failed): the session closes unread."""

    def relay_whole(
        self, conn: UpstreamConnection, known: ResponseHead, body: bytes | memoryview
    ) -> bool:
        """The whole response arrived in one read, framed by ``known``: relay and end it
        in one step (the sink releases ``conn``). False: nothing done, the session goes
        on with ``on_response_head``, ``on_response_body``, ``on_response_complete``."""

    def on_switch(self, conn: UpstreamConnection, head: bytes, rest: bytes) -> bool:
        """A ``101`` (``head``, raw) to an Upgrade request; ``rest`` followed it. True:
        the sink took the connection over (a tunnel); False: close it."""

    def on_response_body(self, data: bytes | memoryview) -> None:
        """A piece of the response body (de-chunked)."""

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response's trailer fields, before ``on_response_complete`` (HTTP/2; an
        HTTP/1.1 session reads them only when ``found.trailers``: the client keeps
        them). Names as they came (an HTTP/1.1 upstream's in any case), unchecked."""

    def on_response_complete(self, conn: UpstreamConnection, upstream_keep_alive: bool) -> None:
        """The response ended; ``upstream_keep_alive``: the upstream keeps ``conn`` open.
        The sink releases it (to the pool, or closed)."""

    def on_upstream_lost(
        self, conn: UpstreamConnection, error: ProxyError, reset: bool = False
    ) -> None:
        """The session ended before the response did: closed (``reset`` False: a clean
        end of file, which ends a close-delimited body), reset, or an invalid response."""

    def flush_client(self) -> None:
        """One read of the session is handled: write what it produced to the client."""

    def upstream_write_paused(self, paused: bool) -> None:
        """The session's write buffer crossed a water mark (True: full; False: drained)."""
