"""HTTP/2 header lists to and from the proxy's HTTP/1.1 forms (RFC 9113 section 8.2-8.3).

The exchange thinks in HTTP/1.1 shapes: a request is a method, a target and a header
list with ``Host``; a response head is the status line and header lines
(``proxy.http.headers.ResponseHead``). An HTTP/2 stream is translated at its edge:

- a request: the pseudo-headers become the method, the target and ``Host`` (from
  ``:authority``; a ``Host`` that names another authority is malformed, not guessed
  at); cookie crumbs are joined with ``; `` for HTTP/1.1 (section 8.2.3); a body with
  no ``Content-Length`` is marked ``Transfer-Encoding: chunked`` for the upstream;
  ``te: trailers`` stays (``RequestHeaders`` notes it: an HTTP/1.1 upstream's trailers
  are read for this client, and it is asked for them);
- a response: the status line becomes ``:status``, names are lower-cased, and the
  connection-specific headers never cross (section 8.2.2: ``Connection``,
  ``Keep-Alive``, ``Proxy-Connection``, ``Transfer-Encoding``, ``Upgrade``).

A request head is checked here, not in the codec (``Codec(validate_headers=False)``),
so that what section 8.1.1 makes malformed is an error of its stream (answered 400), not
of the whole connection and every other stream on it: upper-case names or characters a
name or value must not have (a CR or LF would split the HTTP/1.1 head the upstream
gets), connection-specific headers, ``te`` other than ``trailers``, pseudo-headers
unknown, repeated or after a regular field, a missing ``:method``, ``:scheme`` or
``:path``, a ``Content-Length`` that is not digits.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

Headers = list[tuple[bytes, bytes]]

#: Reason phrases for the status lines of HTTP/2 responses (which have none).
REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}
#: Never sent in an HTTP/2 message (RFC 9113 section 8.2.2).
CONNECTION_SPECIFIC: Final = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_CHUNKED: Final = (b"transfer-encoding", b"chunked")
#: A character no field name may have (RFC 9113 section 8.2.1; upper case included).
_BAD_NAME: Final = re.compile(rb"[\x00-\x20:A-Z\x7f-\xff]").search
#: NUL, CR or LF anywhere, or whitespace at either end of a field value.
_BAD_VALUE: Final = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z").search


class Malformed(ValueError):
    """A request the proxy will not forward (RFC 9113 section 8.1.1); ``status`` is the
    answer, when there can be one."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def request_from_h2(headers: Headers, has_body: bool) -> tuple[bytes, bytes, Headers]:
    """``(method, target, headers)``: the HTTP/1.1 form of an HTTP/2 request head
    (raises ``Malformed`` for a request RFC 9113 section 8.1.1 makes malformed). A
    client repeats its heads (the decoder hands back the same fields for a block it
    decoded before): the last ``_LISTS_MAX`` heads translated are remembered (a few
    MiB at most, at the largest header lists allowed). The list returned is shared:
    never change it."""
    key = (tuple(headers), has_body)
    found = _FROM_CLIENTS.get(key)
    if found is None:
        if len(_FROM_CLIENTS) >= _LISTS_MAX:
            _FROM_CLIENTS.clear()
        try:
            found = _request_from_h2(headers, has_body)
        except Malformed as exc:
            found = exc
        _FROM_CLIENTS[key] = found
    if isinstance(found, Malformed):
        raise Malformed(str(found), found.status)
    return found


#: Header lists whose translations are remembered (``request_from_h2``,
#: ``response_from_h2``).
_LISTS_MAX: Final = 64
#: ``request_from_h2``'s answers (or refusals) by header list.
_FROM_CLIENTS: Final[
    dict[tuple[tuple[tuple[bytes, bytes], ...], bool], tuple[bytes, bytes, Headers] | Malformed]
] = {}


