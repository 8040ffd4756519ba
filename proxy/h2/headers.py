"""HTTP/2 header lists to and from the proxy's HTTP/1.1 forms (RFC 9113 section 8.2-8.3).

The exchange thinks in HTTP/1.1 shapes: a request is a method, a target and a header
list with ``Host``; a response head is the status line and header lines
(``proxy.http.headers.ResponseHead``). An HTTP/2 stream is translated at its edge:

- a request: the pseudo-headers become the method, the target and ``Host`` (from
  ``:authority``; a ``Host`` that names another authority is malformed, not guessed
  at); cookie crumbs are joined with ``; `` for HTTP/1.1 (section 8.2.3); a body with
  no ``Content-Length`` is marked ``Transfer-Encoding: chunked`` for the upstream;
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
from typing import Final

Headers = list[tuple[bytes, bytes]]

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
    (raises ``Malformed`` for a request RFC 9113 section 8.1.1 makes malformed)."""
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
            # it says nothing to an upstream: not forwarded
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


def response_to_h2(head: bytes) -> Headers:
    """The HTTP/2 header list of an HTTP/1.1 response head: the status line and header
    lines, each ending in CRLF, as ``ResponseHead.head`` holds them (or a whole head
    with its blank line)."""
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


def informational_to_h2(raw: bytes) -> Headers:
    """A 1xx head as the upstream sent it (with its blank line)."""
    return response_to_h2(raw)
