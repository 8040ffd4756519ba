"""HTTP/1.1 responses to a client: how ``ClientConnection`` frames what an exchange
sends (the response side of the ``Downstream`` interface, ``proxy.forwarding.
downstream``).

Only the current exchange of a connection writes, so the connection holds the
current response's framing (``mode``) and what one upstream read produced (``out``,
written by ``flush`` in one call: joined into one buffer up to 8 KiB, a vector above).

Framing: a ``Content-Length`` is kept; a chunked or close-delimited body becomes
chunked for HTTP/1.1 clients and close-delimited for HTTP/1.0 ones (then the
connection closes); ``Connection: close`` is added when the connection will close,
``Connection: keep-alive`` for an HTTP/1.0 client that stays. 1xx responses reach
HTTP/1.1 clients only.

Trailers (``send_trailers``, fields already checked by ``relayed_trailers``) go in the
last chunk of a chunked response to a client whose request said ``TE: trailers``; to
any other client they are dropped, never made headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from proxy.forwarding.states import DONE
from proxy.http.headers import ResponseHead
from proxy.http.responses import CONTINUE_100, error_response, redirect_response
from proxy.server.refusals import Refusals
from proxy.server.tunnel import Tunnel
from proxy.tcp import JOIN_BELOW, write_pieces

if TYPE_CHECKING:

    from proxy.forwarding.core import ExchangeCore as Exchange
    from proxy.forwarding.downstream import Answer
    from proxy.upstream.connection import UpstreamConnection

# How the current response's body is framed for the client.
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3
TRAILED: Final = 4  # chunked, and the last chunk (with the trailers) is written

_LAST_CHUNK: Final = b"0\r\n\r\n"


class H1Responses(Refusals):
    """The response side of ``ClientConnection``."""

    __slots__ = ()

    def send_continue(self, ex: Exchange) -> None:
        if ex.http_minor:  # HTTP/1.0 clients do not know 100-continue
            self.transport.write(CONTINUE_100)

    def send_informational(self, ex: Exchange, status: int, raw: bytes) -> None:
        if ex.http_minor:
            self.out += (ResponseHead(raw).head, b"\r\n")

    def send_head(self, ex: Exchange, status: int, found: ResponseHead) -> None:
        # a request still arriving when its answer starts: the connection closes after
        # it (the rest of the body is read and dropped: ``ClientConnection._linger``)
        keep = ex.keep_alive and not self.draining and ex.req is DONE
        extra = b""
        minor = ex.http_minor
        if ex.head_request or status == 204 or status == 304:
            mode = NO_BODY
        elif found.has_length:
            mode = LENGTH
        elif minor:
            mode = CHUNKED
            extra = b"Transfer-Encoding: chunked\r\n"
        else:
            mode = UNTIL_CLOSE
            keep = False
        self.mode = mode
        ex.keep_alive = keep
        if not keep:
            extra += b"Connection: close\r\n"
        elif not minor:
            extra += b"Connection: keep-alive\r\n"
        self.out += (found.head, extra, b"\r\n") if extra else (found.head, b"\r\n")

    def send_body(self, ex: Exchange, data: bytes | memoryview) -> None:
        mode = self.mode
        if mode == CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif mode != NO_BODY:
            self.out.append(data)

    def send_trailers(self, ex: Exchange, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.mode == CHUNKED and ex.found.trailers:
            self.mode = TRAILED
            self.out += (b"0\r\n", *[b"%s: %s\r\n" % field for field in trailers], b"\r\n")

    def send_end(self, ex: Exchange) -> None:
        if self.mode == CHUNKED:
            self.out.append(_LAST_CHUNK)

    def send_answer(self, ex: Exchange, answer: Answer, close: bool) -> None:
        self.mode = NO_BODY  # the upstream's body, still to come, is dropped
        data = answer.render(close, ex.head_request)
        if isinstance(data, list):
            self.out += data
        else:
            self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            write_pieces(self.transport, out)

    def send_whole(self, ex: Exchange, found: ResponseHead, body: bytes | memoryview) -> None:
        keep = ex.keep_alive = ex.keep_alive and not self.draining
        if not keep:
            end = b"Connection: close\r\n\r\n"
        elif ex.http_minor:
            end = b"\r\n"
        else:
            end = b"Connection: keep-alive\r\n\r\n"
        if len(body) <= JOIN_BELOW:
            self.transport.write(b"".join((found.head, end, body)))
        else:
            self.transport.writelines((found.head + end, body))

    def send_local(
        self, ex: Exchange, status: int, answer: Answer | None, close: bool, cause: str
    ) -> None:
        if answer is None:
            self.transport.write(error_response(status, close, ex.head_request, cause))
        else:  # a filter's LocalResponse, a cache hit
            data = answer.render(close, ex.head_request)
            write_pieces(self.transport, data if isinstance(data, list) else [data])

    def send_redirect(self, ex: Exchange, location: bytes, close: bool) -> None:
        self.transport.write(redirect_response(location, close))

    def switch(self, ex: Exchange, conn: UpstreamConnection, protocol: str, head: bytes,
               rest: bytes) -> None:  # fmt: skip
        self.transport.write(head)
        pool = ex.pool
        assert pool is not None
        Tunnel(self, conn, protocol, pool.tunnel_idle, ex).start(rest)  # type: ignore[arg-type]
