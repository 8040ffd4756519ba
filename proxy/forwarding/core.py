"""What every part of an exchange shares: its slots, and how an exchange ends.

``Exchange`` (``proxy.forwarding.exchange``) is built in layers, one module each, so
that no module holds the whole cycle: ``ExchangeCore`` here (the state, the proxy's own
answers, the failure path, finishing and counting), ``Attempts`` (``attempt.py``:
sending to an upstream, the request body, retries, timeouts), ``Responses``
(``response.py``: the upstream's response to the client) and ``Exchange`` itself (the
phases of a request, in order). The states it moves through are ``proxy.forwarding.
states``; the client side it talks to is a ``Downstream`` (``downstream.py``).
"""

from __future__ import annotations

import logging
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, TypeVar

from proxy.cache.flow import Later
from proxy.clock import NEVER
from proxy.errors import FilterError
from proxy.filters.base import Response
from proxy.forwarding.states import (
    ACQUIRING,
    ANSWERED,
    BODY,
    DONE,
    DUE,
    HEAD,
    IDLE,
    NONE,
    RECEIVING,
    RELEASED,
    Attempt,
    Req,
    Resp,
)

if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Coroutine

    from proxy.cache.flow import Answer, CacheState
    from proxy.errors import ProxyError
    from proxy.filters.base import LocalResponse, Request
    from proxy.filters.chain import Paused
    from proxy.forwarding.downstream import Downstream
    from proxy.forwarding.traffic import Mirror
    from proxy.http.headers import RequestHeaders
    from proxy.http.responses import Fixed
    from proxy.tracing import Relay
    from proxy.upstream.acquire import Wait
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import Pool, Upstream
    from proxy.upstream.session import UpstreamSession

log = logging.getLogger("aiolb")
T = TypeVar("T")

#: The ``Content-Length`` of a request without a body.
_NO_BODY: Final = (None, b"0")


