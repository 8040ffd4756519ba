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
asks the tunnel whether it has been idle for ``timeouts.tunnel_idle``. The header
deadline runs from the accept, so on a TLS listener the handshake counts against it.

Upgrade requests (``Connection: upgrade`` and an ``Upgrade`` protocol the route
allows, see ``Exchange``) stop the parser: what the client sent after the request is
held, and reading pauses, until the answer. A ``101`` makes the connection a byte
tunnel (``proxy.server.tunnel``), which gets the held bytes; any other answer is
an ordinary response, and the held bytes are parsed as the next request.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Final

import httptools

from proxy.clock import NEVER
from proxy.forwarding.downstream import EXCHANGE_PAUSES, PIPELINE, UPGRADE, UPSTREAM_FULL
from proxy.forwarding.exchange import Exchange
from proxy.http.headers import (
    REQUEST_HEAD,
    REQUEST_HEAD_TLS,
    RequestHeaders,
    forwarded_template,
)
from proxy.http.responses import error_response
from proxy.server.respond import H1Responses
from proxy.tcp import ack_now

if TYPE_CHECKING:
    from proxy.forwarding.core import ExchangeCore
    from proxy.server.listener import Listener
    from proxy.server.tunnel import Tunnel

log = logging.getLogger("aiolb")

#: Client write buffer above which the upstream is paused (low water is a quarter).
#: Bounds memory per streaming connection; large enough that a 64 KiB response does
#: not bounce the upstream between paused and resumed.
WRITE_HIGH_WATER: Final = 256 * 1024

IDLE: Final = 0  # between requests (keep-alive)
HEAD: Final = 1  # a request head is arriving
BODY: Final = 2  # a request body is arriving
BUSY: Final = 3  # request read; its response is pending
TUNNEL: Final = 4  # an Upgrade tunnel (``proxy.server.tunnel``) owns the transport


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Closed(Exception):
    """Raised inside a parser callback to stop parsing: the connection is closing
    (an answer said ``Connection: close``), so what follows in the buffer is dropped."""


class _Rejection:
    """A queued error response, answered after the responses due before it."""

    __slots__ = ("client", "done", "status")

    def __init__(self, client: ClientConnection, status: int) -> None:
        self.client = client
        self.status = status
        self.done = False

    def start(self) -> None:
        self.done = True
        self.client.answer_and_close(self.status)

    def abort(self) -> None:
        self.done = True


