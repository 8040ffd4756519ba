"""A client connection's own answers and deadlines: refusals (400, 408, 413, 414,
431, 500), the per-tick timeout check, and the client that reads nothing.

Everything the client can get wrong ends here with a short response and a closed
connection, never a traceback. An error found while an earlier pipelined response is
still due is answered after it, in order (a ``_Rejection`` queued behind it).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Final

from proxy.clock import NEVER
from proxy.forwarding.downstream import PIPELINE, UPSTREAM_FULL
from proxy.http.responses import error_response
from proxy.server.base import IDLE, LINGER, ConnectionBase, _Closed, _Reject, read_nothing

if TYPE_CHECKING:
    from proxy.forwarding.core import ExchangeCore as Exchange

log = logging.getLogger("aiolb")

#: The part of a refused request's target an access log line keeps (a 414's is long).
MAX_LOGGED_TARGET: Final = 2048


class _Rejection:
    """A queued error response, answered after the responses due before it."""

    __slots__ = ("client", "done", "status")

    def __init__(self, client: Refusals, status: int) -> None:
        self.client = client
        self.status = status
        self.done = False

    def start(self) -> None:
        self.done = True
        self.client.answer_and_close(self.status)

    def abort(self) -> None:
        self.done = True


class Refusals(ConnectionBase):
    __slots__ = ()

    def reject(self, status: int) -> None:
        """Answer ``status`` and close, after any response still due before it."""
        self.broken = True
        self.deadline = NEVER
        current, parsing = self.exchange, self.parsing
        self.parsing = None
        if current is not None and current is not parsing and not current.done:
            if parsing is not None:
                if parsing in self.queue:
                    self.queue.remove(parsing)
                parsing.abort()
            self.queue.append(_Rejection(self, status))
            self.pause(PIPELINE)
            return
        if current is not None and current.__class__ is not _Rejection and current.resp_started:  # type: ignore[union-attr]
            self.close()  # mid-response: the only honest signal left is closing
            return
        self.answer_and_close(status)

    def answer_and_close(self, status: int) -> None:
        ex = self.exchange
        if ex is not None:
            if ex.__class__ is _Rejection or ex.done:
                ex = None  # (an exchange already answered was logged then)
            self.exchange.abort()  # type: ignore[union-attr]
        self.exchange = None
        if not self.closed:
            self.transport.write(error_response(status, True, self._is_head()))
            if self.record:
                self.listener.stats.record(self.listener.name, self._method(), status, 0.0)
                if self.access_log is not None:
                    self._log_refusal(status, ex, self._method(), self.url, self.headers)  # type: ignore[arg-type]
        self.close()

    def check_timeouts(self, now: float) -> None:
        """Called on every clock tick by the listener's sweep."""
        if self.send_deadline <= now and self._client_stalled(now):
            return
        if self.paused & UPSTREAM_FULL:  # the upstream takes no body: its own deadline
            ex = self.exchange
            if ex is not None and ex.__class__ is not _Rejection and ex.upstream_stalled(now):  # type: ignore[union-attr]
                return  # 504, or closed mid-response
        if self.deadline <= now:
            if self.tunnel is not None:
                self.tunnel.check_idle(now)
                return
            if self.phase == LINGER:  # the lingering close is over
                self.close()
            elif self.paused and self.phase != IDLE:  # we stopped reading, not the client
                self.deadline = now + self.timeout_body
            elif self.phase == IDLE or (self.draining and self.exchange is None):
                self.close()
            else:
                log.info("408 for %s: request not received in time", self.client_ip)
                self.reject(408)
        ex = self.exchange
        if ex is not None and ex.__class__ is not _Rejection and ex.deadline <= now:  # type: ignore[union-attr]
            ex.on_timeout()  # type: ignore[union-attr]

    def _client_stalled(self, now: float) -> bool:
        """The client has read nothing of a full write buffer for ``timeouts.send``
        (nginx's ``send_timeout``): close, which also frees the upstream. A client that
        reads, however slowly, gets another period."""
        if self.closed or not read_nothing(self, now):
            return False
        log.info(
            "closing the connection of %s: it read nothing for %gs", self.client_ip,
            self.timeout_send,
        )  # fmt: skip
        self.broken = self.closed = True
        self.deadline = self.send_deadline = NEVER
        self.transport.abort()  # close() would wait for the buffer the client never reads
        return True

    def _callback_failed(self, exc: BaseException | None) -> None:
        if isinstance(exc, _Closed):
            return
        if isinstance(exc, _Reject):
            log.info("%d from %s", exc.status, self.client_ip)
            self.reject(exc.status)
        else:
            log.error("bug while handling a request from %s", self.client_ip, exc_info=exc)
            self.reject(500)

    def _log_refusal(self, status: int, ex: Exchange | None, method: bytes, url: bytes,
                     headers: list[tuple[bytes, bytes]]) -> None:  # fmt: skip
        """The access log line of a request this connection refused itself (400, 408,
        413, 414, 431): what of it was parsed (``ex``: its exchange, if it had one)."""
        host = None
        if ex is not None:
            method, url, headers, host = ex.method, ex.target, ex.headers, ex.host
        assert self.access_log is not None
        self.access_log.record(
            time.time(), self.client_ip, b"-" if method == b"OTHER" else method,
            url[:MAX_LOGGED_TARGET] or b"-", status, 0, 0, 0.0, 0,
            b"" if ex is None else ex.request_id, host, headers, self.listener.name,
            None if ex is None else ex.pool, None, ex,
        )  # fmt: skip
