"""A controllable HTTP/2 upstream for the tests: the ``h2`` library, server side, on
asyncio, prior knowledge (or TLS with ALPN ``h2``). What it does is what the test sets:

- every answer says who served it: ``conn=C stream=S bytes=N sha256=HEX`` (the
  connection's index in ``connections``, the stream id, the request body's size and
  digest), so a test knows which connection carried each request;
- ``max_streams``: its ``SETTINGS_MAX_CONCURRENT_STREAMS``; the most streams it ever
  had in flight on one connection is ``max_seen`` (a stream above the limit is recorded
  in ``errors``, which a test expects empty);
- ``hold``: answers wait until ``release()`` (streams stay in flight);
- ``Conn.goaway(K)``: a ``GOAWAY(NO_ERROR, last_stream_id=the Kth stream)``; the
  streams above it are never answered (``ignored``), the others are, and the connection
  stays open until the proxy closes it;
- ``refuse=N``: the next N requests get ``RST_STREAM(REFUSED_STREAM)`` (on their head;
  on ``/refuse-late``, once 100,000 bytes of their body arrived, or all of it);
- by path (or for every request: ``behaviour``): ``/status/503`` answers 503,
  ``/reset-mid`` sends a head and part of the body, then ``RST_STREAM(INTERNAL_ERROR)``,
  ``/reset`` resets at once; ``/big/N`` answers N bytes, as fast as the proxy's
  windows let it (``downloads``: what it has left to send, by stream);
- ``window``: its ``SETTINGS_INITIAL_WINDOW_SIZE``, and ``reading=False`` acknowledges
  no request byte until ``read_all()`` (a slow reader: the proxy's window stays shut);
- ``settings_delay``: what it sends first (its SETTINGS) arrives that much later, as
  over a long way: meanwhile the proxy knows no stream limit;
- counts the PINGs it receives (``pings``), and ``close_idle()`` closes its idle
  connections with a GOAWAY, as a server's own idle timeout does.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame as hf

from tests.support import HOST

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Request:
    """One request as the server received it."""

    conn: int
    sid: int
    method: str
    path: str
    headers: dict[str, str]
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    ended: bool = False

    @property
    def body_line(self) -> bytes:
        return b"conn=%d stream=%d bytes=%d sha256=%s" % (
            self.conn, self.sid, self.size, self.digest.hexdigest().encode()
        )  # fmt: skip


class Conn(asyncio.Protocol):
    """One connection of the server."""

    def __init__(self, server: H2Backend) -> None:
        self.server = server
        self.index = len(server.connections)
        server.connections.append(self)
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, Request] = {}  # in flight
        self.streams: list[int] = []  # every stream opened on it, in order
        self.unread: dict[int, int] = {}  # received, not acknowledged (``reading=False``)
        self.last: int | None = None  # the GOAWAY's last stream id, once sent
        self.closed = False
        self.mode = ""  # "h2", or "h1" (a pool that speaks HTTP/1.1), from the first bytes
        self.h1 = b""  # HTTP/1.1: what is not parsed yet
        self.delayed = False  # ``settings_delay``: nothing sent yet
        self.downloads: dict[int, int] = {}  # ``/big/N``: bytes still to send, by stream

    # -- asyncio ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.mode == "":  # the first bytes: the preface, or an HTTP/1.1 request
            self.mode = "h2" if PREFACE.startswith(data[: len(PREFACE)]) else "h1"
            if self.mode == "h2":  # settings in force once acknowledged, as RFC 9113 says
                self.h2.initiate_connection()
                codes = h2.settings.SettingCodes
                self.h2.update_settings(
                    {
                        codes.MAX_CONCURRENT_STREAMS: self.server.max_streams,
                        codes.INITIAL_WINDOW_SIZE: self.server.window,
                    }
                )
                if self.server.settings_delay:  # a long way: what it sends arrives late
                    self.delayed = True
                    loop = asyncio.get_running_loop()
                    loop.call_later(self.server.settings_delay, self._arrive)
        if self.mode == "h1":
            self._h1(data)
        else:
            self._h2(data)

    def _h1(self, data: bytes) -> None:
        """HTTP/1.1 (a pool that speaks it): bodiless requests, keep-alive."""
        self.h1 += data
        while b"\r\n\r\n" in self.h1:
            self.h1 = self.h1.split(b"\r\n\r\n", 1)[1]
            self.streams.append(len(self.streams) + 1)
            self.server.h1_requests += 1
            body = b"h1 conn=%d request=%d" % (self.index, len(self.streams))
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (
                len(body), body))  # fmt: skip

    def _h2(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.server.errors.append(f"conn {self.index}: {exc!r}")
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            self._event(event)
        self.flush()

    # -- events -----------------------------------------------------------------------------

    def _event(self, e: Any) -> None:
        server = self.server
        if isinstance(e, h2.events.RequestReceived):
            self._request(e.stream_id, dict(e.headers), e.stream_ended is not None)
        elif isinstance(e, h2.events.DataReceived):
            req = self.requests.get(e.stream_id)
            if req is not None:
                req.size += len(e.data)
                req.digest.update(e.data)
                late = req.size >= 100_000 or e.stream_ended is not None
                if late and req.path == "/refuse-late" and server.refuse > 0:
                    self._refuse(req.sid)
                    del self.requests[req.sid]
            server.received += len(e.data)
            if server.reading:
                self._ack(e.stream_id, e.flow_controlled_length)
            else:
                self.unread[e.stream_id] = (
                    self.unread.get(e.stream_id, 0) + e.flow_controlled_length
                )
        elif isinstance(e, h2.events.StreamEnded):
            req = self.requests.get(e.stream_id)
            if req is not None:
                req.ended = True
                self._respond(req)
        elif isinstance(e, h2.events.StreamReset):
            self.downloads.pop(e.stream_id, None)
            if self.requests.pop(e.stream_id, None) is not None:
                server.cancelled += 1
        elif isinstance(e, h2.events.WindowUpdated):
            for sid in list(self.downloads):
                self._download(sid)
        elif isinstance(e, h2.events.PingReceived):
            server.pings += 1

    def _request(self, sid: int, raw: dict[bytes, bytes], ended: bool) -> None:
        server = self.server
        headers = {k.decode(): v.decode() for k, v in raw.items()}
        req = Request(self.index, sid, headers[":method"], headers[":path"], headers)
        self.streams.append(sid)
        if self.last is not None and sid > self.last:  # after our GOAWAY: never processed
            server.ignored.append(req)
            return
        if server.refuse > 0 and req.path != "/refuse-late":
            self._refuse(sid)
            return
        self.requests[sid] = req
        server.max_seen = max(server.max_seen, len(self.requests))
        if len(self.requests) > server.max_streams:
            server.errors.append(f"conn {self.index}: {len(self.requests)} streams in flight")
        server.seen.append(req)
        if ended:
            req.ended = True
            self._respond(req)

    def _refuse(self, sid: int) -> None:
        self.server.refuse -= 1
        self.server.refused += 1
        self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)

    def _respond(self, req: Request) -> None:
        server = self.server
        if server.hold:
            server.held.append((self, req))
            return
        self.answer(req)

    def answer(self, req: Request) -> None:
        if self.closed or req.sid not in self.requests:
            return
        sid = req.sid
        path = self.server.behaviour or req.path
        if path == "/reset":
            self.requests.pop(sid)
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path == "/reset-mid":
            self.requests.pop(sid)
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"100000")])
            self.h2.send_data(sid, b"x" * 1000)
            self.flush()
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        elif path.startswith("/big/"):
            self.requests.pop(sid)
            size = int(path.removeprefix("/big/"))
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % size)])
            self.downloads[sid] = size
            self._download(sid)
        else:
            status = path.removeprefix("/status/") if path.startswith("/status/") else "200"
            body = req.body_line
            self.h2.send_headers(sid, [
                (b":status", status.encode()), (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ])  # fmt: skip
            self.h2.send_data(sid, body, end_stream=True)
            self.requests.pop(sid)
            self.server.answered += 1
        self.flush()

    def _download(self, sid: int) -> None:
        """Send what the windows take of ``/big/N``'s body."""
        left = self.downloads[sid]
        n = min(left, self.h2.local_flow_control_window(sid))
        while n > 0:
            frame = min(n, self.h2.max_outbound_frame_size)
            left -= frame
            n -= frame
            self.h2.send_data(sid, b"d" * frame, end_stream=left == 0)
        if left:
            self.downloads[sid] = left
        else:
            del self.downloads[sid]
            self.server.answered += 1

    def reset(self, sid: int) -> None:
        """Reset stream ``sid`` (a ``/big/N`` it is sending: as a server that gives up
        on a slow reader)."""
        self.downloads.pop(sid, None)
        self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        self.flush()

    def _ack(self, sid: int, n: int) -> None:
        if not n:
            return
        self.h2.acknowledge_received_data(n, sid)  # a closed stream: the connection's only

    def goaway(self, processed: int) -> int:
        """``GOAWAY(NO_ERROR)`` naming the ``processed``-th stream opened here as the
        last: those above it are dropped unanswered (``ignored``); its last stream id."""
        last = self.last = self.streams[processed - 1]
        for sid in [sid for sid in self.requests if sid > last]:
            self.server.ignored.append(self.requests.pop(sid))
        self.flush()
        assert self.transport is not None
        frame = hf.GoAwayFrame(0, last_stream_id=last, error_code=0)
        self.transport.write(frame.serialize())  # behind h2's back: it would send no more
        return last

    def read_all(self) -> None:
        unread, self.unread = self.unread, {}
        for sid, n in unread.items():
            self._ack(sid, n)
        self.flush()

    def _arrive(self) -> None:
        self.delayed = False
        self.flush()

    def flush(self) -> None:
        if self.delayed:
            return
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close_if_idle(self) -> bool:
        if self.closed or self.requests:
            return False
        self.h2.close_connection()
        self.flush()
        assert self.transport is not None
        self.transport.close()
        return True


