"""Raw sockets for the framing suite and the fuzz: a recording upstream and a client.

``FramingUpstream`` is an asyncio server that keeps every byte each connection
received and reads it as a sequence of HTTP/1.1 requests (``Content-Length`` and
chunked framing honoured), so a test sees exactly what the proxy forwarded, smuggled
bytes included. Like Go's net/http or Node, it answers each request head as soon as the
head is parsed, before reading its body; the default answer is a 200 whose body is the
request path, so the client side shows which request each response belongs to.

``RawClient`` keeps what the proxy sent (also when the proxy resets the connection,
where a ``StreamReader`` would raise first) and whether the connection ended;
``split_responses`` cuts what a client read into responses.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
from dataclasses import dataclass

from tests.support import HOST

#: Before the answer or after it: close (FIN), reset (RST) or keep the connection.
CLOSE, RESET = "close", "reset"
ANY_PATH = b"*"


def default_answer(path: bytes) -> bytes:
    """A 200 naming the request: its body is the path."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)


def reset(transport: asyncio.BaseTransport) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass
class SeenRequest:
    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-case


class _UpstreamSide(asyncio.Protocol):
    """One upstream connection: records, parses requests, answers each head at once."""

    def __init__(self, owner: FramingUpstream) -> None:
        self.owner = owner
        self.raw = bytearray()
        self.buf = b""
        self.body_left = 0  # of a Content-Length body
        self.chunked = False
        self.chunk_left = 0  # chunk data plus its CRLF
        self.in_trailer = False
        self.broken = False  # bytes that are no request: recorded, no longer parsed
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.conns.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.raw += data
        self.buf += data
        while not self.broken and not self.closed and self.buf and self._step():
            pass

    def _step(self) -> bool:
        if self.body_left:
            taken = min(self.body_left, len(self.buf))
            self.body_left -= taken
            self.buf = self.buf[taken:]
            return True
        if self.chunked:
            return self._chunk_step()
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head, self.buf = self.buf[:end], self.buf[end + 4 :]
        self._on_head(head)
        return True

    def _chunk_step(self) -> bool:
        if self.chunk_left:
            if len(self.buf) < self.chunk_left:
                return False
            self.buf, self.chunk_left = self.buf[self.chunk_left :], 0
            return True
        end = self.buf.find(b"\r\n")
        if end < 0:
            return False
        line, self.buf = self.buf[:end], self.buf[end + 2 :]
        if self.in_trailer:
            self.chunked = self.in_trailer = line != b""
            return True
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            self.broken = True
            return False
        self.in_trailer = size == 0
        self.chunk_left = size + 2 if size else 0
        return True

    def _on_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self.broken = True
            self.owner.garbage.append(head)
            return
        headers = [
            (n.strip().lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines[1:])
        ]
        self.owner.requests.append(SeenRequest(parts[0], parts[1], headers))
        codings = [v for n, v in headers if n == b"transfer-encoding"]
        lengths = [v for n, v in headers if n == b"content-length"]
        if codings:
            self.chunked = codings[-1].lower().endswith(b"chunked")
            self.broken = not self.chunked  # a body to the end of the connection
        elif lengths:
            self.body_left = int(lengths[-1])
        self._answer(parts[1])

    def _answer(self, path: bytes) -> None:
        owner = self.owner
        answers, then = owner.answers, owner.then
        answer = answers.get(path, answers.get(ANY_PATH, default_answer(path)))
        assert self.transport is not None
        self.transport.write(answer)
        after = then.get(path, then.get(ANY_PATH))
        if after == CLOSE:
            self.transport.close()
        elif after == RESET:
            reset(self.transport)


