"""The one module of errors.

Every failure on the upstream side of a request is translated at the boundary
(connect, upstream protocol, timers) into one of these. Each knows the status the
client sees when nothing else can be done and which ``retry_on`` condition lets the
request be tried again elsewhere (httpcore ``_exceptions.py``, h11's ``error_status_hint``).
"""

from __future__ import annotations


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

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UpstreamConnectError(ProxyError):
    """Connection refused, unreachable or connect timeout: nothing was sent."""

    sent = False
    condition = "connect_failure"


class UpstreamResetError(ProxyError):
    """The upstream closed or reset the connection before a complete response."""

    condition = "reset_before_response"


class UpstreamProtocolError(ProxyError):
    """The upstream sent something that is not valid HTTP/1.1 (a broken upstream,
    retried like a reset: Envoy resets the stream on a codec error)."""

    condition = "reset_before_response"


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
