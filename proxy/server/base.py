"""What every part of a client connection shares: its slots, its phases, pausing.

``ClientConnection`` (``protocol.py``: parsing requests into exchanges) is built in
layers, one module each: ``ConnectionBase`` here, ``Refusals`` (``refusals.py``: the
connection's own answers, its deadlines) and ``H1Responses`` (``respond.py``: HTTP/1.1
framing of what the exchanges send, the response side of the ``Downstream``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from proxy.clock import NEVER
from proxy.server.proxied import connection_addresses

if TYPE_CHECKING:
    from proxy.forwarding.exchange import Exchange
    from proxy.proxy_protocol import Addresses
    from proxy.server.listener import Listener
    from proxy.server.refusals import _Rejection
    from proxy.server.tunnel import Tunnel

IDLE: Final = 0  # between requests (keep-alive)
HEAD: Final = 1  # a request head is arriving
BODY: Final = 2  # a request body is arriving
BUSY: Final = 3  # request read; its response is pending
TUNNEL: Final = 4  # an Upgrade tunnel (``proxy.server.tunnel``) owns the transport
LINGER: Final = 5  # answered and closing: the rest of the request is read and dropped

#: A lingering close (nginx's ``lingering_timeout`` / ``lingering_time``): read and drop
#: what the client still sends after an answer that ends the connection before its
#: request body was read, until it stops for this long, or at most this long in all.
LINGER_TIMEOUT: Final = 5.0
LINGER_TIME: Final = 30.0


class Sender(Protocol):
    """What ``read_nothing`` reads of a client connection, HTTP/1.1 or HTTP/2."""

    transport: asyncio.Transport
    write_paused: bool
    send_mark: int
    send_deadline: float
    timeout_send: float


def read_nothing(conn: Sender, now: float) -> bool:
    """``conn``'s client has read nothing of a full write buffer for ``timeouts.send``
    (nginx's ``send_timeout``; called once ``send_deadline`` passed): then True, and the
    caller closes. A client that reads, however slowly, gets another period."""
    if not conn.write_paused:
        conn.send_deadline = NEVER
        return False
    size = conn.transport.get_write_buffer_size()
    if size < conn.send_mark:
        conn.send_mark = size
        conn.send_deadline = now + conn.timeout_send
        return False
    return True


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Closed(Exception):
    """Raised inside a parser callback to stop parsing: the connection is closing
    (an answer said ``Connection: close``), so what follows in the buffer is dropped."""


class ConnectionBase(asyncio.Protocol):
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
        "linger_until",
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
        "proxied",
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
        self.linger_until = 0.0  # the end of a lingering close (``LINGER``)
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.client_ip_bytes = b""
        #: the addresses a PROXY header gave (``proxy.server.proxied``), or the
        #: connection's own once a ``send_proxy_protocol`` pool asked; None: the peer's
        self.proxied: Addresses | None = None
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
        #: the upstream request head's format (``proxy.http.headers.head_template``)
        self.head_template = listener.head_template
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

    def addresses(self) -> Addresses | None:
        found = self.proxied
        if found is None:  # the connection's own, asked once (``send_proxy_protocol``)
            found = self.proxied = connection_addresses(None, self.transport)
        return found

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def close(self) -> None:
        """Close after what is already written has been sent."""
        self.broken = True
        self.deadline = NEVER
        if not self.closed:
            self.closed = True
            self.transport.close()

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