class FramingUpstream:
    """The recording upstream (see the module's docstring).

    ``answers``: path → exact response bytes (``ANY_PATH`` for every path not named);
    ``then``: path → ``CLOSE`` or ``RESET`` after that answer (else the connection is
    kept). Both may be changed between requests.
    """

    def __init__(
        self, answers: dict[bytes, bytes] | None = None, then: dict[bytes, str] | None = None
    ) -> None:
        self.answers = dict(answers or {})
        self.then = dict(then or {})
        self.conns: list[_UpstreamSide] = []
        self.requests: list[SeenRequest] = []
        self.garbage: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FramingUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _UpstreamSide(self), HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def paths(self) -> list[bytes]:
        """The request paths parsed, in order of arrival."""
        return [r.path for r in self.requests]

    @property
    def raw(self) -> bytes:
        """Every byte received, all connections."""
        return b"".join(bytes(c.raw) for c in self.conns)

    def end_all(self, how: str) -> None:
        """End every open connection: ``CLOSE`` (FIN) or ``RESET`` (RST)."""
        for conn in self.conns:
            if not conn.closed and conn.transport is not None:
                if how == RESET:
                    reset(conn.transport)
                else:
                    conn.transport.close()

    async def stop(self) -> None:
        self.end_all(CLOSE)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


class RawClient(asyncio.Protocol):
    """A client connection keeping every byte the proxy sent and when it ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        _, client = await asyncio.get_running_loop().create_connection(cls, HOST, port)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(data)

    async def until_closed(self, timeout: float = 5.0) -> bytes:
        """Everything the proxy sent, once it closed (fails after ``timeout``)."""
        await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        return bytes(self.received)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def exchange_to_close(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection; everything read until the proxy closed."""
    client = await RawClient.connect(port)
    try:
        client.send(data)
        return await client.until_closed(timeout)
    except TimeoutError:
        read = bytes(client.received)[:600]
        raise AssertionError(f"not closed within {timeout}s; read {read!r}") from None
    finally:
        client.close()


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]  # names lower-case
    body: bytes
    framing: str  # "length", "chunked", "eof" (to the end of the connection), "none"
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n == name]
        return b", ".join(values) if values else None

    @property
    def closes(self) -> bool:
        return b"close" in (self.header(b"connection") or b"").lower()


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")


def _chunked(data: bytes) -> tuple[bytes, bytes, bool]:
    """(body, rest, complete) of a chunked body at the start of ``data``."""
    body = b""
    while True:
        end = data.find(b"\r\n")
        if end < 0:
            return body, b"", False
        try:
            size = int(data[:end].split(b";")[0], 16)
        except ValueError:
            return body, b"", False
        data = data[end + 2 :]
        if size == 0:
            end = data.find(b"\r\n\r\n") if data[:2] != b"\r\n" else -2
            if end == -1:
                return body, b"", False
            return body, data[end + 4 :], True
        if len(data) < size + 2:
            return body + data[:size], b"", False
        body += data[:size]
        data = data[size + 2 :]


def split_responses(data: bytes) -> tuple[list[Response], bytes]:
    """The responses in everything a client read, and what is left that is none."""
    out: list[Response] = []
    while data:
        end = data.find(b"\r\n\r\n")
        lines = data[:end].split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0]) if end >= 0 else None
        if match is None:
            break
        status = int(match.group(1))
        headers = [
            (n.strip().lower(), v.strip()) for n, _, v in (x.partition(b":") for x in lines[1:])
        ]
        response = Response(status, headers, b"", "none")
        rest = data[end + 4 :]
        length = response.header(b"content-length")
        if 100 <= status < 200 or status in (204, 304):
            pass
        elif b"chunked" in (response.header(b"transfer-encoding") or b""):
            response.framing = "chunked"
            response.body, rest, response.complete = _chunked(rest)
        elif length is not None and length.isdigit():
            response.framing = "length"
            response.body, rest = rest[: int(length)], rest[int(length) :]
            response.complete = len(response.body) == int(length)
        else:
            response.framing = "eof"
            response.body, rest = rest, b""
        out.append(response)
        data = rest
    return out, data


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """The log records that carry a traceback (``exc_info`` or the text), as lines."""
    return [
        f"{r.levelname} {r.getMessage()}"
        for r in records
        if r.exc_info or "Traceback" in r.getMessage() or "AssertionError" in r.getMessage()
    ]


class LogCatch(logging.Handler):
    """Every record of the loggers it is added to, at every level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
