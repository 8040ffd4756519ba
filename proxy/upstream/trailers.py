"""The trailer fields of a chunked HTTP/1.1 response, read only when they are wanted.

httptools reports header lines, trailers included, only to a protocol that has an
``on_header``, and decides so when the parser is made. ``UpstreamConnection`` has none:
it takes a head from its raw bytes, so a response costs Python one call per head, not
one per line. A chunked response whose request said ``TE: trailers`` is read on, after
its head, by a parser of its own (``trailer_parser``), whose protocol is a
``TrailerReader``: it is given a stand-in head with the same framing and keep-alive
(its own callbacks ignore that head), then the rest of the response; body pieces go to
the connection as before, the trailer lines are collected, and at the message's end
they reach the exchange (``on_response_trailers``) before the connection completes
the response and goes back to an ordinary parser for the next one. Responses nobody
asked trailers of, the fast path among them, pay nothing for this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import httptools

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.upstream.connection import UpstreamConnection

#: The most bytes of trailer fields read (a response head's limit: ``MAX_RESPONSE_HEAD``).
MAX_TRAILERS: Final = 64 * 1024

_STAND_IN: Final = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
_STAND_IN_CLOSE: Final = _STAND_IN.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")


class InvalidTrailers(Exception):
    """Raised inside the parser for trailers over ``MAX_TRAILERS``: the response fails
    as an invalid one (the client connection closes mid-response)."""


class TrailerReader:
    """The protocol of a ``trailer_parser``: the body to the connection, the trailer
    fields collected, and both to the exchange at the end."""

    __slots__ = ("conn", "fields", "in_head", "on_body", "on_message_begin", "size")

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.fields: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.in_head = True  # the stand-in head is being parsed: its line is not a trailer
        # the connection's own callbacks, bound: no extra call per body piece
        self.on_body: Callable[[bytes], None] = conn.on_body
        self.on_message_begin: Callable[[], None] = conn.on_message_begin

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            return
        self.size += len(name) + len(value) + 4
        if self.size > MAX_TRAILERS:
            raise InvalidTrailers(f"trailers larger than {MAX_TRAILERS} bytes")
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False

    def on_message_complete(self) -> None:
        conn = self.conn
        ex = conn.exchange
        if self.fields and ex is not None:
            ex.on_response_trailers(self.fields)
        conn.on_message_complete()  # reads this parser's keep-alive: the upstream's
        # the next response gets an ordinary parser; bytes after this one in the read
        # still reach this parser, whose ``on_message_begin`` (the connection's) refuses
        conn.parser = httptools.HttpResponseParser(conn)


def trailer_parser(conn: UpstreamConnection, keep_alive: bool) -> httptools.HttpResponseParser:
    """A parser to read the rest of ``conn``'s chunked response, after its head, and its
    trailers (``keep_alive``: the upstream keeps the connection after it, as the real
    head said)."""
    parser = httptools.HttpResponseParser(TrailerReader(conn))
    parser.feed_data(_STAND_IN if keep_alive else _STAND_IN_CLOSE)
    return parser
