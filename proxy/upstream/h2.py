"""HTTP/2 to an upstream: one connection, many streams, each stream one request's session.

Theory of operation
-------------------
A pool with ``http_version: "2"`` keeps, per upstream, a few ``H2Upstream``
connections (``Upstream.h2``) instead of idle HTTP/1.1 ones. A request's session is an
``H2Session``: one stream, an ``UpstreamSession`` like a pooled HTTP/1.1 connection, so
the exchange, its retries, timeouts, passive health and metrics work per stream as
they do per connection.

Getting a stream is ``proxy.upstream.acquire`` as for HTTP/1.1: ``Upstream.take_idle``
opens a stream on the most recent connection below the upstream's
``SETTINGS_MAX_CONCURRENT_STREAMS`` (capped at ``MAX_STREAMS``); none has room, a
connection is opened (counted in ``max_connections``), and requests that ask while one
is opening wait for it rather than each opening their own. A new connection carries
one stream until the upstream's SETTINGS arrive (``settled``): its limit may be lower
than any guess, and a stream above it would be refused. A finished stream
(``H2Session.close``; ``reusable`` is always false, so the pool closes it) frees its
room, and a waiting request takes it.

The exchange sends HTTP/1.1 bytes (its head, its body framed by ``Content-Length`` or
chunks); the session translates them: the head to HTTP/2 headers
(``proxy.h2.headers.request_to_h2``), the chunks back to data. The response comes back
as the head bytes the exchange reads for HTTP/1.1 (``response_from_h2``), then body
pieces, then the trailers (``on_response_trailers``) and the end.

Flow control follows the client: a stream's received bytes are acknowledged only while
its exchange is not holding it (``pause_reading``: a slow client, the cache's store, a
filter), so the upstream stops sending that stream and not the others; a stream that ends
while held hands what it held back to the connection's window, which all streams share
(else every abandoned download would shrink it for good). Request bytes
beyond the stream's window wait in the session; above ``HIGH_WATER`` the exchange
stops reading its client (``upstream_write_paused``).

GOAWAY: no new stream on that connection; streams above its last stream id were not
processed and fail with a retryable ``UpstreamRefusedError`` (nothing reached the
application), the others finish; the connection closes with its last stream. An idle
connection is PINGed every ``PING_INTERVAL`` (at most half the pool's idle timeout) and
closed after the pool's idle timeout, or when a PING goes unanswered for the pool's
connect timeout (a dead peer is found before a request is sent to it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from proxy.errors import UpstreamProtocolError, UpstreamRefusedError, UpstreamResetError
from proxy.h2 import codec as h2c
from proxy.h2.codec import Codec, CodecError
from proxy.h2.headers import RequestFraming, request_to_h2, response_from_h2, trailers_ok
from proxy.http.headers import ResponseHead

if TYPE_CHECKING:
    from proxy.upstream.pool import Upstream
    from proxy.upstream.session import ResponseSink

log = logging.getLogger("aiolb")

#: Streams per connection at most, whatever the upstream allows (until its SETTINGS
#: say, RFC 9113 suggests assuming 100).
MAX_STREAMS: Final = 100
#: Request body bytes a stream holds beyond the upstream's window before the client is
#: paused (resumed below a quarter).
HIGH_WATER: Final = 256 * 1024
#: How much of a response a stream may receive before the exchange takes it
#: (SETTINGS_INITIAL_WINDOW_SIZE), and the connection's window for all streams.
STREAM_WINDOW: Final = 1024 * 1024
CONNECTION_WINDOW: Final = 16 * 1024 * 1024
#: An idle connection is PINGed this often (or at half the pool's ``timeouts.idle``, if
#: shorter: every idle connection is PINGed before it is closed), so that a dead one is
#: found before a request is sent on it.
PING_INTERVAL: Final = 30.0


class H2Upstream(asyncio.Protocol):
    """One HTTP/2 connection to an upstream."""

    __slots__ = (
        "closed",
        "codec",
        "goaway",
        "idle_since",
        "ping_pending",
        "pinged_at",
        "reserved",
        "scheme",
        "settled",
        "streams",
        "transport",
        "upstream",
        "write_due",
    )

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.scheme = b"https" if upstream.ssl is not None else b"http"
        # response heads are checked as they are translated (``response_from_h2``,
        # ``trailers_ok``): one pass, not h2's chain of generators per field
        self.codec = Codec(
            client_side=True, max_concurrent_streams=MAX_STREAMS, initial_window=STREAM_WINDOW,
            connection_window=CONNECTION_WINDOW, validate_headers=False,
        )  # fmt: skip
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Session] = {}
        self.closed = False
        self.goaway = False  # the upstream said GOAWAY: no new stream here
        self.idle_since = 0.0  # when its last stream ended (0: busy, or not yet seen idle)
        self.pinged_at = 0.0
        self.ping_pending = False  # a PING is out and not answered yet
        self.reserved = 0  # sessions handed out whose request is not sent yet
        self.write_due = False  # a write is scheduled (``write``)
        #: the upstream's first SETTINGS arrived: until then its stream limit is unknown
        #: (it may be below what was sent already), so one stream only
        self.settled = False

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.write()  # the preface and our SETTINGS

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            was_open = not self.closed or self.transport is not None
            self.closed = True
            upstream = self.upstream
            conns = upstream.h2
            if conns is not None and self in conns:
                conns.remove(self)
            streams, self.streams = self.streams, {}
            for st in streams.values():
                st.lost(UpstreamResetError("upstream closed the HTTP/2 connection"))
            if was_open:
                self.transport = None
                upstream.connection_closed()
        except Exception as error:  # a bug: it never escapes a protocol callback
            log.error("bug while closing an HTTP/2 upstream connection", exc_info=error)

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception as exc:  # a bug: it never escapes a protocol callback
            log.error("bug in an HTTP/2 upstream connection", exc_info=exc)
            self._fail_all(UpstreamProtocolError("internal error"))

    def pause_writing(self) -> None:
        for st in tuple(self.streams.values()):
            st.socket_full(True)

    def resume_writing(self) -> None:
        for st in tuple(self.streams.values()):
            st.socket_full(False)

    # -- frames in ---------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        try:
            events = self.codec.feed(data)
        except CodecError as exc:
            log.warning("upstream %s broke HTTP/2: %s", self.upstream.address, exc)
            self._fail_all(UpstreamProtocolError(f"invalid HTTP/2 from upstream: {exc}"))
            return
        streams = self.streams
        touched: list[H2Session] = []
        for ev in events:
            kind = ev[0]
            if kind == h2c.WINDOW:
                self._window(ev[1])
                continue
            if kind == h2c.SETTINGS:
                self.settled = True
                self._room()
                continue
            if kind == h2c.GOAWAY:
                self._goaway(ev[1], ev[2], ev[3])
                continue
            if kind == h2c.PING_ACK:
                self.ping_pending = False
                continue
            if kind == h2c.PING or kind == h2c.OTHER:
                continue
            st = streams.get(ev[1])
            if st is None:
                continue
            if kind == h2c.DATA:
                st.on_data(ev[2], ev[3], ev[4])
            elif kind == h2c.RESPONSE:
                st.on_head(ev[2], ev[3])
            elif kind == h2c.END:
                st.on_end()
            elif kind == h2c.TRAILERS:
                st.on_trailers(ev[2])
            elif kind == h2c.RESET:
                st.on_reset(ev[2])
            elif kind == h2c.INFORMATIONAL:
                st.on_informational(ev[2])
            if not touched or touched[-1] is not st:
                touched.append(st)
        for st in touched:
            sink = st.flushing
            if sink is not None:
                st.flushing = None
                sink.flush_client()
        self.write_now()

    def _window(self, sid: int) -> None:
        if sid:
            st = self.streams.get(sid)
            if st is not None and st.pending:
                st.push()
        else:
            for st in tuple(self.streams.values()):
                if st.pending:
                    st.push()
        self.write()

    def _room(self) -> None:
        """The upstream's settings changed: requests waiting may fit now."""
        upstream = self.upstream
        if upstream.waiting:
            upstream.serve_waiting()

    def _goaway(self, code: int, last: int, debug: bytes) -> None:
        self.goaway = True
        refused = [st for sid, st in self.streams.items() if sid > last]
        for st in refused:
            st.lost(UpstreamRefusedError("upstream sent GOAWAY before processing the request"))
        if code:
            log.warning("upstream %s ended HTTP/2 with error %d: %r", self.upstream.address, code,
                        debug[:200])  # fmt: skip
            self._fail_all(UpstreamResetError(f"upstream ended the connection (error {code})"))
        elif not self.streams:
            self.close()

    def _fail_all(self, error: Exception) -> None:
        streams, self.streams = self.streams, {}
        for st in streams.values():
            st.lost(error)
        self.close()

    # -- for the pool ---------------------------------------------------------------------------

    def room(self) -> int:
        """How many more streams may open now."""
        t = self.transport
        if self.closed or self.goaway or t is None or t.is_closing():
            return 0
        limit = min(self.codec.peer_max_streams, MAX_STREAMS) if self.settled else 1
        return limit - len(self.streams) - self.reserved

    def open_stream(self) -> H2Session:
        self.reserved += 1
        self.idle_since = 0.0
        return H2Session(self)

    def forget(self, st: H2Session) -> None:
        """``st`` is over: its room is free, and what it held of the connection's window
        (received while it was paused) goes back to it."""
        self.streams.pop(st.sid, None)
        if st.unacked and not self.closed:
            st._ack()
            self.write()
        self.codec.forget(st.sid)
        if not self.streams and not self.reserved and self.goaway:
            self.close()
            return
        if self.upstream.waiting:
            self.upstream.serve_waiting()

    def retire(self) -> None:
        """No new stream here (the upstream left the pool, its settings changed): close
        once the streams in flight end."""
        self.goaway = True
        if not self.streams and not self.reserved:
            self.close()

    def check_idle(self, now: float, older_than: float) -> None:
        """The pool's sweep: close after the idle timeout; PING meanwhile."""
        if self.streams or self.reserved or self.closed:
            return
        if not self.idle_since:  # idle since the last sweep at most
            self.idle_since = now
            return
        if self.idle_since < older_than:
            self.codec.goaway(h2c.NO_ERROR, 0)
            self.write()
            self.close()
            return
        pool = self.upstream.pool
        if self.ping_pending:  # a live peer answers within a round trip
            if now - self.pinged_at >= pool.connect_timeout:
                log.warning(
                    "upstream %s answered no PING in %gs: closing its idle HTTP/2 connection",
                    self.upstream.address, pool.connect_timeout,
                )  # fmt: skip
                self.close()
            return
        interval = min(PING_INTERVAL, pool.idle_timeout / 2)
        if now - self.pinged_at >= interval and now - self.idle_since >= interval:
            self.pinged_at = now
            self.ping_pending = True
            self.codec.ping()
            self.write()

    def write(self) -> None:
        """Write what the codec queued at the end of this loop iteration: the requests
        that clients send in one iteration go out in one write, not one each."""
        if not self.write_due and not self.closed and self.transport is not None:
            self.write_due = True
            asyncio.get_running_loop().call_soon(self.write_now)

    def write_now(self) -> None:
        self.write_due = False
        chunks = self.codec.out_chunks()
        if chunks and self.transport is not None and not self.closed:
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:
                self.transport.writelines(chunks)

    def close(self) -> None:
        if self.closed:
            return
        self.write_now()  # what is queued goes first
        self.closed = True
        conns = self.upstream.h2
        if conns is not None and self in conns:
            conns.remove(self)
        if self.transport is not None:
            self.transport.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("goaway" if self.goaway else "open")
        return f"<H2Upstream {self.upstream.address} [{state}, {len(self.streams)} streams]>"


