"""The upstream side of one keep-alive connection: write a request, parse the response.

A connection serves one exchange at a time (no pipelining upstream): it is an
``UpstreamSession`` and the exchange its ``ResponseSink`` (``proxy.upstream.session``).
Parsed events go straight to the exchange; the exchange decides what the client sees.
The connection only knows HTTP framing facts the exchange cannot: that a HEAD response
has no body (httptools cannot be told, so parsing stops after the head and the parser
is renewed), that 1xx responses precede the real one, and whether it is still reusable.

A response whose head is byte for byte one the parser accepted before (the exchange's
head cache) is framed from that head instead: its ``Content-Length`` body is counted,
not parsed, and passed on without a copy. When such a response arrives whole in one
read, the sink's ``relay_whole`` relays and completes it in one step (the fast path).
Anything else goes through the parser.

A parsed response completes after the read that ended it has been parsed whole
(``finished``), never from inside the parser: bytes after it in the same read (a
second response to one request, garbage) are found first (``on_message_begin``), and
then the connection is closed rather than pooled, so nothing of one response can reach
the next exchange. A status below 100 and a ``101`` nobody asked for are invalid
responses (502), with nothing of them relayed. A close-delimited body ends with a clean
close (FIN); a reset leaves it unterminated, and the client connection is closed.

A chunked response's trailer fields are read only when the request said ``TE:
trailers`` (``proxy.upstream.trailers``: the rest of that response goes to a parser
that reports header lines), and reach the exchange before its end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import httptools

from proxy.errors import UpstreamProtocolError, UpstreamResetError
from proxy.http.headers import known_response_head, response_head
from proxy.tcp import JOIN_BELOW, ack_now, write_pieces

# the pause reasons live in ``proxy.upstream.session``; named here for older imports
from proxy.upstream.session import CLIENT_SLOW as CLIENT_SLOW
from proxy.upstream.session import FILTER_HOLD as FILTER_HOLD
from proxy.upstream.session import STORE_BEHIND as STORE_BEHIND
from proxy.upstream.trailers import InvalidTrailers, trailer_parser

log = logging.getLogger("aiolb")

if TYPE_CHECKING:
    from proxy.upstream.pool import Upstream
    from proxy.upstream.session import ResponseSink


#: Largest response head accepted from an upstream (nginx's default buffer is 4-8 KiB).
MAX_RESPONSE_HEAD = 64 * 1024


class _HeadDone(Exception):
    """Raised inside the parser to stop it after the head of a response to HEAD."""


class _Dropped(Exception):
    """Raised inside the parser when the exchange refused the response (to retry it
    elsewhere): the rest of it is never read, and the connection is closed."""


class _Invalid(Exception):
    """Raised inside the parser for a response that parses but must not be relayed
    (``reason``): the exchange fails it as a protocol error (502 or a retry)."""


class _Extra(Exception):
    """Raised inside the parser when a message begins after the current response ended
    in the same read: the connection is out of step and is closed."""


class _Switched(Exception):
    """Raised inside the parser after a ``101`` to an Upgrade request: the connection
    now belongs to a tunnel, and nothing more is parsed."""


class _Trailing(Exception):
    """Raised inside the parser after the head of a chunked response whose trailers are
    wanted: the rest (``rest``, this read's bytes after the head) is read by a
    ``trailer_parser`` (``keep_alive``: what the head said)."""

    def __init__(self, rest: bytes, keep_alive: bool) -> None:
        super().__init__()
        self.rest = rest
        self.keep_alive = keep_alive


class UpstreamConnection(asyncio.Protocol):
    """An HTTP/1.1 keep-alive connection to an upstream: an ``UpstreamSession``."""

    __slots__ = (
        "acked",
        "body_left",
        "closed",
        "collecting",
        "exchange",
        "finished",
        "idle_since",
        "informational",
        "keep_alive",
        "parser",
        "proxy_key",
        "raw",
        "raw_start",
        "reading_paused",
        "responded",
        "transport",
        "upstream",
        "uses",
        "write_full",
    )

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: ResponseSink | None = None
        self.raw = b""  # response bytes received until the final head is complete
        self.raw_start = 0  # where the current head starts in ``raw`` (after 1xx heads)
        self.collecting = False
        self.informational = False
        self.responded = False  # any byte of the current response received
        self.closed = False
        self.reading_paused = 0  # the reasons (CLIENT_SLOW, ...) it is paused for
        self.idle_since = 0.0
        self.uses = 0
        #: the PROXY header it sent first (``send_proxy_protocol``): whose it is
        self.proxy_key = b""
        self.acked = False  # ack_now was called during the current response
        self.body_left = 0  # body bytes still to come, when ``_known`` framed the response
        self.keep_alive = True  # the upstream keeps the connection after that response
        #: the parsed response ended in the current read: 1 (the connection may be
        #: kept), 2 (closed after it), 0 (not yet); completed once the read is parsed
        self.finished = 0
        #: the transport's write buffer is above its high-water mark: the request is
        #: not through, and the next exchange would never hear of the pause
        self.write_full = False

    # -- asyncio callbacks --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.closed = True
            self.parser = None  # type: ignore[assignment]  # a cycle: see ClientConnection
            upstream = self.upstream
            upstream.connection_closed()
            ex = self.exchange
            if ex is None:
                upstream.forget(self)
                return
            self.exchange = None
            if exc is None:  # end of file: a close-delimited body may end here
                ex.on_upstream_lost(self, UpstreamResetError("upstream closed the connection"))
            else:  # a reset (or a broken transport): never the end of a body
                ex.on_upstream_lost(
                    self, UpstreamResetError(f"upstream reset the connection ({exc})"), reset=True
                )
        except Exception as error:  # a bug: it never escapes a protocol callback
            log.error("bug after an upstream connection closed", exc_info=error)

    def data_received(self, data: bytes) -> None:
        try:
            ex = self.exchange
            if ex is None:  # bytes on an idle connection: it is out of step, drop it
                self.close()
                return
            self.responded = True
            if self.body_left:  # more of a body framed from a known head
                self._count_body(ex, data)
            elif self.collecting and not self.raw and not ex.parse_only and self._known(ex, data):
                if self.exchange is not ex:  # the whole response was in this read: relayed
                    return
            else:
                self._parse(ex, data)
            if self.exchange is ex:
                if self.collecting and len(self.raw) > MAX_RESPONSE_HEAD:
                    self._fail(ex, f"response head larger than {MAX_RESPONSE_HEAD} bytes")
                elif not self.acked:  # more of this response to come: see proxy.tcp
                    self.acked = True
                    assert self.transport is not None
                    ack_now(self.transport)
            ex.flush_client()
        except Exception as exc:  # a bug: it never escapes a protocol callback
            self._bug(exc)

    def _parse(self, ex: ResponseSink, data: bytes) -> None:
        if self.collecting:
            self.raw = data if not self.raw else self.raw + data
        trailing: _Trailing | None = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            error = exc.__context__
            if isinstance(error, _Dropped):
                self.close()
                return
            if isinstance(error, _Switched):
                return
            if isinstance(error, _HeadDone):
                keep_alive = self.parser.should_keep_alive() and self.finished != 2
                self.parser = httptools.HttpResponseParser(self)
                self.finished = 0
                ex.on_response_complete(self, keep_alive)
            elif isinstance(error, _Extra):
                self.finished = 2  # completed below, and the connection closed
            elif isinstance(error, _Trailing):  # read on, out of this handler (below)
                trailing = error
            elif isinstance(error, (_Invalid, InvalidTrailers)):
                self._fail(ex, str(error))
                return
            else:
                log.error("bug while relaying a response", exc_info=error)
                self._fail(ex, "internal error")
                return
        except httptools.HttpParserUpgrade:
            if not self.finished:
                self._fail(ex, "upstream switched protocols unasked")
                return
            self.finished = 2
        except httptools.HttpParserError as exc:
            if not self.finished:
                self._fail(ex, f"invalid response from upstream: {exc}")
                return
            self.finished = 2  # bytes after a complete response: out of step
        if trailing is not None:  # the rest with a parser that sees trailers (not from
            # inside the handler: an exception there would take this one as its context)
            self.parser = trailer_parser(self, trailing.keep_alive)
            self._parse(ex, trailing.rest)
            return
        finished = self.finished
        if finished:
            self.finished = 0
            if finished == 2:
                self.parser = httptools.HttpResponseParser(self)  # never reused anyway
            ex.on_response_complete(self, finished == 1)

    def _known(self, ex: ResponseSink, data: bytes) -> bool:
        """A response starts with this read. If its head is one the parser accepted before
        (so byte for byte the same framing: ``known_response_head``), and of the common
        shape with a ``Content-Length`` that this read does not exceed, frame it from the
        cached head: the body is counted, not parsed (``_count_body``), and passed on
        without a copy. False: the parser takes the read."""
        end = data.find(b"\r\n\r\n") + 4
        if end < 4:
            return False
        head = data[:end] if end < len(data) else data
        known = known_response_head(head)
        body = len(data) - end
        if known is None or known.length < body:  # -1: not the common shape
            return False
        if known.length == body and self.upstream.pool.fast_path:  # all of it in this read
            whole = data[end:] if body <= JOIN_BELOW else memoryview(data)[end:]
            if ex.relay_whole(self, known, whole):
                return True
        self.collecting = False
        if not ex.on_response_head(known.status, known):
            self.exchange = None
            self.close()
            return True
        self.keep_alive = not known.close
        self.body_left = known.length
        # small bodies are copied out of the read (they are joined for writing anyway)
        self._count_body(ex, data[end:] if body <= JOIN_BELOW else memoryview(data)[end:])
        return True

    def _count_body(self, ex: ResponseSink, data: bytes | memoryview) -> None:
        """Body bytes of a response framed by ``_known``; the response completes when
        ``body_left`` reaches 0. Bytes past the end are not ours (a broken upstream):
        they are dropped with the connection."""
        left = self.body_left - len(data)
        if left < 0:
            data = data[: self.body_left]
            self.keep_alive = False
            left = 0
        self.body_left = left
        if data:
            ex.on_response_body(data)
        if not left:
            ex.on_response_complete(self, self.keep_alive)

    def pause_writing(self) -> None:
        self.write_full = True
        ex = self.exchange
        if ex is not None:
            ex.upstream_write_paused(True)

    def resume_writing(self) -> None:
        self.write_full = False
        ex = self.exchange
        if ex is not None:
            ex.upstream_write_paused(False)

    # -- httptools callbacks ---------------------------------------------------------
    # No on_header/on_status: the head is taken from the raw bytes (``self.raw``), so
    # the parser validates and frames, and Python sees one call per head, not per line.
    # Trailers wanted: the rest of the response goes to a ``trailer_parser``.

    def on_message_begin(self) -> None:
        if self.finished:  # a second message in the read that ended the response
            raise _Extra

    def on_headers_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        raw, start = self.raw, self.raw_start
        end = raw.index(b"\r\n\r\n", start) + 4
        status = self.parser.get_status_code()
        if status == 101:
            if ex.found.upgrade is None:  # nobody asked: relay nothing of it
                raise _Invalid("upstream switched protocols unasked")
            self.exchange = None
            self.collecting = False
            self.raw = b""
            if not ex.on_switch(self, raw[start:end], raw[end:]):
                self.close()
            raise _Switched
        if status < 200:
            if status < 100:
                raise _Invalid(f"invalid status {status} from upstream")
            self.informational = True
            self.raw_start = end
            ex.on_informational(status, raw[start:end])
            return
        self.raw = b""
        self.collecting = False
        try:
            found = response_head(raw[start:end] if start or end < len(raw) else raw)
        except ValueError as exc:  # a head the parser passed but the rules cannot read
            raise _Invalid(f"invalid response from upstream: {exc}") from None
        if not ex.on_response_head(status, found):
            self.exchange = None
            raise _Dropped
        if ex.head_request:
            if end < len(raw):  # bytes after the head of a response to HEAD
                self.finished = 2
            raise _HeadDone
        if found.chunked and ex.found.trailers and status != 204 and status != 304:
            raise _Trailing(raw[end:], self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        ex.on_response_body(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            return
        # completed by ``_parse`` once this read is parsed whole
        self.finished = 1 if self.parser.should_keep_alive() else 2

    # -- used by the exchange and the pool -------------------------------------------

    def send_head(self, sink: ResponseSink, head: bytes, body: Sequence[bytes]) -> None:
        """Start an exchange on this connection, writing its request head and the body
        gathered so far."""
        self.exchange = sink
        self.responded = False
        self.raw = b""
        self.raw_start = 0
        self.collecting = True
        self.acked = False
        self.finished = 0
        self.uses += 1
        assert self.transport is not None
        if body:
            write_pieces(self.transport, [head, *body])
        else:  # a request without a body, or whose body has not arrived yet
            self.transport.write(head)

    def send_body(self, pieces: list[bytes]) -> None:
        """More of the request body (framed as it came), in one write."""
        assert self.transport is not None
        write_pieces(self.transport, pieces)

    def write_buffer_size(self) -> int:
        t = self.transport
        return t.get_write_buffer_size() if t is not None else 0

    def release(self) -> None:
        """The exchange is over; the connection is idle (the pool decides its fate)."""
        self.exchange = None

    def reusable(self) -> bool:
        t = self.transport
        return (
            not self.closed and t is not None and not t.is_closing() and self.exchange is None
            and not self.write_full  # a request still being written: never reused
        )  # fmt: skip

    def detach(self) -> None:
        """A tunnel took over the transport: this object is done with it (the tunnel
        reports the close to the upstream, ``Upstream.connection_closed``)."""
        self.closed = True
        self.exchange = None
        self.parser = None  # type: ignore[assignment]

    def close(self) -> None:
        self.exchange = None
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
            self.upstream.forget(self)

    def pause_reading(self, reason: int) -> None:
        if self.transport is None:
            return
        if not self.reading_paused:
            self.transport.pause_reading()
        self.reading_paused |= reason

    def resume_reading(self, reason: int) -> None:
        """Drop ``reason``; read again when no other holds it back."""
        if self.reading_paused and self.transport is not None:
            self.reading_paused &= ~reason
            if not self.reading_paused:
                self.transport.resume_reading()

    def _bug(self, exc: Exception) -> None:
        """Something raised while relaying a response: log it, fail the exchange (a 502,
        or a closed client connection mid-response) and close this connection."""
        log.error("bug while relaying a response", exc_info=exc)
        ex = self.exchange
        if ex is None:
            self.close()
            return
        try:
            self._fail(ex, "internal error")
        except Exception as again:
            log.error("bug while failing a response", exc_info=again)
            self.close()

    def _fail(self, ex: ResponseSink, reason: str) -> None:
        self.exchange = None
        ex.on_upstream_lost(self, UpstreamProtocolError(reason))
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("active" if self.exchange else "idle")
        return f"<UpstreamConnection {self.upstream.address} [{state}, {self.uses} requests]>"
