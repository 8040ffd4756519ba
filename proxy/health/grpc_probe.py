"""gRPC health probes: ``grpc.health.v1.Health/Check`` over HTTP/2 (the ``h2`` codec).

Theory of operation
-------------------
One probe is one connection, as for the HTTP probes: connect (TLS with ALPN ``h2`` to
an ``https://`` upstream, prior knowledge to an ``http://`` one), the client preface,
one call (HEADERS, then DATA ending the stream), frames read until that stream ends,
then GOAWAY and close. The caller bounds the whole probe with the check's timeout,
which goes out as ``grpc-timeout`` too, so the server gives up when the probe does.

The call passes only if the answer is HTTP ``:status`` 200 with an ``application/grpc``
content type, ``grpc-status`` 0 (in the trailers, or in the headers of a trailers-only
answer) and one ``HealthCheckResponse`` whose status is ``SERVING``. Anything else is
a failure with a short reason for the log (``NOT_SERVING``, ``grpc-status 12
UNIMPLEMENTED``, ``not HTTP/2: the upstream answered HTTP/1.x``). The two messages
are hand-encoded protobuf (the request has one string field, the response one enum
field; other fields are skipped as protobuf says): no protobuf runtime. Connect, TLS
and timeout errors (``OSError``, ``TimeoutError``) reach the caller, which describes
them as it does for the other probes.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Iterable
from typing import Final
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from proxy.tcp import connect_sending

#: The method every probe calls.
PATH: Final = "/grpc.health.v1.Health/Check"
#: ``HealthCheckResponse.ServingStatus`` values, by number.
SERVING_STATUS: Final = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
SERVING: Final = 1
#: gRPC status codes, by number (``grpc-status``).
GRPC_STATUS: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip
#: ALPN offered to ``https://`` upstreams.
ALPN: Final = ["h2"]
#: The most of an answer's body read: a ``HealthCheckResponse`` is a few bytes.
MAX_BODY: Final = 64 * 1024
_READ: Final = 64 * 1024


class ProbeFailed(Exception):
    """The call failed in a way that has a reason of its own (not a socket error)."""


# --- the messages: gRPC framing and protobuf ---------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it."""
    value = shift = 0
    while pos < len(data) and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise ValueError("truncated varint")


def encode_request(service: str) -> bytes:
    """A gRPC-framed ``HealthCheckRequest{service}``: flag 0 (not compressed), the
    length as a big-endian u32, then field 1 (tag 0x0A: length-delimited) unless empty."""
    name = service.encode()
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(body: bytes) -> bytes:
    """The one message of a unary answer's body (gRPC's 5-byte length prefix removed)."""
    if len(body) < 5:
        raise ValueError(f"{len(body)} bytes, no gRPC message")
    if body[0] != 0:
        raise ValueError("a compressed message (none was asked for)")
    length = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise ValueError(f"a message of {length} bytes in a body of {len(body) - 5}")
    return body[5:]


def decode_response(message: bytes) -> int:
    """``HealthCheckResponse.status`` (field 1, an enum: 0 when absent); other fields
    are skipped by their wire type, the last ``status`` wins (protobuf's rules)."""
    status, pos = 0, 0
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(message, pos)
            if number == 1:
                status = value
            continue
        if wire == 2:
            size, pos = _read_varint(message, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"field {number} has wire type {wire}")
        if number == 1 or pos + size > len(message):
            raise ValueError(f"field {number} is malformed")
        pos += size
    return status


def serving_name(status: int) -> str:
    """``SERVING``, ``NOT_SERVING``, ... or ``status 7`` for a value this code does not
    know."""
    return SERVING_STATUS[status] if 0 <= status < len(SERVING_STATUS) else f"status {status}"


def timeout_header(seconds: float) -> str:
    """``grpc-timeout`` for ``seconds``: milliseconds rounded up (at most 8 digits, then
    whole seconds)."""
    millis = max(1, math.ceil(seconds * 1000))
    if millis <= 99_999_999:
        return f"{millis}m"
    return f"{min(99_999_999, math.ceil(seconds))}S"


# --- the call --------------------------------------------------------------------------