class H2Session:
    """One stream of an ``H2Upstream``: an ``UpstreamSession`` for one request."""

    __slots__ = (
        "chunk_left",
        "closed",
        "conn",
        "ended",
        "fin",
        "flushing",
        "framing",
        "line",
        "pending",
        "pending_size",
        "reading_paused",
        "responded",
        "sid",
        "sink",
        "unacked",
        "upstream",
        "uses",
        "write_full",
    )

    def __init__(self, conn: H2Upstream) -> None:
        self.conn = conn
        self.upstream = conn.upstream
        self.sid = 0
        self.sink: ResponseSink | None = None
        self.flushing: ResponseSink | None = None  # a sink told something in this read
        self.uses = 1
        self.responded = False
        self.reading_paused = 0
        self.closed = False
        self.unacked = 0
        self.pending: list[bytes | memoryview] = []  # request body waiting for window
        self.pending_size = 0
        self.ended = False  # the request's end is known (its END_STREAM sent or pending)
        self.fin = False  # END_STREAM is sent
        self.write_full = False
        self.framing = RequestFraming(False, 0)
        self.chunk_left = 0  # chunked request: data bytes left in the current chunk
        self.line = b""  # chunked request: a chunk-size line in pieces

    # -- the UpstreamSession interface -----------------------------------------------------------

    def send_head(self, sink: ResponseSink, head: bytes, body: Sequence[bytes]) -> None:
        conn = self.conn
        headers, framing = request_to_h2(head, conn.scheme)
        self.framing = framing
        self.sink = sink
        codec = conn.codec
        self.sid = sid = codec.next_stream_id()
        conn.reserved -= 1
        conn.streams[sid] = self
        if not framing.length:
            self.ended = self.fin = True
            codec.send_headers(sid, headers, True)
        else:
            codec.send_headers(sid, headers)
            if body:
                self._take(body)
        conn.write()

    def send_body(self, pieces: list[bytes]) -> None:
        if self.closed or self.ended:
            return
        self._take(pieces)
        self.conn.write()

    def write_buffer_size(self) -> int:
        t = self.conn.transport
        return self.pending_size + (t.get_write_buffer_size() if t is not None else 0)

    def pause_reading(self, reason: int) -> None:
        self.reading_paused |= reason

    def resume_reading(self, reason: int) -> None:
        if self.reading_paused & reason:
            self.reading_paused &= ~reason
            if not self.reading_paused and self.unacked and not self.closed:
                self._ack()
                self.conn.write()

    def release(self) -> None:
        self.sink = None

    def reusable(self) -> bool:
        return False  # a stream carries one request: the pool closes it (``close``)

    def close(self) -> None:
        """The request is over or abandoned: reset the stream if it is still open (a
        finished one is not), and give its room back."""
        self.sink = None
        if self.closed:
            return
        self.closed = True
        conn = self.conn
        if not self.sid:  # handed out, never used
            conn.reserved -= 1
        elif conn.codec.is_open(self.sid) and not conn.closed:
            conn.codec.reset(self.sid, h2c.CANCEL)
            conn.write()
        conn.forget(self)

    # -- request body ---------------------------------------------------------------------------

    def _take(self, pieces: Sequence[bytes | memoryview]) -> None:
        """Body pieces as the exchange frames them for HTTP/1.1, to data."""
        framing = self.framing
        if framing.chunked:
            for piece in pieces:
                self._dechunk(piece)
        else:
            for piece in pieces:
                n = len(piece)
                if n:
                    self.pending.append(piece)
                    self.pending_size += n
                    framing.length -= n
            if framing.length <= 0:
                self.ended = True
        self.push()

    def _dechunk(self, piece: bytes | memoryview) -> None:
        """The exchange's own chunks (``size CRLF data CRLF``, the last ``0 CRLF CRLF``)."""
        data = bytes(piece)
        while data and not self.ended:
            left = self.chunk_left
            if left > 0:
                take = data[:left]
                self.pending.append(take)
                self.pending_size += len(take)
                self.chunk_left = left - len(take)
                data = data[len(take) :]
                if self.chunk_left == 0:
                    self.chunk_left = -2  # the CRLF after the data
                continue
            if left < 0:  # the CRLF after a chunk's data
                skip = min(-left, len(data))
                data = data[skip:]
                self.chunk_left = left + skip
                continue
            self.line += data
            end = self.line.find(b"\r\n")
            if end < 0:
                return
            size = int(self.line[:end].split(b";", 1)[0], 16)
            data = self.line[end + 2 :]
            self.line = b""
            if size == 0:
                self.ended = True  # (the final CRLF and any trailers are not sent)
            else:
                self.chunk_left = size

    def push(self) -> None:
        """Send as much of the pending body as the windows take; END_STREAM with the
        last of it."""
        if self.closed:
            return
        codec = self.conn.codec
        sid = self.sid
        pending = self.pending
        if pending:
            self.pending_size -= codec.send_pieces(sid, pending, self.ended)
            if not pending and self.ended:
                self.fin = True
        elif self.ended and not self.fin:
            self.fin = True
            codec.end(sid)
        full = self.pending_size > HIGH_WATER
        if full != self.write_full and (full or self.pending_size < HIGH_WATER // 4):
            self.write_full = full
            sink = self.sink
            if sink is not None:
                sink.upstream_write_paused(full)

    def socket_full(self, full: bool) -> None:
        sink = self.sink
        if sink is not None and not self.write_full:
            sink.upstream_write_paused(full)

    # -- response ----------------------------------------------------------------------------------

    def on_informational(self, headers: list[tuple[bytes, bytes]]) -> None:
        sink = self.sink
        if sink is None:
            return
        status, raw = response_from_h2(headers)
        if not status:
            self.lost(UpstreamProtocolError("malformed 1xx head from the upstream"), reset=True)
            return
        self.responded = True
        self.flushing = sink
        sink.on_informational(status, raw)

    def on_head(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        sink = self.sink
        if sink is None:
            return
        status, raw = response_from_h2(headers)
        if status < 200:  # 1xx come as informational events: this is no status at all
            self.lost(UpstreamProtocolError("malformed response head from upstream"), True)
            return
        self.responded = True
        self.flushing = sink
        if not sink.on_response_head(status, ResponseHead(raw)):
            self.close()
            return
        if ended:
            self.on_end()

    def on_data(self, data: bytes, flow: int, ended: bool) -> None:
        sink = self.sink
        self.unacked += flow
        if sink is None:
            self._ack()
            return
        if data:
            self.flushing = sink
            sink.on_response_body(data)
        if not self.reading_paused and not self.closed:
            self._ack()

    def on_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        sink = self.sink
        if sink is None:
            return
        if not trailers_ok(headers):
            self.lost(UpstreamProtocolError("malformed trailers from the upstream"), reset=True)
            return
        self.flushing = sink
        sink.on_response_trailers(headers)

    def on_end(self) -> None:
        sink = self.sink
        if sink is None:
            return
        self.flushing = sink
        self.sink = None
        if not self.ended:  # the response ended before the request: stop sending it
            self.pending = []
            self.pending_size = 0
        sink.on_response_complete(self, True)  # type: ignore[arg-type]

    def on_reset(self, code: int) -> None:
        if code == h2c.REFUSED_STREAM and not self.responded:
            self.lost(UpstreamRefusedError("upstream refused the stream (REFUSED_STREAM)"))
        else:
            self.lost(UpstreamResetError(f"upstream reset the stream (error {code})"))

    def lost(self, error: Exception, reset: bool = False) -> None:
        """The stream ended without its response: tell the request (once); ``reset``:
        the upstream's side is still open, reset it."""
        sink = self.sink
        self.sink = None
        if not self.closed:
            self.closed = True
            conn = self.conn
            if not self.sid:
                conn.reserved -= 1
            elif reset and conn.codec.is_open(self.sid) and not conn.closed:
                conn.codec.reset(self.sid, h2c.PROTOCOL_ERROR)
                conn.write()
            conn.forget(self)
        if sink is not None:
            self.flushing = None
            sink.on_upstream_lost(self, error, True)  # type: ignore[arg-type]
            sink.flush_client()

    def _ack(self) -> None:
        n, self.unacked = self.unacked, 0
        if n:
            self.conn.codec.ack(self.sid, n)

    def __repr__(self) -> str:
        return f"<H2Session {self.upstream.address} stream {self.sid}>"
