"""The client side of one connection: parse requests, answer in order, enforce limits.

Theory of operation
-------------------
httptools parses every byte that arrives (``data_received`` → ``feed_data``); its
callbacks build one ``Exchange`` per request head. The first becomes current and
starts at once; pipelined ones queue behind it and reading pauses, so only the bytes
already read are parsed ahead. When the current exchange finishes, the next one
starts, or the connection goes idle (keep-alive) or closes.

Everything the client can get wrong ends here with a short response and a closed
connection, never a traceback: malformed framing or header syntax (400), CONNECT
(405), a slow header or body (408), a body over ``max_body_size`` (413), a long URI
(414), a large header block (431). An error found while an earlier pipelined
response is still due is answered after it, in order.

Timers are deadlines checked by the listener's sweep (``proxy.clock``); the phase
says what a deadline means: IDLE closes quietly, HEAD and BODY answer 408, TUNNEL
asks the tunnel whether it has been idle for ``timeouts.tunnel_idle``, LINGER ends a
lingering close. The header deadline runs from the accept, so on a TLS listener the
handshake counts against it.

An answer that ends the connection while the request body is still arriving (an
upstream's early 413, the proxy's own 404 to an upload) says ``Connection: close`` and
then lingers (nginx's lingering close, ``_linger``): the write side is shut, and what the
client still sends is read and dropped until it stops for 5 s (30 s at most). Closing at
once made the client's next bytes draw a reset, which destroys the answer in the
client's receive buffer before a client that uploads first and reads after can read it.

Upgrade requests (``Connection: upgrade`` and an ``Upgrade`` protocol the route
allows, see ``Exchange``) stop the parser: what the client sent after the request is
held, and reading pauses, until the answer. A ``101`` makes the connection a byte
tunnel (``proxy.server.tunnel``), which gets the held bytes; any other answer is
an ordinary response, and the held bytes are parsed as the next request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

import httptools

from proxy.clock import NEVER
from proxy.forwarding.downstream import EXCHANGE_PAUSES, PIPELINE, UPGRADE
from proxy.forwarding.exchange import Exchange
from proxy.http.headers import (
    RequestHeaders,
    forwarded_template,
)
from proxy.server.base import (
    BODY,
    BUSY,
    HEAD,
    IDLE,
    LINGER,
    LINGER_TIME,
    LINGER_TIMEOUT,
    TUNNEL,
    _Closed,
    _Reject,
)
from proxy.server.proxied import take_address
from proxy.server.refusals import _Rejection
from proxy.server.respond import H1Responses
from proxy.tcp import ack_now

if TYPE_CHECKING:
    from proxy.forwarding.core import ExchangeCore
    from proxy.server.tunnel import Tunnel

log = logging.getLogger("aiolb")

#: Client write buffer above which the upstream is paused (low water is a quarter).
#: Bounds memory per streaming connection; large enough that a 64 KiB response does
#: not bounce the upstream between paused and resumed.
WRITE_HIGH_WATER: Final = 256 * 1024



class ClientConnection(H1Responses):
    """One client connection: HTTP/1.1 requests in, each an ``Exchange``; the
    exchanges' ``Downstream`` (the response side is ``H1Responses``)."""

    #: what a request head becomes (the test suite puts a state-checking subclass here)
    exchange_type: type[Exchange] = Exchange

    __slots__ = ()

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        take_address(self, transport)
        if self.listener.config.forwarded != "drop":
            self.head_template = forwarded_template(self.head_template, self.client_ip)
        self.listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.closed = self.broken = True
            self.listener.connections.discard(self)
            # The parser holds bound methods of this object: drop it, so that a closed
            # connection is freed now by its reference count, not later by the cyclic GC
            # (whose pauses, with connections closing all the time, reach milliseconds).
            self.parser = None  # type: ignore[assignment]
            if self.exchange is not None:
                self.exchange.abort()
                self.exchange = None
            if self.parsing is not None:
                self.parsing.abort()
                self.parsing = None
            while self.queue:
                self.queue.popleft().abort()
        except Exception as error:  # a bug: it never escapes a protocol callback
            log.error("bug while closing a connection from %s", self.client_ip, exc_info=error)

    def data_received(self, data: bytes) -> None:
        try:
            while True:  # once, unless an Upgrade request leaves bytes to parse on
                if self.broken:
                    if self.phase == LINGER:  # dropped; the client is still sending
                        self.deadline = min(self.clock.now + LINGER_TIMEOUT, self.linger_until)
                    return
                self.chunk_len = len(data)
                if self.phase == IDLE:  # the first byte of a request: the header timer starts
                    self.phase = HEAD
                    self.deadline = self.clock.now + self.timeout_header
                rest = b""
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserCallbackError as exc:
                    self._callback_failed(exc.__context__)
                except httptools.HttpParserUpgrade as exc:
                    offset = exc.args[0] if exc.args else len(data)
                    if self.reframe:
                        rest = self._reframe(data, offset)
                    else:
                        rest = self._after_upgrade(data, offset)
                except httptools.HttpParserError as exc:
                    log.info("400 from %s: %s", self.client_ip, exc)
                    self.reject(400)
                else:
                    if self.in_head:  # a head is unfinished: count it against max_header_size
                        size = self.head_bytes
                        if size < 0:  # it began in this read: count what of it was parsed
                            # (where in the read it began is unknown: the bytes after the
                            # last LF may be the previous body's; the next read counts whole)
                            size = self._head_size() if self.url else 0
                        else:
                            size += len(data)
                        self.head_bytes = size
                        if size > self.max_header:
                            self.reject(431)
                    if self.phase in (HEAD, BODY) and not self.acked:
                        self.acked = True  # more of this request to come: see proxy.tcp
                        ack_now(self.transport)
                ex = self.exchange
                if ex is not None and ex.__class__ is not _Rejection and ex.pending:  # type: ignore[union-attr]
                    ex.flush_upstream()  # type: ignore[union-attr]
                if not rest:
                    return
                data = rest  # a loop, not a call: a thousand such requests in one read
        except Exception as exc:  # a bug: it never escapes a protocol callback
            self._callback_failed(exc)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_deadline = self.clock.now + self.timeout_send
        self.send_mark = self.transport.get_write_buffer_size()
        ex = self.exchange
        if ex is not None and ex.__class__ is not _Rejection:
            ex.client_write_paused(True)  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = NEVER
        ex = self.exchange
        if ex is not None and ex.__class__ is not _Rejection:
            ex.client_write_paused(False)  # type: ignore[union-attr]

    # -- httptools callbacks ---------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.max_uri:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # trailers of a chunked body arrive here too: dropped
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if not self.in_head:  # the stand-in head of a reframed body (``_reframe``)
            self.url = b""
            return
        if self.broken:  # answered and closing: nothing after that is served
            raise _Closed
        self.in_head = False
        parser = self.parser
        method = parser.get_method()
        if method == b"CONNECT":
            raise _Reject(405)
        limit = self.max_header
        if self.head_bytes + self.chunk_len > limit and self._head_size() > limit:
            raise _Reject(431)
        if len(self.headers) > self.max_headers:
            raise _Reject(431)
        try:
            found = RequestHeaders(self.headers, self.underscores, self.keep_forwarded)
        except ValueError:
            raise _Reject(400) from None
        has_body = found.chunked or found.content_length not in (None, b"0")
        if has_body and self.max_body is not None and not found.chunked:
            assert found.content_length is not None
            if int(found.content_length) > self.max_body:
                raise _Reject(413)
        keep_alive = parser.should_keep_alive()
        if keep_alive and found.connection is None:
            # Without a Connection header the parser keeps only HTTP/1.1 alive (1.0, 0.9
            # and 2.0 need "keep-alive"; it refuses other versions): the common case
            # needs no get_http_version(), which formats a string (0.3 µs).
            minor = 1
        else:
            version = parser.get_http_version()
            if version != "1.1" and version != "1.0":
                raise _Reject(505)
            minor = 1 if version == "1.1" else 0
            if found.chunked and not minor:  # RFC 9112 6.1: close after it
                keep_alive = False
        self.served += 1
        if self.served == self.max_requests:  # like nginx's keepalive_requests
            keep_alive = False
        ex = self.exchange_type(self, method, self.url, self.headers, found, minor, keep_alive)
        self.parsing = ex
        self.url = b""
        self.headers = []
        if has_body:
            self.phase = BODY
            self.deadline = self.clock.now + self.timeout_body
            if parser.should_upgrade():  # the parser ends this message at its head
                self.reframe = True
        else:
            self.phase = BUSY
            self.deadline = NEVER
        if self.exchange is None:
            self.exchange = ex
            ex.start()
        else:
            self.queue.append(ex)
            self.pause(PIPELINE)

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None:
            return
        if self.broken:  # answered and closing (or lingering): the rest is dropped
            raise _Closed
        ex.on_request_body(body)
        self.deadline = self.clock.now + self.timeout_body
        if self.max_body is not None and ex.body_size > self.max_body:
            raise _Reject(413)

    def on_message_complete(self) -> None:
        if self.reframe:  # ended at the head by the parser: the body follows
            return
        ex = self.parsing
        self.parsing = None
        self.in_head = True  # whatever follows is the next request's head
        self.head_bytes = -1  # it may begin inside this read
        self.acked = False
        self.phase = BUSY
        self.deadline = NEVER
        if ex is not None:
            ex.on_request_complete()

    # -- used by exchanges -------------------------------------------------------------------

    def exchange_done(self, ex: ExchangeCore | _Rejection, keep_alive: bool) -> None:
        """The current exchange wrote its whole response."""
        if ex is not self.exchange:
            return
        self.exchange = None
        if self.paused & EXCHANGE_PAUSES:  # its upstream's pauses end with it
            self.resume(EXCHANGE_PAUSES)
        if not keep_alive or self.closed:
            if self.phase == BODY and not self.closed:  # its body is still arriving
                self._linger()
            else:
                self.close()
        elif self.queue or self._advancing or self.paused or self.draining:
            self._advance()
        elif self.phase == BUSY:  # the common case: nothing queued, go idle
            self.phase = IDLE
            self.deadline = self.clock.now + self.timeout_idle

    def _linger(self) -> None:
        """The answer ends the connection while the client is still sending its request
        body: closing now would make the kernel reset the connection at the client's next
        bytes, and a reset can destroy the answer before the client reads it. Instead
        (nginx's lingering close) the write side is shut once the answer is out, and what
        the client still sends is read and dropped until it stops for ``LINGER_TIMEOUT``,
        or for ``LINGER_TIME`` at most; then the connection closes."""
        self.broken = True  # nothing more is parsed
        self.phase = LINGER
        now = self.clock.now
        self.linger_until = now + LINGER_TIME
        self.deadline = now + LINGER_TIMEOUT
        if self.paused:  # read on, whatever held reading
            self.paused = 0
            self.transport.resume_reading()
        if self.transport.can_write_eof():  # after what is buffered (TLS cannot)
            self.transport.write_eof()

    def become_tunnel(self, tunnel: Tunnel, deadline: float) -> bytes:
        """A ``101`` made this connection ``tunnel``; returns what the client sent after
        the Upgrade request (the tunnel's first bytes upstream)."""
        self.tunnel = tunnel
        self.phase = TUNNEL
        self.exchange = None
        self.write_paused = False  # the tunnel's side protocol gets the transport's pauses
        self.send_deadline = NEVER
        self.broken = True  # nothing more is parsed here
        self.deadline = deadline
        held, self.held = self.held, b""
        return held

    def drain(self) -> None:
        """Graceful shutdown: finish what is in flight, keep-alive off, close when idle
        (a tunnel stays open until the shutdown deadline)."""
        self.draining = True
        if self.exchange is None and self.phase == IDLE:
            self.close()

    # -- internals ---------------------------------------------------------------------------

    def _advance(self) -> None:
        if self._advancing:
            return
        self._advancing = True
        try:
            while self.exchange is None and self.queue and not self.closed:
                nxt = self.queue.popleft()
                self.exchange = nxt
                nxt.start()
        finally:
            self._advancing = False
        if not self.queue and not self.closed:
            # nothing waits behind the current exchange: read on (its body may be to come)
            self.resume(PIPELINE)
        if self.exchange is None and not self.closed:
            if self.phase == BUSY:
                self.phase = IDLE
                if self.draining:
                    self.close()
                else:
                    self.deadline = self.clock.now + self.timeout_idle
            if self.paused & UPGRADE:  # an Upgrade request had an ordinary answer
                held, self.held = self.held, b""
                self.resume(UPGRADE)
                if held:  # parse on
                    self.data_received(held)

    def _reframe(self, data: bytes, offset: int) -> bytes:
        """A request with a body and ``Connection: upgrade`` (never tunnelled): the
        parser ended its message at the head, so the body would be parsed as requests.
        A new parser is given a stand-in head with the request's own framing (its
        callbacks ignore it); what it returns, the rest of the read, is parsed next: the
        body reaches the exchange as any body, and what follows it is the next request."""
        self.reframe = False
        ex = self.parsing
        if ex is None or self.broken:
            return b""
        found = ex.found
        framing = (
            b"Transfer-Encoding: chunked" if found.chunked
            else b"Content-Length: " + (found.content_length or b"0")
        )  # fmt: skip
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(b"PUT / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
        return data[offset:]

    def _after_upgrade(self, data: bytes, offset: int) -> bytes:
        """The parser stopped after a request with ``Connection: upgrade``. If it is
        being forwarded as an Upgrade, hold what follows until its answer (b"");
        otherwise (``h2c``, a refused upgrade) return it, to parse on."""
        if self.broken:
            return b""
        rest = data[offset:]
        last = self.queue[-1] if self.queue else self.exchange
        if (
            last is not None and last.__class__ is not _Rejection
            and last.found.upgrade is not None and not last.done  # type: ignore[union-attr]
        ):  # fmt: skip
            self.held = bytes(rest)
            self.pause(UPGRADE)
            return b""
        return rest

    def __repr__(self) -> str:
        return (
            f"<ClientConnection {self.client_ip} [phase {self.phase}, "
            f"{'busy' if self.exchange else 'idle'}, {len(self.queue)} queued]>"
        )
