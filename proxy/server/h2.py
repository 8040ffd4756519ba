"""HTTP/2 from clients: one connection, many streams, each stream one exchange's downstream.

Theory of operation
-------------------
``H2Server`` is the protocol of a client connection that speaks HTTP/2: chosen by ALPN
on a TLS listener, or by the connection preface on a plain listener with ``h2c``
(``proxy.server.negotiate``). It feeds what arrives to the codec (``proxy.h2.codec``)
and acts on the events; each request stream becomes an ``H2Stream``, the ``Downstream``
of one ``Exchange``, which is the same exchange an HTTP/1.1 request gets: the request is
translated at the edge (``proxy.h2.headers``), so routes, filters, the cache, the pool
and the upstream see what they see for HTTP/1.1.

Order within one read: the events are handled first, and the exchanges of the requests
that arrived start after them, so a request reset in the same read as its HEADERS
(Rapid Reset, CVE-2023-44487) costs no upstream request. Requests a client cancels
later are counted: more than ``http2.max_resets_per_second`` and the connection gets
``GOAWAY ENHANCE_YOUR_CALM``; frames that ask for work but carry no request (PING,
SETTINGS, PRIORITY, empty DATA, unknown types) are bounded the same way.

Flow control, both ways, follows the other side's drain. Request bytes are handed back
to the client's window (``Codec.ack``) only once the exchange has passed them on and
the stream is not paused (a full upstream buffer, a body waiting for a connection), so
a slow upstream stops its client's stream and not the connection, whose window is
large (``http2.connection_window_size``). Response bytes beyond the client's window wait
in the stream; above ``STREAM_HIGH_WATER`` the exchange stops reading its upstream
(``client_write_paused``), as a full socket buffer does for HTTP/1.1 (and a full socket
buffer here pauses every stream's upstream).

Time: the listener's sweep calls ``check_timeouts`` on each tick: the first request
within ``timeouts.header``, an idle connection (no stream) closes after
``timeouts.idle`` with a GOAWAY, a stream's request body may pause ``timeouts.body``
(then 408), a client that reads nothing, or opens no window for a stream, for
``timeouts.send`` loses the connection or the stream; the exchanges' own deadlines are
swept here too. ``drain`` (reload, shutdown) sends GOAWAY: the streams in flight
finish, new ones are refused, the connection closes when the last one ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from proxy.clock import NEVER
from proxy.forwarding.downstream import UPSTREAM_FULL
from proxy.h2 import codec as h2c
from proxy.h2.codec import Codec, CodecError
from proxy.h2.headers import (
    Malformed,
    grpc_code,
    grpc_error,
    grpc_status_of,
    grpc_timeout,
    is_grpc,
    request_from_h2,
    response_to_h2,
    split_response,
)
from proxy.http.headers import RequestHeaders, forwarded_template
from proxy.http.responses import error_response, redirect_response
from proxy.server.base import read_nothing
from proxy.server.protocol import ClientConnection
from proxy.server.proxied import connection_addresses, take_address

if TYPE_CHECKING:
    from proxy.forwarding.core import ExchangeCore
    from proxy.forwarding.downstream import Answer, Site
    from proxy.forwarding.exchange import Exchange
    from proxy.http.headers import ResponseHead
    from proxy.proxy_protocol import Addresses
    from proxy.server.listener import Listener
    from proxy.upstream.connection import UpstreamConnection

log = logging.getLogger("aiolb")

#: Response bytes a stream holds beyond the client's window before its upstream is
#: paused (resumed below a quarter of it).
STREAM_HIGH_WATER: Final = 256 * 1024
#: The socket's write buffer above which every stream's upstream is paused.
WRITE_HIGH_WATER: Final = 256 * 1024

#: WINDOW_UPDATE frames a client may send per DATA frame the proxy sent, and per stream
#: it opened, beyond ``WINDOW_UPDATE_ALLOWANCE`` (Envoy's rule: ``max_inbound_window_
#: update_frames_per_data_frame_sent``, 10, and 2 per stream): a reader opens windows as
#: data comes (gRPC's C core also opens each new stream's); a flood opens them for none.
WINDOW_UPDATES_PER_DATA_FRAME: Final = 10
WINDOW_UPDATES_PER_STREAM: Final = 2
WINDOW_UPDATE_ALLOWANCE: Final = 100

Headers = list[tuple[bytes, bytes]]


class H2Stream:
    """One request stream: the ``Downstream`` of its exchange."""

    __slots__ = (
        "access_log",
        "blocked_at",
        "body",
        "body_buffer",
        "body_deadline",
        "body_size",
        "body_stall",
        "call_deadline",
        "client_ip",
        "client_ip_bytes",
        "clock",
        "conn",
        "draining",
        "early",
        "ended",
        "ending",
        "ex",
        "ex_done",
        "grpc",
        "head_template",
        "headers_out",
        "listener",
        "log_times",
        "loop",
        "no_body",
        "paused",
        "received",
        "record",
        "request_ids",
        "reset",
        "sent_end",
        "sid",
        "started",
        "trailers",
        "unacked",
        "write_paused",
    )

    def __init__(self, conn: H2Server, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.listener: Site = conn.listener
        self.client_ip = conn.client_ip
        self.client_ip_bytes = conn.client_ip_bytes
        self.head_template = conn.head_template
        self.request_ids = conn.listener.request_ids
        self.loop = conn.loop
        self.clock = conn.clock
        self.body_buffer = conn.body_buffer
        self.draining = conn.draining
        self.record = conn.listener.record
        self.log_times = conn.log_times
        self.access_log = conn.listener.access_log
        self.ex: Exchange = None  # type: ignore[assignment]  # set right after
        self.paused = 0
        self.write_paused = False
        self.unacked = 0  # request bytes taken but not handed back to the client's window
        self.early: list[bytes] = []  # request body that came before the exchange started
        self.received = 0  # request body bytes, early ones included (``max_body_size``)
        self.started = False
        self.ended = False  # the client's side of the stream ended (the request is whole)
        self.reset = False  # gone: reset by either side
        self.headers_out: Headers | None = None  # the response head, until ``flush``
        self.body: list[bytes | memoryview] = []  # response body not yet sent
        self.body_size = 0
        self.body_stall = False  # the exchange was told to stop (``STREAM_HIGH_WATER``)
        self.blocked_at = NEVER  # since when the body waits for a window (zero-window stall)
        self.no_body = False  # HEAD, 204, 304, or the proxy answered: no body follows
        self.trailers: Headers | None = None  # sent after the body, with END_STREAM
        self.ending = False  # the exchange has sent its end
        self.sent_end = False  # END_STREAM is out
        self.ex_done = False
        self.body_deadline = NEVER
        self.grpc = False  # a gRPC call: the proxy's own answers are gRPC statuses
        self.call_deadline = NEVER  # its ``grpc-timeout``

    # -- the Downstream interface ------------------------------------------------------------

    def pause(self, reason: int) -> None:
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.unacked and not self.reset:
                self.conn.ack(self)

    def send_continue(self, ex: ExchangeCore) -> None:
        self.conn.codec.send_headers(self.sid, [(b":status", b"100")])
        self.conn.write()

    def send_informational(self, ex: ExchangeCore, status: int, raw: bytes) -> None:
        if status != 101 and not self.reset:
            self.conn.codec.send_headers(self.sid, response_to_h2(raw))

    def send_head(self, ex: ExchangeCore, status: int, found: ResponseHead) -> None:
        ex.keep_alive = True
        self.headers_out = headers = response_to_h2(found.head)
        self.no_body = ex.head_request or status == 204 or status == 304
        if self.grpc:  # a trailers-only answer carries its status here
            ex.grpc_status = grpc_status_of(headers)

    def send_body(self, ex: ExchangeCore, data: bytes | memoryview) -> None:
        if not self.no_body:
            self.body.append(data)
            self.body_size += len(data)

    def send_trailers(self, ex: ExchangeCore, trailers: Headers) -> None:
        if not self.no_body:
            self.trailers = trailers
            if self.grpc:
                ex.grpc_status = grpc_status_of(trailers)

    def send_end(self, ex: ExchangeCore) -> None:
        self.ending = True

    def send_answer(self, ex: ExchangeCore, answer: Answer, close: bool) -> None:
        self._whole(answer.render(False, ex.head_request))

    def flush(self) -> None:
        if not self.reset:
            self.conn.push(self)

    def send_whole(self, ex: ExchangeCore, found: ResponseHead, body: bytes | memoryview) -> None:
        ex.keep_alive = True
        self.headers_out = response_to_h2(found.head)
        if body:
            self.body.append(body)
            self.body_size += len(body)
        self.ending = True
        self.flush()

    def send_local(self, ex: ExchangeCore, status: int, answer: Answer | None, close: bool,
                   cause: str) -> None:  # fmt: skip
        if answer is None:
            self._whole(error_response(status, False, ex.head_request, cause))
        else:
            self._whole(answer.render(False, ex.head_request))
        if self.grpc:  # the same answer as a gRPC status, its text the message
            body = self.body[0] if self.body else b""
            code = grpc_code(status, cause)
            ex.grpc_status = code
            self.headers_out = grpc_error(code, bytes(body[:200]).decode("latin-1").strip())
            self.body = []
            self.body_size = 0
        self.flush()

    def send_redirect(self, ex: ExchangeCore, location: bytes, close: bool) -> None:
        self._whole(redirect_response(location, False))
        self.flush()

    def switch(self, ex: ExchangeCore, conn: UpstreamConnection, protocol: str, head: bytes,
               rest: bytes) -> None:  # fmt: skip
        conn.close()  # HTTP/2 has no Upgrade: never asked for (the codec refuses the header)
        self.close()

    def exchange_done(self, ex: ExchangeCore, keep_alive: bool) -> None:
        self.ex_done = True
        self.conn.settle(self)

    def close(self) -> None:
        """The response cannot be completed (an upstream broke off): the stream is reset,
        so the client never takes a truncated body for a whole one."""
        self.conn.reset_stream(self, h2c.INTERNAL_ERROR)

    # -- internals ---------------------------------------------------------------------------

    def _whole(self, data: bytes | list[bytes]) -> None:
        """A whole response the proxy made; whatever the upstream still sends is dropped."""
        headers, body = split_response(data)
        self.headers_out = headers
        self.body = [body] if body else []
        self.body_size = len(body)
        self.no_body = True
        self.ending = True

    def addresses(self) -> Addresses | None:
        conn = self.conn
        found = conn.proxied
        if found is None:  # the connection's own, asked once (``send_proxy_protocol``)
            found = conn.proxied = connection_addresses(None, conn.transport)
        return found

    def __repr__(self) -> str:
        return f"<H2Stream {self.sid} of {self.client_ip} [{self.ex!r}]>"


class H2Server(asyncio.Protocol):
    """A client connection speaking HTTP/2; its streams are ``H2Stream``s."""

    __slots__ = (
        "body_buffer",
        "client_ip",
        "client_ip_bytes",
        "clock",
        "closed",
        "codec",
        "controls",
        "deadline",
        "draining",
        "goaway_sent",
        "head_template",
        "keep_forwarded",
        "listener",
        "log_times",
        "loop",
        "max_body",
        "max_controls",
        "max_headers",
        "max_requests",
        "max_resets",
        "max_streams",
        "max_uri",
        "opened",
        "proxied",
        "resets",
        "send_deadline",
        "send_mark",
        "starting",
        "streams",
        "timeout_body",
        "timeout_idle",
        "timeout_send",
        "touched",
        "transport",
        "underscores",
        "window_start",
        "window_updates",
        "write_due",
        "write_paused",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.clock = listener.clock
        config = listener.config
        limits, timeouts, spec = config.limits, config.timeouts, config.http2
        self.log_times = listener.access_log is not None and listener.access_log.times
        self.max_uri = limits.max_uri_size
        self.max_body = limits.max_body_size
        self.max_headers = limits.max_headers
        self.body_buffer = limits.body_buffer_size
        self.underscores = limits.underscores_in_headers
        self.keep_forwarded = config.forwarded == "append"
        self.max_resets = spec.max_resets_per_second
        #: ``limits.max_requests_per_connection`` (nginx's ``keepalive_requests`` applies
        #: to HTTP/2 too): after that many streams, a GOAWAY; 0: unlimited
        self.max_requests = limits.max_requests_per_connection or 0
        self.max_controls = spec.max_control_frames_per_second
        self.max_streams = spec.max_concurrent_streams
        self.timeout_idle = timeouts.idle
        self.timeout_body = timeouts.body
        self.timeout_send = timeouts.send
        self.codec = Codec(
            client_side=False,
            max_concurrent_streams=spec.max_concurrent_streams,
            initial_window=spec.initial_window_size,
            connection_window=spec.connection_window_size,
            max_header_list_size=limits.max_header_size,
            validate_headers=False,  # request_from_h2 does: a malformed request is its stream's
        )
        self.streams: dict[int, H2Stream] = {}
        self.starting: list[H2Stream] = []  # requests of this read, started after it
        self.touched: list[H2Stream] = []  # streams that got request body in this read
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client_ip = ""
        self.client_ip_bytes = b""
        #: the addresses a PROXY header gave (``proxy.server.proxied``), or the
        #: connection's own once a ``send_proxy_protocol`` pool asked; None: the peer's
        self.proxied: Addresses | None = None
        self.head_template = listener.head_template
        self.closed = False
        self.draining = listener.draining
        self.goaway_sent = False
        self.write_paused = False
        self.write_due = False  # a write is scheduled (``write``)
        self.send_deadline = NEVER
        self.send_mark = 0
        now = self.clock.now
        self.deadline = now + timeouts.header  # the first request; then idle time
        self.window_start = now
        self.resets = 0
        self.controls = 0
        self.window_updates = 0  # WINDOW_UPDATE frames received, over the connection's life
        self.opened = 0  # request streams the client opened, over the connection's life

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        take_address(self, transport)
        if self.listener.config.forwarded != "drop":
            self.head_template = forwarded_template(self.head_template, self.client_ip)
        self.listener.connections.add(self)
        self.write()  # our SETTINGS
        if self.draining:
            self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.closed = True
            self.listener.connections.discard(self)
            streams, self.streams = self.streams, {}
            for st in streams.values():
                st.reset = True
                if st.started:
                    st.ex.abort()
                _unlink(st)
        except Exception as error:  # a bug: it never escapes a protocol callback
            log.error("bug while closing an HTTP/2 connection from %s", self.client_ip,
                      exc_info=error)  # fmt: skip

    def data_received(self, data: bytes) -> None:
        try:
            self._received(data)
        except Exception as exc:  # a bug: it never escapes a protocol callback
            log.error("bug in an HTTP/2 connection from %s", self.client_ip, exc_info=exc)
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return None  # close

    def pause_writing(self) -> None:
        self.write_paused = True
        self.send_deadline = self.clock.now + self.timeout_send
        self.send_mark = self.transport.get_write_buffer_size()
        for st in tuple(self.streams.values()):
            self._stall(st)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.send_deadline = NEVER
        for st in tuple(self.streams.values()):
            self._stall(st)

    # -- frames in ---------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self.closed:
            return
        codec = self.codec
        frames = codec.frames_received
        try:
            events = codec.feed(data)
        except CodecError as exc:
            log.info("HTTP/2 connection from %s closed: %s", self.client_ip, exc)
            self._close_now()
            return
        idle = codec.frames_received - frames - len(events)
        if idle > 0:  # frames that made no event (on closed streams...): asked for nothing
            self.controls += idle
            self._calm()
            if self.closed:
                return
        streams = self.streams
        for ev in events:
            kind = ev[0]
            if kind == h2c.DATA:
                self._on_data(ev[1], ev[2], ev[3], ev[4])
            elif kind == h2c.REQUEST:
                self._on_request(ev[1], ev[2], ev[3])
            elif kind == h2c.END or kind == h2c.TRAILERS:  # trailers: the request ended
                st = streams.get(ev[1])
                if st is not None:
                    self._request_ended(st)
            elif kind == h2c.WINDOW:
                self._on_window(ev[1])
            elif kind == h2c.RESET:
                self._on_reset(ev[1])
            elif kind == h2c.GOAWAY:
                if ev[1]:  # the client ends the connection with an error
                    self._close_now()
                    return
            else:  # PING, SETTINGS, PRIORITY, ...: asks for work, carries no request
                self._control()
            if self.closed:
                return
        if self.starting:
            self._start()
        if self.touched:
            touched, self.touched = self.touched, []
            for st in touched:
                ex = st.ex
                if ex is None or st.reset:  # over (answered, reset) within this read
                    continue
                if st.started and ex.pending:
                    ex.flush_upstream()
                if st.unacked and not st.paused and not st.reset:
                    self.ack(st)
        self.write_now()

    def _on_request(self, sid: int, headers: Headers, ended: bool) -> None:
        if self.goaway_sent:  # after our GOAWAY: not processed, the client may retry it
            self.codec.reset(sid, h2c.REFUSED_STREAM)
            return
        if len(self.streams) >= self.max_streams:  # sent before our SETTINGS reached it
            self.codec.reset(sid, h2c.REFUSED_STREAM)
            self._control()  # a client that ignores the limit is a flood
            return
        self.deadline = NEVER
        self.opened += 1
        if self.opened == self.max_requests:  # the last one: the client goes elsewhere
            self.goaway_sent = True
            self.codec.goaway(h2c.NO_ERROR, sid)
        try:
            method, target, fields = request_from_h2(headers, not ended)
            if len(target) > self.max_uri:
                raise Malformed("request target too long", 414)
            if len(fields) > self.max_headers:
                raise Malformed("too many header fields", 431)
            found = RequestHeaders(fields, self.underscores, self.keep_forwarded)
            length = found.content_length
            if length is not None and self.max_body is not None and int(length) > self.max_body:
                raise Malformed("body over max_body_size", 413)
        except ValueError as exc:  # Malformed, or RequestHeaders' refusals
            status = exc.status if isinstance(exc, Malformed) else 400
            log.info("%d from %s (HTTP/2): %s", status, self.client_ip, exc)
            self._refuse(sid, status, ended, is_grpc(headers), str(exc))
            return
        st = H2Stream(self, sid)
        if is_grpc(fields):
            st.grpc = True
            st.body_buffer = 0  # a call streams: never held until it is whole
            timeout = grpc_timeout(fields)
            if timeout is not None:
                st.call_deadline = self.clock.now + timeout
        st.ex = ClientConnection.exchange_type(st, method, target, fields, found, 1, True)
        st.ended = ended
        if not ended:
            st.body_deadline = self.clock.now + self.timeout_body
        self.streams[sid] = st
        self.starting.append(st)

    def _start(self) -> None:
        starting, self.starting = self.starting, []
        for st in starting:
            if st.reset or self.closed:
                continue  # reset in the same read: no upstream request was made
            st.started = True
            ex = st.ex
            ex.start()
            early = st.early
            if early:
                st.early = []
                for data in early:
                    ex.on_request_body(data)
                self.touched.append(st)
            if st.ended and not ex.done:
                ex.on_request_complete()

    def _on_data(self, sid: int, data: bytes, flow: int, ended: bool) -> None:
        st = self.streams.get(sid)
        if st is None or st.reset:  # answered already: the window is handed back at once
            self.codec.ack(sid, flow)
            return
        if not data and not ended:
            self._control()  # an empty DATA frame asks for work and carries nothing
        if data:
            st.unacked += flow
            st.received += len(data)
            max_body = self.max_body
            if max_body is not None and st.received > max_body:  # early bytes count too
                self._give_up(st, 413, "body over max_body_size")
                return
            if not st.started:
                st.early.append(data)
            else:
                st.ex.on_request_body(data)
            st.body_deadline = self.clock.now + self.timeout_body
            self.touched.append(st)
        elif flow:
            self.codec.ack(sid, flow)  # padding only

    def _request_ended(self, st: H2Stream) -> None:
        st.body_deadline = NEVER
        if st.ended:
            return
        st.ended = True
        ex = st.ex
        if ex is not None and st.started and not ex.done:
            ex.on_request_complete()
            if ex.pending and not ex.done:  # the body's end (HTTP/1.1: the last chunk)
                ex.flush_upstream()

    def _on_window(self, sid: int) -> None:
        n = self.window_updates = self.window_updates + 1
        allowed = (
            WINDOW_UPDATE_ALLOWANCE + WINDOW_UPDATES_PER_STREAM * self.opened
            + WINDOW_UPDATES_PER_DATA_FRAME * self.codec.frames_sent
        )  # fmt: skip
        if n > allowed:
            self._flood("WINDOW_UPDATE frames for data never sent")
            return
        if sid:
            st = self.streams.get(sid)
            if st is not None and st.body:
                self.push(st)
            return
        for st in tuple(self.streams.values()):  # the connection's window opened
            if st.body:
                self.push(st)

    def _on_reset(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        st.reset = True
        if st.started and not st.ex_done:
            st.ex.abort()
        _unlink(st)
        self.resets += 1
        self._calm()

    def _control(self) -> None:
        self.controls += 1
        self._calm()

    def _calm(self) -> None:
        """Floods: too many cancelled requests or empty frames in the current second
        end the connection with ``ENHANCE_YOUR_CALM``."""
        now = self.clock.now
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.resets = self.controls = 0
            return
        if self.resets > self.max_resets or self.controls > self.max_controls:
            what = "reset streams" if self.resets > self.max_resets else "control frames"
            self._flood(f"too many {what} per second")

    def _flood(self, why: str) -> None:
        """End the connection with ``GOAWAY ENHANCE_YOUR_CALM``; what the codec queued
        for the flood (a PING's or SETTINGS' ack each) is dropped, not sent."""
        log.warning("HTTP/2 connection from %s closed: %s", self.client_ip, why)
        self.codec.out()
        self.codec.goaway(h2c.ENHANCE_YOUR_CALM)
        self._close_now()

    # -- frames out --------------------------------------------------------------------------

    def push(self, st: H2Stream) -> None:
        """Send what ``st`` has gathered: its head, as much body as the windows take."""
        codec = self.codec
        sid = st.sid
        headers = st.headers_out
        if headers is not None:
            st.headers_out = None
            if st.ending and not st.body and st.trailers is None:
                codec.send_headers(sid, headers, True)
                st.sent_end = True
                self._sent(st)
                return
            codec.send_headers(sid, headers)
        if st.body:
            body = st.body
            end_with_data = st.ending and st.trailers is None
            st.body_size -= codec.send_pieces(sid, body, end_with_data)
            if body:
                if st.blocked_at == NEVER:
                    st.blocked_at = self.clock.now
            else:
                st.blocked_at = NEVER
                st.sent_end = end_with_data
        if st.ending and not st.body and not st.sent_end:
            trailers = st.trailers
            if trailers is not None:
                st.trailers = None
                codec.send_headers(sid, trailers, True)
            else:
                codec.end(sid)
            st.sent_end = True
        self._stall(st)
        self._sent(st)

    def _sent(self, st: H2Stream) -> None:
        self.write()
        if st.sent_end and st.ex_done:
            self._finished(st)

    def settle(self, st: H2Stream) -> None:
        """``st``'s exchange is done; the stream ends when its response is all out."""
        if st.reset:
            return
        if st.sent_end:
            self._finished(st)

    def _finished(self, st: H2Stream) -> None:
        if self.streams.pop(st.sid, None) is None:
            return
        _unlink(st)
        if not st.ended:  # answered before the request was whole: stop its sender
            self.codec.reset(st.sid, h2c.NO_ERROR)
            self.write()
        self.codec.forget(st.sid)
        if not self.streams:
            if self.goaway_sent:
                self.close()
            else:
                self.deadline = self.clock.now + self.timeout_idle

    def _stall(self, st: H2Stream) -> None:
        """Tell ``st``'s exchange to stop or restart reading its upstream, by what waits
        in the stream and in the socket."""
        if st.body_size > STREAM_HIGH_WATER:
            st.body_stall = True
        elif st.body_size < STREAM_HIGH_WATER // 4:
            st.body_stall = False
        stalled = st.body_stall or self.write_paused
        if stalled != st.write_paused and st.started and not st.ex_done:
            st.write_paused = stalled
            st.ex.client_write_paused(stalled)

    def ack(self, st: H2Stream) -> None:
        n, st.unacked = st.unacked, 0
        self.codec.ack(st.sid, n)
        self.write()

    def reset_stream(self, st: H2Stream, code: int) -> None:
        if st.reset:
            return
        st.reset = True
        self.codec.reset(st.sid, code)
        self.write()
        self.streams.pop(st.sid, None)
        if st.started and not st.ex_done:
            st.ex.abort()
        _unlink(st)
        if not self.streams and self.goaway_sent:
            self.close()

    def _refuse(self, sid: int, status: int, ended: bool, grpc: bool, why: str) -> None:
        """A request refused before it became an exchange (or given up): its error page
        (a gRPC status for a gRPC call), and the rest of its body refused."""
        codec = self.codec
        if grpc:
            codec.send_headers(sid, grpc_error(grpc_code(status), why), True)
        else:
            headers, body = split_response(error_response(status, False))
            codec.send_headers(sid, headers)
            codec.send_data(sid, body, True)
        if not ended:
            codec.reset(sid, h2c.NO_ERROR)

    def _give_up(self, st: H2Stream, status: int, why: str) -> None:
        """A stream's request cannot go on (too large, too slow): answer ``status`` if
        nothing was answered yet, else reset it."""
        log.info("%d from %s (HTTP/2): %s", status, self.client_ip, why)
        ex = st.ex
        answered = st.sent_end or st.headers_out is not None or ex.status
        if st.started and not st.ex_done:
            ex.abort()
        if answered:
            self.reset_stream(st, h2c.CANCEL)
            return
        st.reset = True
        self.streams.pop(st.sid, None)
        _unlink(st)
        self._refuse(st.sid, status, st.ended, st.grpc, why)
        self.write()

    def write(self) -> None:
        """Write what the codec queued, at the end of this loop iteration: the responses
        that upstreams complete in one iteration go out in one write, not one each."""
        if not self.write_due and not self.closed:
            self.write_due = True
            self.loop.call_soon(self.write_now)

    def write_now(self) -> None:
        self.write_due = False
        chunks = self.codec.out_chunks()
        if chunks and not self.closed:
            if len(chunks) == 1:
                self.transport.write(chunks[0])
            else:
                self.transport.writelines(chunks)

    # -- time, draining, closing ---------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        """Called on every clock tick by the listener's sweep."""
        if self.closed:
            return
        if self.send_deadline <= now and self._client_stalled(now):
            return
        if self.deadline <= now and not self.streams:
            self.codec.goaway(h2c.NO_ERROR)
            self.goaway_sent = True
            self.write()
            self.close()
            return
        timeout_send = self.timeout_send
        for st in tuple(self.streams.values()):
            ex = st.ex
            if st.body_deadline <= now:
                self._give_up(st, 408, "request body not received in time")
            elif st.blocked_at + timeout_send <= now:
                log.info("HTTP/2 stream of %s reset: no window for %gs", self.client_ip,
                         timeout_send)  # fmt: skip
                self.reset_stream(st, h2c.CANCEL)
            elif st.started and not ex.done:
                if st.call_deadline <= now:
                    ex.expire("the call's grpc-timeout passed")
                    continue
                if st.paused & UPSTREAM_FULL and ex.upstream_stalled(now):
                    continue
                if ex.deadline <= now:
                    ex.on_timeout()

    def _client_stalled(self, now: float) -> bool:
        if not read_nothing(self, now):
            return False
        log.info("closing the HTTP/2 connection of %s: it read nothing for %gs",
                 self.client_ip, self.timeout_send)  # fmt: skip
        self._close_now()
        return True

    def drain(self) -> None:
        """Graceful shutdown or reload: GOAWAY, the streams in flight finish, then close."""
        self.draining = True
        if self.closed or self.transport is None:
            return
        if not self.goaway_sent:
            self.goaway_sent = True
            self.codec.goaway(h2c.NO_ERROR)
            self.write()
        if not self.streams:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.write_now()  # what is queued goes first
            self.closed = True
            self.transport.close()

    def _close_now(self) -> None:
        """A protocol error or a flood: what the codec queued (its GOAWAY) goes, the
        streams are dropped."""
        data = self.codec.out()
        if data:
            self.transport.write(data)
        self.close()
        streams, self.streams = self.streams, {}
        for st in streams.values():
            st.reset = True
            if st.started and not st.ex_done:
                st.ex.abort()
            _unlink(st)

    def __repr__(self) -> str:
        return f"<H2Server {self.client_ip} [{len(self.streams)} streams]>"


def _unlink(st: H2Stream) -> None:
    """``st`` is over: drop its link to its exchange (which links back to it as its
    downstream), so that both are freed by their reference counts, not later by the
    cyclic garbage collector, whose pauses came to 100 ms a second under load.

    The request bytes it took and had not handed back (a paused stream, or the frame
    that went over ``max_body_size``) go back to the connection's window now: the
    stream's own window no longer matters, but the connection's is shared, and bytes
    kept from it for a gone stream would shrink it for good until it stalls."""
    st.ex = None  # type: ignore[assignment]
    n = st.unacked
    if n:
        st.unacked = 0
        conn = st.conn
        if not conn.closed:
            conn.codec.ack(st.sid, n)
            conn.write()