def _request_from_h2(headers: Headers, has_body: bool) -> tuple[bytes, bytes, Headers]:
    method = target = authority = scheme = None
    host: bytes | None = None
    cookies: list[bytes] | None = None
    length = False
    out: Headers = []
    bad_value = _BAD_VALUE
    for name, value in headers:
        if value and bad_value(value):
            raise Malformed(f"invalid value of {name!r}")
        if name[:1] == b":":
            if out or cookies is not None or host is not None:
                raise Malformed(f"pseudo-header {name!r} after a regular field")
            if name == b":method" and method is None:
                method = value
            elif name == b":path" and target is None:
                target = value
            elif name == b":authority" and authority is None:
                authority = value
            elif name == b":scheme" and scheme is None:
                scheme = value
            else:
                raise Malformed(f"unknown or repeated pseudo-header {name!r}")
            continue
        if not name or _BAD_NAME(name):
            raise Malformed(f"invalid field name {name!r}")
        if name == b"cookie":
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
        elif name == b"host":
            if host is not None:
                raise Malformed("two Host headers")
            host = value
        elif name == b"te":
            if value != b"trailers":
                raise Malformed("te other than trailers")
            out.append((name, value))  # ``RequestHeaders`` notes it and asks an upstream
        elif name in CONNECTION_SPECIFIC:
            raise Malformed(f"connection-specific header {name!r}")
        else:
            if name == b"content-length":
                if not value.isdigit():
                    raise Malformed("invalid Content-Length")
                length = True
            out.append((name, value))
    if method is None:
        raise Malformed("no :method")
    if method == b"CONNECT":
        raise Malformed("CONNECT is not forwarded", 405)
    if not target:
        raise Malformed("no :path")
    if not scheme:
        raise Malformed("no :scheme")
    if authority:
        if host is not None and host.lower() != authority.lower():
            raise Malformed("Host names another authority than :authority")
        host = authority
    if host is None:
        raise Malformed("no :authority and no Host")
    out.insert(0, (b"host", host))
    if cookies is not None:
        out.append((b"cookie", b"; ".join(cookies)))
    if has_body and not length:
        out.append(_CHUNKED)
    return method, target, out


#: Heads translated lately: an upstream repeats its head until its ``Date`` ticks, and
#: the exchange's head cache hands over the same bytes object (its hash kept), so most
#: responses cost a lookup. Bounded: emptied when full. The lists are never changed.
_RESPONSES: Final[dict[bytes, Headers]] = {}
_RESPONSES_MAX: Final = 512


def response_to_h2(head: bytes) -> Headers:
    """The HTTP/2 header list of an HTTP/1.1 response head: the status line and header
    lines, each ending in CRLF, as ``ResponseHead.head`` holds them (or a whole head
    with its blank line). The list is shared: never change it."""
    found = _RESPONSES.get(head)
    if found is not None:
        return found
    out = _response_to_h2(head)
    if len(_RESPONSES) >= _RESPONSES_MAX:
        _RESPONSES.clear()
    _RESPONSES[head] = out
    return out


def _response_to_h2(head: bytes) -> Headers:
    lines = head.split(b"\r\n")
    out: Headers = [(b":status", lines[0][9:12])]
    drop = CONNECTION_SPECIFIC
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name not in drop:
            out.append((name, value.strip()))
    return out


def split_response(data: bytes | list[bytes]) -> tuple[Headers, bytes]:
    """A whole HTTP/1.1 response the proxy made (an error page, a filter's or the
    cache's answer, ``Content-Length`` framed): its HTTP/2 headers and its body."""
    raw = data if isinstance(data, bytes) else b"".join(data)
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return response_to_h2(raw), b""
    return response_to_h2(raw[:end]), raw[end + 4 :]


#: Request headers an HTTP/2 upstream never gets (``te`` is sent as ``trailers`` only).
_NOT_UPSTREAM: Final = CONNECTION_SPECIFIC | {b"host", b"te"}


class RequestFraming:
    """How the body of a request head the proxy built is framed on HTTP/1.1: none,
    ``length`` bytes, or chunked (what an HTTP/2 upstream session must undo)."""

    __slots__ = ("chunked", "length")

    def __init__(self, chunked: bool, length: int) -> None:
        self.chunked = chunked
        self.length = length  # -1: chunked; 0: no body