class ExchangeCore:
    __slots__ = (
        "answer",
        "attempt",
        "attempts",
        "body_size",
        "bytes_out",
        "cache_state",
        "cause",
        "client",
        "conn",
        "connect_seconds",  # unset unless this request opened a connection
        "deadline",
        "deferred",
        "done",
        "due",
        "filtered_target",  # unset unless a cached route's request filters ran
        "filters",
        "found",
        "grpc_status",
        "head",
        "head_request",
        "header_at",  # unset unless the access log asks for upstream_header_time
        "headers",
        "held",
        "held_complete",
        "host",
        "http_minor",
        "keep_alive",
        "method",
        "mirror",
        "opening",
        "parse_only",
        "pending",
        "pending_size",
        "pool",
        "queued",
        "replay",
        "replay_size",
        "req",
        "request_id",
        "resp",
        "resp_eof",
        "retried",
        "sent_at",
        "sent_mark",
        "span",
        "started",
        "status",
        "target",
        "task",
        "ticket",
        "trace_id",
        "tried",
        "tried_at",
        "upstream",
    )

    def __init__(
        self,
        client: Downstream,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        found: RequestHeaders,
        http_minor: int,
        keep_alive: bool,
    ) -> None:
        self.client = client
        self.method = method
        self.target = target
        self.headers = headers
        self.found = found
        self.host = found.host
        self.http_minor = http_minor
        self.keep_alive = keep_alive and not found.close
        #: HEAD, or an Upgrade: the response goes through the parser, never the fast path
        self.parse_only = self.head_request = method == b"HEAD"
        self.request_id = found.request_id or next(client.request_ids)
        self.head = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.body_size = 0
        self.req: Req = BODY
        self.attempt: Attempt = IDLE
        self.resp: Resp = NONE
        self.done = False
        #: the status and cause of a local answer due when the request is read whole
        self.due = 0
        self.cause = ""
        self.pool: Pool | None = None
        #: the mirror this request is copied to when dispatched (None: not copied)
        self.mirror: Mirror | None = None
        #: the route's filters' view of this request while its chain has more to do
        #: (response hooks, a local answer); None on routes without filters
        self.filters: Request | None = None
        #: an async response filter runs: the response waits here (body pieces, and
        #: whether it completed: ``Exchange.on_response_complete``'s arguments)
        self.held: list[bytes] | None = None
        self.held_complete: tuple[UpstreamConnection, bool] | None = None
        #: what the route's cache does for this request (None on routes without one)
        self.cache_state: CacheState | None = None
        #: the trace id sent upstream (the head format's last ``%s``: b"" without
        #: ``tracing``), and the request's part in its trace when it is more than that
        #: (a sampled one's spans, an unsampled child's parent ids: ``proxy.tracing``)
        self.trace_id = b""
        self.span: Relay | None = None
        #: a response made for this request in place of the upstream's (a filter's
        #: ``LocalResponse``, a cache hit or stand-in): what the downstream writes;
        #: None: an error page
        self.answer: LocalResponse | Answer | Fixed | Later | None = None
        self.upstream: Upstream | None = None
        self.conn: UpstreamSession | None = None
        #: the claim on a session of ``upstream`` (``proxy.upstream.acquire``) while it
        #: waits in the queue or its connection opens, or on an upstream of a pool that
        #: scales from zero (``proxy.upstream.hold``); ``abort`` cancels it
        self.ticket: Wait | None = None
        #: what runs for this exchange outside the callbacks: a retry's backoff timer,
        #: a filter hook's future waited on (``Paused``), an async filter phase, a cache
        #: lookup or wait
        self.task: asyncio.Task[None] | asyncio.TimerHandle | Paused | None = None
        #: body chunks sent, to replay on a retry or if a reused connection proves stale;
        #: None once they outgrow the retry buffer (or nothing could use them)
        self.replay: tuple[bytes, ...] | None = None
        self.replay_size = 0
        self.tried: tuple[Upstream, ...] = ()  # upstreams that failed this request
        #: the upstream picked and the target, while a small body is read whole before
        #: a connection is taken (``limits.body_buffer_size``)
        self.deferred: tuple[Upstream, bytes] | None = None
        #: the upstream's write buffer when the client was paused for it, and when
        self.sent_mark = 0
        self.sent_at = 0.0
        self.retried = False  # a stale pooled connection was replaced (once at most)
        self.resp_eof = False  # the upstream's body ends when it closes
        self.deadline = NEVER
        self.status = 0  # what the client was answered; 0 until then
        #: a gRPC call's ``grpc-status`` as the client got it (-1: none, or not gRPC)
        self.grpc_status = -1
        self.attempts = 0  # upstreams tried (1 + retries)
        self.bytes_out = 0
        # perf_counter, not loop.time(): uvloop's loop clock has millisecond resolution
        self.started: float = perf_counter()
        #: when the current attempt started (a retry's, once there is one): the start of
        #: the latency a learning balancer is given (``Pool.observe``)
        self.tried_at = self.started

    # -- read by balancers (RequestView), tracing and the access log --------------------

    @property
    def client_ip(self) -> str:
        return self.client.client_ip

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    @property
    def resp_started(self) -> bool:
        """The upstream's response head (or the cache's in its place) was committed."""
        return self.resp >= HEAD

    # -- the proxy's own answers ---------------------------------------------------------

    def local(self, status: int, close: bool = False, cause: str = "") -> None:
        """Answer with the proxy's own response (``cause``: ``ProxyError.cause``).

        The connection is kept only when the request is (or will be, having no body)
        read completely; a request with a body still arriving is answered and closed.
        """
        self.pending = []
        self.pending_size = 0
        if close:
            self._write_local(status, True, cause)
        elif self.req is DONE:
            self._write_local(status, False, cause)
        elif self.found.chunked or self.found.content_length not in _NO_BODY:
            self._write_local(status, True, cause)
        else:
            self.resp = DUE  # written when the (empty) request completes
            self.due = status
            self.cause = cause

    def _write_local(self, status: int, close: bool, cause: str = "") -> None:
        self.resp = ANSWERED
        self.status = status
        client = self.client
        close = close or not self.keep_alive or client.draining
        answer = self.answer
        if answer.__class__ is Later:  # a range miss that failed before its answer: an error page
            answer = None
        client.send_local(self, status, answer, close, cause)  # type: ignore[arg-type]
        self._finish(close)

    def _bodiless(self) -> bool:
        return not self.found.chunked and self.found.content_length in _NO_BODY

    def fail(self, error: ProxyError) -> None:
        """The one failure path: answer ``error.status`` for ``error`` and log it, unless
        the cache answers with a stored response instead (``use_stale``)."""
        cache = self.cache_state
        stale = cache.on_failure(self, error) if cache is not None else None  # type: ignore[arg-type]
        self._release_upstream()
        if stale is not None:
            self.serve(stale)
            return
        log.warning(
            "%d %s %s: %s%s",
            error.status,
            self.method.decode(),
            self.target[:200].decode(errors="replace"),
            f"upstream {self.upstream.address}: " if self.upstream else "",
            error.reason,
        )
        self.local(error.status, cause=error.cause)

    def serve(self, answer: Answer) -> None:
        """Answer with a response made in place of the upstream's (a cache hit, a stale
        entry), through the route's response filters when it has any."""
        filters = self.filters
        if filters is None:
            self._local_answer(answer)
        else:
            self._served(filters.chain.response(filters, answer.head), answer)

    def _served(self, outcome: Any, answer: Answer) -> None:
        """The response phase's outcome over ``answer``: send it as the hooks left it,
        fail, or wait for the async hooks and take their outcome."""
        if isinstance(outcome, Response):
            self._local_answer(answer.with_head(outcome.head(), outcome.status))
        elif isinstance(outcome, FilterError):
            self.fail(outcome)
        else:
            self.later(outcome, lambda given: self._served(given, answer))

    def _local_answer(self, answer: Answer) -> None:
        self.answer = answer
        self.bytes_out = len(answer.body)
        self.local(answer.status, close=answer.close)

    # -- endings ------------------------------------------------------------------------

    def _release_upstream(self) -> None:
        """The attempt is over: give the upstream's request count back (once: only
        the states between ``ACQUIRING`` and ``RECEIVING`` hold it)."""
        upstream = self.upstream
        if upstream is not None and ACQUIRING <= self.attempt <= RECEIVING:
            self.attempt = RELEASED
            upstream.end_request()

    def _finish(self, close: bool) -> None:
        if self.done:
            return
        self.done = True
        self.deadline = NEVER
        if self.client.record:
            self._record()
        if self.span is not None:
            self.span.end(self)
        # the filters' view points back here: dropped, so the exchange is freed by its
        # reference count, not by the cyclic GC
        self.filters = None
        self.client.exchange_done(self, self.keep_alive and not close)

    def _record(self) -> None:
        """Count the finished request (``Stats``; a gRPC call's status on its pool's)
        and write its access log line."""
        client = self.client
        seconds = perf_counter() - self.started
        upstream = self.upstream
        if upstream is not None and self.resp >= HEAD:  # the upstream answered
            stats = upstream.stats
        elif self.pool is not None:  # the proxy answered for this pool
            stats = self.pool.stats
        else:
            stats = client.listener.stats
        stats.record(client.listener.name, self.method, self.status, seconds)
        if self.grpc_status >= 0:  # a gRPC call with a status: on its pool, if routed
            pool = self.pool
            if pool is not None:
                pool.stats.record_grpc(self.grpc_status)
        if client.access_log is not None:
            self.log_line(0, 0)

    def log_line(self, bytes_in: int, bytes_out: int) -> None:
        """The access log line of this request (``bytes_in``/``bytes_out``: what an
        Upgrade tunnel it became carried besides; then the time runs to its close)."""
        client = self.client
        access_log = client.access_log
        assert access_log is not None
        access_log.record(
            time.time(), client.client_ip, self.method, self.target, self.status,
            self.body_size + bytes_in, self.bytes_out + bytes_out, perf_counter() - self.started,
            self.attempts, self.request_id, self.host, self.headers, client.listener.name,
            self.pool,
            self.upstream,  # the one tried, also when the proxy answered (a 502, 504)
            self,
        )  # fmt: skip

    def log_tunnel(self, bytes_in: int, bytes_out: int) -> None:
        """The Upgrade tunnel this request became closed: its access log line, with
        the bytes each way and the time from the request to the close."""
        if self.client.access_log is not None:
            self.log_line(bytes_in, bytes_out)

    def abort(self) -> None:
        """The client went away or broke: drop everything (idempotent)."""
        if self.done:
            return
        self.done = True
        self.deadline = NEVER
        task = self.task
        if task is not None:
            self.task = None
            task.cancel()
        ticket = self.ticket
        if ticket is not None:  # queued or connecting: leave, giving the slot back
            self.ticket = None
            ticket.cancel()
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        if self.cache_state is not None:
            self.cache_state.abandon()
        self._release_upstream()
        if self.status and self.client.record:  # answered, then cut short: still counted
            self._record()
        if self.span is not None:
            self.span.end(self)
        self.filters = None  # the filters' view points back here (see ``_finish``)

    def later(self, pending: Coroutine[Any, Any, T], then: Callable[[T], None]) -> None:
        """Finish a phase that went async (a filter hook, a cache lookup or wait) in the
        exchange's task, then ``then(outcome)`` unless the exchange is over by then."""
        self.task = self.client.loop.create_task(self._await(pending, then))

    async def _await(self, pending: Coroutine[Any, Any, T], then: Callable[[T], None]) -> None:
        outcome = await pending
        self.task = None
        if not self.done:
            then(outcome)

    def __repr__(self) -> str:
        state = "done" if self.done else f"{self.attempt.name}, {self.resp.name}".lower()
        up = self.upstream.address if self.upstream else "-"
        target = self.target[:60]
        return f"<{type(self).__name__} {self.method.decode()} {target!r} -> {up} [{state}]>"