class ClientConnection(H1Responses, asyncio.Protocol):
    """One client connection: HTTP/1.1 requests in, each an ``Exchange``; the
    exchanges' ``Downstream`` (the response side is ``H1Responses``)."""

    #: what a request head becomes (the test suite puts a state-checking subclass here)
    exchange_type: type[Exchange] = Exchange

    __slots__ = (
        "_advancing",
        "access_log",
        "acked",
        "body_buffer",
        "broken",
        "chunk_len",
        "client_ip",
        "client_ip_bytes",
        "clock",
        "closed",
        "deadline",
        "draining",
        "exchange",
        "head_bytes",
        "head_template",
        "headers",
        "held",
        "in_head",
        "keep_forwarded",
        "listener",
        "log_times",
        "loop",
        "max_body",
        "max_header",
        "max_headers",
        "max_requests",
        "max_uri",
        "mode",
        "out",
        "parser",
        "parsing",
        "paused",
        "phase",
        "queue",
        "record",
        "reframe",
        "request_ids",
        "send_deadline",
        "send_mark",
        "served",
        "timeout_body",
        "timeout_header",
        "timeout_idle",
        "timeout_send",
        "transport",
        "tunnel",
        "underscores",
        "url",
        "write_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.clock = listener.clock
        self.record = listener.record  # metrics on: count every request
        self.access_log = listener.access_log
        #: the access log logs ``upstream_header_time``: exchanges note when heads arrive
        self.log_times = self.access_log is not None and self.access_log.times
        self.request_ids = listener.request_ids
        limits, timeouts = listener.config.limits, listener.config.timeouts
        self.max_header = limits.max_header_size
        self.max_uri = limits.max_uri_size
        self.max_body = limits.max_body_size
        self.max_headers = limits.max_headers
        self.body_buffer = limits.body_buffer_size
        self.underscores = limits.underscores_in_headers
        #: ``forwarded: append`` keeps the client's ``Forwarded``; ``replace`` and
        #: ``append`` send aiolb's (``head_template``, once the peer is known)
        self.keep_forwarded = listener.config.forwarded == "append"
        self.max_requests = limits.max_requests_per_connection or 0
        self.served = 0  # requests read on this connection
        self.timeout_header = timeouts.header
        self.timeout_idle = timeouts.idle
        self.timeout_body = timeouts.body
        self.timeout_send = timeouts.send
        #: while the client reads nothing (writing paused): when to look again, and the
        #: write buffer's size then (``_client_stalled``)
        self.send_deadline = NEVER
        self.send_mark = 0
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.client_ip_bytes = b""
        self.exchange: Exchange | _Rejection | None = None
        self.parsing: Exchange | None = None
        self.queue: deque[Exchange | _Rejection] = deque()
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.in_head = True
        self.head_bytes = 0
        self.chunk_len = 0
        self.phase = IDLE
        # accepted now: the header timeout runs from here (a TLS handshake included)
        self.deadline = self.clock.now + self.timeout_header
        #: the upstream request head's format: ``X-Forwarded-Proto: https`` behind TLS
        self.head_template = REQUEST_HEAD_TLS if listener.tls is not None else REQUEST_HEAD
        self.held = b""  # bytes after an Upgrade request, until its answer
        self.out: list[bytes | memoryview] = []  # the current response, until ``flush``
        self.mode = 0  # how the current response's body is framed (``respond.py``)
        self.tunnel: Tunnel | None = None
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.broken = False
        self.draining = listener.draining
        self._advancing = False
        self.acked = False  # ack_now was called during the current request
        #: the request being parsed has a body and Upgrade headers, so the parser ends
        #: its message at the head: its body is read by its framing (``_reframe``)
        self.reframe = False

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0]
            self.client_ip_bytes = peer[0].encode()
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
            self.close()
        elif self.queue or self._advancing or self.paused or self.draining:
            self._advance()
        elif self.phase == BUSY:  # the common case: nothing queued, go idle
            self.phase = IDLE
            self.deadline = self.clock.now + self.timeout_idle

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def reject(self, status: int) -> None:
        """Answer ``status`` and close, after any response still due before it."""
        self.broken = True
        self.deadline = NEVER
        current, parsing = self.exchange, self.parsing
        self.parsing = None
        if current is not None and current is not parsing and not current.done:
            if parsing is not None:
                if parsing in self.queue:
                    self.queue.remove(parsing)
                parsing.abort()
            self.queue.append(_Rejection(self, status))
            self.pause(PIPELINE)
            return
        if current is not None and current.__class__ is not _Rejection and current.resp_started:  # type: ignore[union-attr]
            self.close()  # mid-response: the only honest signal left is closing
            return
        self.answer_and_close(status)

    def answer_and_close(self, status: int) -> None:
        ex = self.exchange
        if ex is not None:
            if ex.__class__ is _Rejection or ex.done:
                ex = None  # (an exchange already answered was logged then)
            self.exchange.abort()  # type: ignore[union-attr]
        self.exchange = None
        if not self.closed:
            self.transport.write(error_response(status, True, self._is_head()))
            if self.record:
                self.listener.stats.record(self.listener.name, self._method(), status, 0.0)
                if self.access_log is not None:
                    self._log_refusal(status, ex, self._method(), self.url, self.headers)  # type: ignore[arg-type]
        self.close()

    def close(self) -> None:
        """Close after what is already written has been sent."""
        self.broken = True
        self.deadline = NEVER
        if not self.closed:
            self.closed = True
            self.transport.close()

    def check_timeouts(self, now: float) -> None:
        """Called on every clock tick by the listener's sweep."""
        if self.send_deadline <= now and self._client_stalled(now):
            return
        if self.paused & UPSTREAM_FULL:  # the upstream takes no body: its own deadline
            ex = self.exchange
            if ex is not None and ex.__class__ is not _Rejection and ex.upstream_stalled(now):  # type: ignore[union-attr]
                return  # 504, or closed mid-response
        if self.deadline <= now:
            if self.tunnel is not None:
                self.tunnel.check_idle(now)
                return
            if self.paused and self.phase != IDLE:  # we stopped reading, not the client
                self.deadline = now + self.timeout_body
            elif self.phase == IDLE or (self.draining and self.exchange is None):
                self.close()
            else:
                log.info("408 for %s: request not received in time", self.client_ip)
                self.reject(408)
        ex = self.exchange
        if ex is not None and ex.__class__ is not _Rejection and ex.deadline <= now:  # type: ignore[union-attr]
            ex.on_timeout()  # type: ignore[union-attr]

    def _client_stalled(self, now: float) -> bool:
        """The client has read nothing of a full write buffer for ``timeouts.send``
        (nginx's ``send_timeout``): close, which also frees the upstream. A client that
        reads, however slowly, gets another period."""
        if self.closed or not self.write_paused:
            self.send_deadline = NEVER
            return False
        size = self.transport.get_write_buffer_size()
        if size < self.send_mark:
            self.send_mark = size
            self.send_deadline = now + self.timeout_send
            return False
        log.info(
            "closing the connection of %s: it read nothing for %gs", self.client_ip,
            self.timeout_send,
        )  # fmt: skip
        self.broken = self.closed = True
        self.deadline = self.send_deadline = NEVER
        self.transport.abort()  # close() would wait for the buffer the client never reads
        return True

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

    def _method(self) -> bytes:
        """The current request's method, or OTHER if the request line did not parse."""
        try:
            method: bytes = self.parser.get_method()
        except Exception:
            return b"OTHER"
        return method

    def _is_head(self) -> bool:
        return self._method() == b"HEAD"

    def _head_size(self) -> int:
        return len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)

    def _callback_failed(self, exc: BaseException | None) -> None:
        if isinstance(exc, _Closed):
            return
        if isinstance(exc, _Reject):
            log.info("%d from %s", exc.status, self.client_ip)
            self.reject(exc.status)
        else:
            log.error("bug while handling a request from %s", self.client_ip, exc_info=exc)
            self.reject(500)

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