class H2Backend:
    """The server (see the module); ``await H2Backend(...).start()``."""

    def __init__(
        self, *, max_streams: int = 100, hold: bool = False, refuse: int = 0,
        window: int = 65535, reading: bool = True, settings_delay: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        self.max_streams = max_streams
        self.hold = hold
        self.refuse = refuse
        self.window = window
        self.reading = reading
        self.settings_delay = settings_delay
        self.ssl = ssl_context
        #: answer every request as if this were its path (``/status/503``, ``/reset``)
        self.behaviour: str | None = None
        self.connections: list[Conn] = []
        self.seen: list[Request] = []  # processed (not refused, not ignored)
        self.ignored: list[Request] = []  # above a GOAWAY's last stream id
        self.held: list[tuple[Conn, Request]] = []
        self.errors: list[str] = []
        self.max_seen = 0
        self.pings = 0
        self.refused = 0
        self.cancelled = 0  # streams the proxy reset
        self.answered = 0
        self.received = 0  # request body bytes
        self.h1_requests = 0  # HTTP/1.1 requests (answered ``h1 conn=C request=N``)
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> H2Backend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Conn(self), HOST, 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{HOST}:{self.port}"

    @property
    def in_flight(self) -> int:
        return sum(len(c.requests) for c in self.connections)

    @property
    def open_connections(self) -> list[Conn]:
        return [c for c in self.connections if not c.closed]

    def release(self) -> None:
        """Answer what is held, and from now on at once."""
        self.hold = False
        held, self.held = self.held, []
        for conn, req in held:
            conn.answer(req)

    def read_all(self) -> None:
        """Acknowledge every byte received, and from now on at once."""
        self.reading = True
        for conn in self.connections:
            conn.read_all()

    def close_idle(self) -> int:
        return sum(conn.close_if_idle() for conn in self.connections)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in self.connections:
                if conn.transport is not None:
                    conn.transport.close()
            await self.server.wait_closed()


def alpn_context(ca: Any, protocols: list[str]) -> ssl.SSLContext:
    """A server context for 127.0.0.1 from the test's CA offering ``protocols``."""
    context: ssl.SSLContext = ca.server_context(HOST)
    context.set_alpn_protocols(protocols)
    return context
