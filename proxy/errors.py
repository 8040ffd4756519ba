"""The one module of errors.

Every failure on the upstream side of a request is translated at the boundary
(connect, upstream protocol, timers) into one of these. Each knows the status the
client sees when nothing else can be done and which ``retry_on`` condition lets the
request be tried again elsewhere (httpcore ``_exceptions.py``, h11's ``error_status_hint``).

At start-up, a socket that cannot be bound becomes a ``BindError`` naming the config
key that chose the address, so that the operator is told which key to change.
(Config problems are ``proxy.config.ConfigError``, a refused admin exposure
``proxy.admin.AdminError``: both are found before anything is bound.)
"""

from __future__ import annotations

import os


class ProxyError(Exception):
    """Base class: ``status`` is what the client gets, ``condition`` which ``retry_on``
    entry allows a retry.

    ``sent`` tells whether any byte of the request reached the upstream: a request that
    never left the proxy may be retried whatever its method.
    """

    status = 502
    sent = True
    #: the ``retries.retry_on`` condition this failure is ("": never retried)
    condition = ""
    #: a body that says what failed (``proxy.http.responses.CAUSED``; "": the status's)
    cause = ""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamConnectError(ProxyError):
    """Connection refused, unreachable or connect timeout: nothing was sent."""

    sent = False
    condition = "connect_failure"
    cause = "connect"


class UpstreamResetError(ProxyError):
    """The upstream closed or reset the connection before a complete response."""

    condition = "reset_before_response"


class UpstreamProtocolError(ProxyError):
    """The upstream sent something that is not valid HTTP/1.1 (a broken upstream,
    retried like a reset: Envoy resets the stream on a codec error)."""

    condition = "reset_before_response"


class UpstreamRefusedError(ProxyError):
    """An HTTP/2 upstream refused a stream unprocessed (``REFUSED_STREAM``, or above the
    last stream id of its GOAWAY): nothing reached the application, so any method may
    be retried (RFC 9113 section 8.7)."""

    sent = False
    condition = "reset_before_response"


class FilterError(ProxyError):
    """A route filter's hook raised, returned what it may not, or did not finish in
    time: 500 for that request, never retried."""

    status = 500
    sent = False


class UpstreamTimeoutError(ProxyError):
    """No response header within ``timeouts.response_header`` (or ``per_try_timeout``)."""

    status = 504
    condition = "timeout"


class NoUpstreamError(ProxyError):
    """Every upstream of the pool is unavailable (down, drained or ejected)."""

    status = 503
    sent = False


class CircuitOpenError(ProxyError):
    """The upstream has ``max_connections`` open and the pool's wait queue is full, or
    the wait outlasted ``queue_timeout``: refused at once, nothing sent."""

    status = 503
    sent = False
    cause = "limit"


class BindError(OSError):
    """An address of the config cannot be bound (in use, not local, not permitted).

    ``loc`` is the key that set it (``("listeners", 0, "bind")``, ``("admin", "bind")``),
    ``address`` what it says; ``str()`` reads ``listeners[0].bind 127.0.0.1:8080:
    address already in use``.
    """

    def __init__(self, loc: tuple[str | int, ...], address: str, error: OSError) -> None:
        self.loc = loc
        self.address = address
        reason = os.strerror(error.errno) if error.errno else str(error)
        self.reason = (reason or type(error).__name__).lower()
        super().__init__(error.errno, f"{_dotted(loc)} {address}: {self.reason}")

    def __str__(self) -> str:
        return str(self.strerror)


def _dotted(loc: tuple[str | int, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)[1:]