class HealthCall:
    """One ``Health/Check`` call on a new client connection: bytes in, bytes out."""

    __slots__ = ("body", "conn", "done", "head", "started", "trailers")

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.head: dict[str, str] = {}
        self.trailers: dict[str, str] | None = None
        self.body = bytearray()
        self.done = False
        self.started = False  # anything received yet

    def start(self, authority: str, scheme: str, service: str, timeout: float) -> bytes:
        """The preface and the whole request, ready to write."""
        self.conn.initiate_connection()
        headers = [
            (":method", "POST"), (":scheme", scheme), (":path", PATH),
            (":authority", authority), ("content-type", "application/grpc"),
            ("te", "trailers"), ("grpc-timeout", timeout_header(timeout)),
        ]  # fmt: skip
        self.conn.send_headers(1, headers)
        data = encode_request(service)
        step = self.conn.max_outbound_frame_size
        for at in range(0, len(data), step):
            self.conn.send_data(1, data[at : at + step], end_stream=at + step >= len(data))
        return self.conn.data_to_send()

    def feed(self, data: bytes) -> bytes:
        """Take what the upstream sent; returns what to send back (ACKs, window updates)."""
        if not self.started and data.startswith(b"HTTP/"):
            raise ProbeFailed("not HTTP/2: the upstream answered HTTP/1.x")
        self.started = True
        for event in self.conn.receive_data(data):
            self._event(event)
            if self.done:
                break
        return self.conn.data_to_send()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.head = _fields(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            self.body += event.data or b""
            if len(self.body) > MAX_BODY:
                raise ProbeFailed(f"an answer of more than {MAX_BODY} bytes")
            self.conn.acknowledge_received_data(event.flow_controlled_length, 1)
        elif isinstance(event, h2.events.TrailersReceived):
            self.trailers = _fields(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self.done = True
        elif isinstance(event, h2.events.StreamReset):
            raise ProbeFailed(f"stream reset by the upstream ({_code(event.error_code)})")
        elif isinstance(event, h2.events.ConnectionTerminated):
            raise ProbeFailed(f"GOAWAY from the upstream ({_code(event.error_code)})")

    def goodbye(self) -> bytes:
        """GOAWAY, to close politely once the call is over."""
        self.conn.close_connection()
        return self.conn.data_to_send()

    def verdict(self) -> tuple[bool, str]:
        """(passed, reason) once the stream ended."""
        status = self.head.get(":status", "none")
        if status != "200":
            return False, f"HTTP status {status}"
        content_type = self.head.get("content-type", "")
        if not content_type.startswith("application/grpc"):
            return False, f"not a gRPC answer (content-type {content_type or 'none'})"
        meta = self.head if self.trailers is None else self.trailers
        code = meta.get("grpc-status")
        if code != "0":
            return False, _grpc_failure(code, meta.get("grpc-message", ""))
        try:
            serving = decode_response(unframe(bytes(self.body)))
        except ValueError as exc:
            return False, f"invalid HealthCheckResponse: {exc}"
        return serving == SERVING, serving_name(serving)


def _fields(headers: Iterable[tuple[bytes, bytes]] | None) -> dict[str, str]:
    """Header pairs (bytes, as ``h2`` gives them without a header encoding) as text."""
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in headers or ()}


def _code(error_code: object) -> str:
    name = getattr(error_code, "name", None)
    return str(name) if name is not None else f"error {error_code}"


def _grpc_failure(code: str | None, message: str) -> str:
    """``grpc-status 12 UNIMPLEMENTED: Method not found!``, ``no grpc-status``."""
    if code is None:
        return "no grpc-status in the answer"
    name = GRPC_STATUS[int(code)] if code.isdigit() and int(code) < len(GRPC_STATUS) else ""
    text = f"grpc-status {code} {name}".rstrip()
    detail = "".join(c if c.isprintable() else " " for c in unquote(message, errors="replace"))
    return f"{text}: {detail.strip()[:100]}" if detail.strip() else text


# --- the probe -------------------------------------------------------------------------


async def check(
    host: str,
    port: int,
    *,
    service: str,
    authority: str,
    timeout: float,
    context: ssl.SSLContext | None = None,
    server_name: str | None = None,
    first: bytes | None = None,
) -> tuple[bool, str]:
    """One ``Health/Check`` call to ``host:port``: (passed, reason). ``context`` (TLS,
    offering ALPN ``h2``) for an ``https://`` upstream. The caller bounds it in time;
    ``OSError`` and ``TimeoutError`` are left to it, every other failure is a reason."""
    name = server_name if context else None
    if first is None:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=name
        )
    else:  # a PROXY header before anything (``send_proxy_protocol``)
        sock = await connect_sending(asyncio.get_running_loop(), host, port, first)
        reader, writer = await asyncio.open_connection(sock=sock, ssl=context, server_hostname=name)
    try:
        if context is not None:
            chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
            if chosen != "h2":
                return False, f"ALPN: the upstream did not choose h2 ({chosen or 'none'})"
        call = HealthCall()
        scheme = "https" if context is not None else "http"
        writer.write(call.start(authority, scheme, service, timeout))
        while not call.done:
            data = await reader.read(_READ)
            if not data:
                return False, "connection closed before the answer"
            writer.write(call.feed(data))
            await writer.drain()
        writer.write(call.goodbye())
        return call.verdict()
    except ProbeFailed as exc:
        return False, str(exc)
    except h2.exceptions.H2Error as exc:
        return False, f"HTTP/2 error: {str(exc) or type(exc).__name__}"[:200]
    finally:
        writer.close()
