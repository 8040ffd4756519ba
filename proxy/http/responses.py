"""Preformatted responses the proxy makes itself (no upstream answered).

Each is built once at import: on the hot path an error costs one dict lookup and one
``transport.write``. Bodies are short plain text; the status line says it all.
"""

from __future__ import annotations

from typing import Final

REASONS: Final[dict[int, bytes]] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

_BODIES: Final[dict[int, bytes]] = {
    400: b"400 Bad Request: the request could not be parsed\n",
    403: b"403 Forbidden: this route does not allow that Upgrade protocol\n",
    404: b"404 Not Found: no route matches this request\n",
    405: b"405 Method Not Allowed: aiolb is a reverse proxy, not a forward proxy\n",
    408: b"408 Request Timeout: the request was not received in time\n",
    413: b"413 Content Too Large: the request body exceeds the limit\n",
    414: b"414 URI Too Long: the request target exceeds the limit\n",
    431: b"431 Request Header Fields Too Large: the header block exceeds the limit\n",
    500: b"500 Internal Server Error\n",
    502: b"502 Bad Gateway: the upstream did not give a valid response\n",
    503: b"503 Service Unavailable: no upstream is available\n",
    504: b"504 Gateway Timeout: the upstream did not answer in time\n",
    505: b"505 HTTP Version Not Supported: aiolb speaks HTTP/1.0 and HTTP/1.1\n",
}

#: bodies that say more than the status's usual one, by ``ProxyError.cause``: a 502 for
#: an upstream that refused or never answered the connection is not an invalid response
_CAUSES: Final[dict[str, tuple[int, bytes]]] = {
    "connect": (502, b"502 Bad Gateway: no connection to the upstream could be made\n"),
    "limit": (
        503, b"503 Service Unavailable: the upstream's connection limit is reached and its "
        b"queue is full\n",
    ),
}

CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
#: The methods the proxy forwards, as its ``Allow`` header says them (no TRACE, CONNECT).
ALLOW: Final = b"Allow: GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS\r\n"


def _build(status: int, close: bool, body: bytes | None = None) -> bytes:
    body = _BODIES[status] if body is None else body
    extra = b""
    if status == 405:
        extra = ALLOW
    elif status == 503:
        extra = b"Retry-After: 1\r\n"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]),
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            extra,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


#: ``RESPONSES[status][close]`` is the full response (head and body).
RESPONSES: Final[dict[int, tuple[bytes, bytes]]] = {
    status: (_build(status, False), _build(status, True)) for status in _BODIES
}


#: ``CAUSED[cause][close]``: the same for the bodies of ``_CAUSES``.
CAUSED: Final[dict[str, tuple[bytes, bytes]]] = {
    cause: (_build(status, False, body), _build(status, True, body))
    for cause, (status, body) in _CAUSES.items()
}


def error_response(status: int, close: bool, head_only: bool = False, cause: str = "") -> bytes:
    """The proxy's own response for ``status``; ``head_only`` for HEAD requests;
    ``cause`` (``ProxyError.cause``) picks a body that says what failed."""
    data = CAUSED[cause][close] if cause else RESPONSES[status][close]
    if head_only:
        return data[: data.index(b"\r\n\r\n") + 4]
    return data


def redirect_response(location: bytes, close: bool) -> bytes:
    """``308 Permanent Redirect`` to ``location`` (``redirect_https``), with no body."""
    return b"".join(
        (
            b"HTTP/1.1 308 Permanent Redirect\r\nLocation: ",
            location,
            b"\r\nContent-Length: 0\r\n",
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
        )
    )



class Fixed:
    """A response the proxy makes with its own head lines and body (``Exchange.local``
    writes ``render``), preformatted at import for both ``Connection`` choices."""

    __slots__ = ("data", "status")

    def __init__(self, status: int, lines: bytes, body: bytes) -> None:
        self.status = status
        head = b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n" % (
            status, REASONS[status], lines, len(body))  # fmt: skip
        self.data = (head + b"\r\n" + body, head + b"Connection: close\r\n\r\n" + body)

    def render(self, close: bool, head_only: bool) -> bytes:
        """The whole response (the head only for HEAD requests)."""
        data = self.data[close]
        return data[: data.index(b"\r\n\r\n") + 4] if head_only else data

    def __repr__(self) -> str:
        return f"<Fixed {self.status} [{len(self.data[0])} bytes]>"


_TEXT: Final = b"Content-Type: text/plain; charset=utf-8\r\n"
#: ``OPTIONS *``, or ``OPTIONS`` with ``Max-Forwards: 0``: the proxy is the recipient.
OPTIONS_ANSWER: Final = Fixed(200, ALLOW, b"")
#: TRACE is never forwarded: the upstream's echo would show the client's cookies and
#: the proxy's own headers (nginx answers 405 too).
TRACE_REFUSED: Final = Fixed(
    405, _TEXT + ALLOW, b"405 Method Not Allowed: aiolb does not forward TRACE\n"
)
#: An absolute-form target for a host no route names (RFC 9112 3.2.2).
NOT_FORWARD_PROXY: Final = Fixed(
    400, _TEXT,
    b"400 Bad Request: aiolb is not a forward proxy for this host (no route names it)\n",
)  # fmt: skip
#: An absolute-form target whose authority is no host[:port] (userinfo, stray bytes).
BAD_AUTHORITY: Final = Fixed(
    400, _TEXT, b"400 Bad Request: the request target's authority is malformed\n"
)