def request_to_h2(head: bytes, scheme: bytes) -> tuple[Headers, RequestFraming]:
    """The HTTP/2 form of a request head the proxy built for HTTP/1.1
    (``proxy.http.headers.request_head``: its own bytes, so well-formed): pseudo-headers
    first, ``Host`` as ``:authority``, connection-specific headers left out, names in
    lower case, ``te: trailers`` (what gRPC servers ask of a proxy)."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.rpartition(b" ")[0]
    authority = b""
    out: Headers = []
    chunked = False
    length = 0
    drop = _NOT_UPSTREAM
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.strip()
        if name in drop:
            if name == b"host":
                authority = value
            elif name == b"transfer-encoding":
                chunked = True
            continue
        if name == b"content-length":
            length = int(value)
        out.append((name, value))
    pseudo: Headers = [
        (b":method", method),
        (b":scheme", scheme),
        (b":authority", authority),
        (b":path", target),
    ]
    pseudo += out
    pseudo.append((b"te", b"trailers"))
    return pseudo, RequestFraming(chunked, -1 if chunked else length)


def response_from_h2(headers: Headers) -> tuple[int, bytes]:
    """``(status, raw)``: an HTTP/2 response head as the HTTP/1.1 head bytes the
    exchange reads (``ResponseHead``), ending in the blank line; status 0 for a head
    that is malformed (RFC 9113 8.1.1, 8.3.2: a ``:status`` that is not three digits,
    missing or repeated, another pseudo-header, one after a field, a connection-specific
    field, a name or value no HTTP/1.1 head may carry: a CR or LF in a value would
    split the response for an HTTP/1.1 client). An upstream repeats its head until its
    ``Date`` ticks: the last ``_LISTS_MAX`` heads translated are remembered."""
    key = tuple(headers)
    found = _FROM_H2.get(key)
    if found is not None:
        return found
    if len(_FROM_H2) >= _LISTS_MAX:
        _FROM_H2.clear()
    found = _FROM_H2[key] = _response_from_h2(headers)
    return found


#: ``response_from_h2``'s answers by header list.
_FROM_H2: Final[dict[tuple[tuple[bytes, bytes], ...], tuple[int, bytes]]] = {}


def _response_from_h2(headers: Headers) -> tuple[int, bytes]:
    status = 0
    parts: list[bytes] = []
    bad_name, bad_value, drop = _BAD_NAME, _BAD_VALUE, CONNECTION_SPECIFIC
    for name, value in headers:
        if name == b":status":
            if status or parts or len(value) != 3 or not value.isdigit():
                return 0, b""
            status = int(value)
        elif not name or bad_name(name) or name in drop or (value and bad_value(value)):
            return 0, b""
        else:
            parts += (name, b": ", value, b"\r\n")
    if not status:
        return 0, b""
    reason = REASONS.get(status, b"")
    return status, b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason, b"".join(parts))


def trailers_ok(trailers: Headers) -> bool:
    """A trailer block from an upstream is well formed: no pseudo-header, names and
    values an HTTP/1.1 chunked trailer may carry too."""
    bad_name, bad_value = _BAD_NAME, _BAD_VALUE
    return all(
        name and not bad_name(name) and not (value and bad_value(value)) for name, value in trailers
    )


# -- gRPC (the proxy's own answers to gRPC calls, and what it reads of them) ------------------

#: gRPC status codes by number (grpc/doc/statuscodes.md): the metric's label values.
GRPC_CODES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip
DEADLINE_EXCEEDED: Final = 4
RESOURCE_EXHAUSTED: Final = 8
UNAVAILABLE: Final = 14
#: The HTTP statuses the proxy answers itself, as gRPC codes: what the proxy knows is
#: never UNKNOWN (its limits are RESOURCE_EXHAUSTED, a missing or failed upstream
#: UNAVAILABLE, a timeout DEADLINE_EXCEEDED; the rest as gRPC's HTTP mapping says).
_GRPC_FOR_HTTP: Final = {
    400: 13, 401: 16, 403: 7, 404: 12, 405: 12, 408: 4, 413: 8, 414: 8, 429: 8, 431: 8,
    500: 13, 501: 12, 502: 14, 503: 14, 504: 4,
}  # fmt: skip
#: ``grpc-timeout`` units in seconds (the gRPC over HTTP/2 spec).
_TIMEOUT_UNITS: Final = {
    b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9
}  # fmt: skip


def is_grpc(headers: Headers) -> bool:
    """The request is a gRPC call (``content-type: application/grpc``, ``+proto`` ...)."""
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(b"application/grpc")
    return False


def grpc_code(status: int, cause: str = "") -> int:
    """The gRPC code for an answer the proxy made with HTTP ``status``."""
    if cause == "limit":
        return RESOURCE_EXHAUSTED
    return _GRPC_FOR_HTTP.get(status, 2 if status >= 400 else 0)


def grpc_error(code: int, message: str) -> Headers:
    """A trailers-only gRPC response (HTTP 200, the status in the one HEADERS frame)."""
    text = "".join(
        c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode())
        for c in message
    )
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", text.encode()),
    ]


def grpc_timeout(headers: Headers) -> float | None:
    """A call's ``grpc-timeout`` in seconds (None: none, or not valid)."""
    for name, value in headers:
        if name == b"grpc-timeout":
            unit = _TIMEOUT_UNITS.get(value[-1:])
            digits = value[:-1]
            if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
                return None
            return int(digits) * unit
    return None


def grpc_status_of(headers: Headers) -> int:
    """The ``grpc-status`` in a trailer block (or a trailers-only head); -1: none."""
    for name, value in headers:
        if name == b"grpc-status":
            return int(value) if value.isdigit() and len(value) < 4 else 2
    return -1
