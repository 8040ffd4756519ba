"""The one module of errors.

Every failure on the upstream side of a request is translated at the boundary
(connect, upstream protocol, timers) into one of these. Each knows the status the
client sees when nothing else can be done and whether the request may be tried again
elsewhere (httpcore ``_exceptions.py``, h11's ``error_status_hint``).
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base class: ``status`` is what the client gets, ``retryable`` whether a retry is safe.

    ``sent`` tells whether any byte of the request reached the upstream: a request that
    never left the proxy may be retried whatever its method.
    """

    status = 502
    retryable = False
    sent = True

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamConnectError(ProxyError):
    """Connection refused, unreachable or connect timeout: nothing was sent."""

    retryable = True
    sent = False


class UpstreamResetError(ProxyError):
    """The upstream closed or reset the connection before a complete response."""

    retryable = True


class UpstreamProtocolError(ProxyError):
    """The upstream sent something that is not valid HTTP/1.1."""


class UpstreamTimeoutError(ProxyError):
    """No response header within ``timeouts.response_header``."""

    status = 504


class NoUpstreamError(ProxyError):
    """Every upstream of the pool is unavailable (down, drained or ejected)."""

    status = 503
    sent = False
