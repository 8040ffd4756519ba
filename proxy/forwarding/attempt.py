"""Sending a request to an upstream: connections, the request body, retries, timeouts.

Theory of operation
-------------------
``dispatch`` sends the request to the upstream its phases picked: the head is built
once (``proxy.http.headers.request_head``), and an idle pooled connection takes it at
once (the fast start). Otherwise the attempt acquires one (``_use``: idle, a new one in
the one connect task a request may create, or a wait when ``max_connections`` are
open). A body that may fit ``limits.body_buffer_size`` is read whole first
(``_defer``), so a slow sender holds no upstream connection.

Body chunks (de-chunked by the client's parser) are framed again and gathered in
``pending``; after each client read ``flush_upstream`` writes them in one call, or,
while no connection is attached, keeps them and pauses the client above the
high-water mark. A copy (``replay``) is kept while it fits the retry buffer.

A failure before the response head reached the client is ``_attempt_failed``: passive
health counts it, then ``_retryable`` decides between another upstream (after a
backoff, ``_retry``) and the failure path (``fail``). A pooled connection that closes
before any response byte is retried once on a fresh connection to the same upstream.
"""

from __future__ import annotations

import logging
import random
from time import perf_counter
from typing import TYPE_CHECKING, Final

from proxy.clock import NEVER
from proxy.errors import (
    CircuitOpenError,
    NoUpstreamError,
    ProxyError,
    UpstreamTimeoutError,
)
from proxy.filters.chain import Paused
from proxy.forwarding.core import ExchangeCore
from proxy.forwarding.downstream import BODY_WAIT, UPSTREAM_FULL
from proxy.forwarding.states import (
    ACQUIRING,
    BACKOFF,
    DEFERRED,
    DONE,
    HEAD,
    SENDING,
    WAITING,
)
from proxy.http.headers import request_head
from proxy.upstream.acquire import acquire
from proxy.upstream.retry import IDEMPOTENT
from proxy.upstream.session import CLIENT_SLOW

if TYPE_CHECKING:
    from proxy.proxy_protocol import Addresses
    from proxy.upstream.pool import Pool, Upstream
    from proxy.upstream.session import UpstreamSession

log = logging.getLogger("aiolb")

#: Body bytes held while no upstream connection is attached, before pausing the client.
PENDING_HIGH_WATER: Final = 64 * 1024
_LAST_CHUNK: Final = b"0\r\n\r\n"


class Attempts(ExchangeCore):
    __slots__ = ()

    def dispatch(self, upstream: Upstream | None, target: bytes) -> None:
        """Send the request for ``target`` to the picked ``upstream`` (None: 503, or held
        while the pool scales from zero)."""
        if upstream is None:
            self._none_available(target)
            return
        client = self.client
        found = self.found
        body_to_come = found.content_length is not None or found.chunked
        if body_to_come and self.req is not DONE and self._defer(upstream, target):
            return  # read the body first
        if self.mirror is not None:
            self._copy(target, body_to_come)
        pool = self.pool
        assert pool is not None
        self.upstream = upstream
        self.attempts = 1
        if found.expect_continue and self.req is not DONE:
            self._continue()
        if self.host is None:
            found.parts += (b"Host: ", upstream.address.encode(), b"\r\n")
        self.head = head = request_head(
            self.method,
            target,
            found,
            client.client_ip_bytes,
            self.host,
            self.request_id,
            client.head_template,
            self.trace_id,
        )
        if self.span is not None:  # its trace's line, rewritten (``proxy.tracing.span``)
            self.head = head = self.span.attempt(upstream, head)
        if pool.fast_path and not self.pending:  # the fast path: nothing but the head
            conn = upstream.take_idle()
            if conn is not None:  # ``_use`` and ``_send``, for a pooled connection
                upstream.begin_request()
                self.replay = ()  # a pooled connection may prove stale: nothing to replay
                self.conn = conn
                conn.send_head(self, head, ())  # type: ignore[arg-type]  # an Exchange
                if self.req is DONE:  # read whole (a pipelined one while it waited)
                    self._await_response()
                else:
                    self.attempt = SENDING
                if client.write_paused:
                    conn.pause_reading(CLIENT_SLOW)
                return
        self._use(upstream)

    def _none_available(self, target: bytes) -> None:
        """No upstream: 503, unless the pool scales from zero (``proxy.upstream.hold``):
        then the request waits for one (503 beyond ``max_pending`` or after ``hold``)."""
        scale = self.pool.scale if self.pool is not None else None
        if scale is None:
            self.fail(NoUpstreamError("no upstream available"))
            return
        self.ticket = scale.hold(self, target, self.client.clock.now)
        if self.ticket is None:
            scale.count_action("hold", "overflow")
            reason = f"no upstream available and {scale.spec.max_pending} requests held already"
            self.fail(NoUpstreamError(reason))

    def unheld(self, target: bytes | None) -> None:
        """The scale-from-zero hold ended: an upstream is available (pick and send), or
        the hold ran out (``target`` None: 503)."""
        self.ticket = None
        if self.done:
            return
        self.deadline = NEVER
        pool = self.pool
        if target is None or pool is None:
            hold = pool.scale.spec.hold if pool is not None and pool.scale else 0
            self.fail(NoUpstreamError(f"no upstream became ready within {hold:g}s"))
            return
        upstream = pool.pick(self)
        if upstream is None:  # gone again meanwhile: 503 rather than a second hold
            self.fail(NoUpstreamError("no upstream available"))
            return
        self.dispatch(upstream, target)

    def _copy(self, target: bytes, body_to_come: bool) -> None:
        """A mirrored request: the copy (``proxy.forwarding.traffic``), with the body
        when it was read whole; once, whatever retries follow."""
        mirror = self.mirror
        assert mirror is not None
        self.mirror = None
        try:
            if not body_to_come:
                mirror.copy(self, target, (), 0)  # type: ignore[arg-type]  # an Exchange
            elif self.req is DONE:
                mirror.copy(self, target, tuple(self.pending), self.pending_size)  # type: ignore[arg-type]
            else:
                mirror.skipped()
        except Exception as exc:  # a bug in the copy must not fail the real request
            log.error("bug in a mirror copy of %r", target[:200], exc_info=exc)

    def _defer(self, upstream: Upstream, target: bytes) -> bool:
        """A request whose body is still arriving: if it may fit the body buffer, read
        it first and take an upstream connection only then (``_undefer``), so a client
        that sends its body slowly holds a client connection, not an upstream one
        (nginx's ``proxy_request_buffering``). False: stream it now."""
        client = self.client
        limit = client.body_buffer
        found = self.found
        if (
            self.deferred is not None
            or self.pending_size > limit
            or (not found.chunked and int(found.content_length or 0) > limit)
        ):
            return False
        self.deferred = (upstream, target)
        self.attempt = DEFERRED
        if client.paused & BODY_WAIT:  # gathered while a filter ran: now it is buffered
            client.resume(BODY_WAIT)
        if found.expect_continue:
            self._continue()
        return True

    def _continue(self) -> None:
        """``Expect: 100-continue``: ask for the body, once."""
        self.found.expect_continue = False
        self.client.send_continue(self)

    def _undefer(self) -> None:
        """The buffered body is complete, or outgrew the buffer: send now (to the upstream
        picked at the head, unless it left the rotation meanwhile)."""
        deferred = self.deferred
        assert deferred is not None
        self.deferred = None
        picked, target = deferred
        upstream: Upstream | None = picked
        if not picked.available:
            upstream = self.pool.pick(self)  # type: ignore[union-attr]
        self.dispatch(upstream, target)  # not deferred again: complete, or over the buffer

    # -- getting a connection -------------------------------------------------------------

    def _use(self, upstream: Upstream) -> None:
        """Start the attempt on ``upstream``: ``acquire`` answers (maybe at once) with
        ``granted`` (an idle connection, or one it opened), ``queued``, ``refused`` or
        ``failed`` (``proxy.upstream.acquire``: the bookkeeping lives there)."""
        self.attempt = ACQUIRING
        upstream.begin_request()
        client = self.client
        self.ticket = acquire(upstream, self, client.loop, client.clock.now)

    # -- Waiter (``proxy.upstream.acquire``): the answers to ``_use`` ---------------------

    def granted(self, session: UpstreamSession, connect_seconds: float | None) -> bool:
        """A session of the upstream is this request's: send on it. False when the
        request is over already (the pool takes the session back)."""
        self.ticket = None
        if self.done:
            return False
        if connect_seconds is not None:
            self.connect_seconds = connect_seconds
        self.deadline = NEVER  # a queue deadline ends here
        self._send(session)
        return True

    def queued(self, deadline: float) -> None:
        """``max_connections`` are open: wait, until ``deadline`` (``on_timeout``)."""
        self.deadline = deadline

    def refused(self, error: CircuitOpenError) -> None:
        """The circuit breaker's 503 (no attempt failed: the upstream is not blamed)."""
        self.ticket = None
        self.fail(error)

    def failed(self, error: ProxyError) -> None:
        """Opening a connection failed: an attempt failure (retried or answered)."""
        self.ticket = None
        if not self.done:
            self._attempt_failed(error)

    def proxy_addresses(self) -> Addresses | None:
        """The client's addresses, for a pool's ``send_proxy_protocol`` header."""
        return self.client.addresses()

    def _send(self, conn: UpstreamSession) -> None:
        pending = self.pending
        pool = self.pool
        assert pool is not None
        # keep what to replay when the connection may prove stale or a retry may follow
        if self.pending_size <= pool.retry.buffer and (
            conn.uses or self.attempts < pool.retry.attempts
        ):
            self.replay = tuple(pending) if pending else ()
            self.replay_size = self.pending_size
        else:
            self.replay = None
        self.conn = conn
        if pending:
            self.pending = []
            self.pending_size = 0
        self.attempt = SENDING
        conn.send_head(self, self.head, pending)  # type: ignore[arg-type]
        client = self.client
        if client.paused:  # a new connection: its own write buffer decides from here
            client.resume(BODY_WAIT | UPSTREAM_FULL)
        if self.req is DONE:
            self._await_response()
        if client.write_paused:
            conn.pause_reading(CLIENT_SLOW)

    # -- the request body, from the downstream ----------------------------------------

    def on_request_body(self, data: bytes) -> None:
        resp = self.resp
        if resp and resp is not HEAD:  # answered by the proxy: the body is dropped
            return
        size = len(data)
        self.body_size += size
        if self.found.chunked:
            self.pending += (b"%x\r\n" % size, data, b"\r\n")
        else:
            self.pending.append(data)
        self.pending_size += size
        if self.deferred is not None and self.pending_size > self.client.body_buffer:
            self._undefer()

    def on_request_complete(self) -> None:
        self.req = DONE
        resp = self.resp
        if resp and resp is not HEAD:
            if self.done:
                return
            if self.due:  # ``DUE``: the answer can go now
                self._write_local(self.due, False, self.cause)
            else:  # answered already (a redirect): finished now
                self._finish(False)
            return
        if self.found.chunked:
            self.pending.append(_LAST_CHUNK)
        if self.deferred is not None:
            self._undefer()
        elif self.attempt is SENDING:
            self._await_response()

    def _await_response(self) -> None:
        """The whole request is sent: the response header timeout starts now."""
        pool = self.pool
        assert pool is not None
        self.attempt = WAITING
        self.deadline = self.client.clock.now + pool.response_header_timeout

    def flush_upstream(self) -> None:
        """Write the body gathered during one client read (called after each read)."""
        pending = self.pending
        if not pending:
            return
        conn = self.conn
        if conn is None:
            # a body waiting for a connection pauses the client; one being buffered on
            # purpose (``deferred``) is bounded by the buffer instead
            if self.pending_size > PENDING_HIGH_WATER and self.deferred is None:
                self.client.pause(BODY_WAIT)
            return
        replay = self.replay
        if replay is not None:
            self.replay_size += self.pending_size
            if self.replay_size > self.pool.retry.buffer:  # type: ignore[union-attr]
                self.replay = None
            else:
                self.replay = replay + tuple(pending)
        self.pending = []
        self.pending_size = 0
        conn.send_body(pending)

    def upstream_write_paused(self, paused: bool) -> None:
        if paused:
            conn = self.conn
            if conn is not None:
                self.sent_mark = conn.write_buffer_size()
                self.sent_at = self.client.clock.now
            self.client.pause(UPSTREAM_FULL)
        else:
            self.client.resume(UPSTREAM_FULL)

    def upstream_stalled(self, now: float) -> bool:
        """The client is paused because the upstream's write buffer is full (checked on
        every tick). True when the upstream has taken none of the body for the pool's
        ``timeouts.send``: then the request failed (504, or closed mid-response)."""
        conn = self.conn
        if conn is None or self.done:
            return False
        size = conn.write_buffer_size()
        if size < self.sent_mark:
            self.sent_mark, self.sent_at = size, now
            return False
        if now - self.sent_at < self.pool.send_timeout:  # type: ignore[union-attr]
            return False
        self._late("upstream took none of the request body in time")
        return True

    # -- time and failure -----------------------------------------------------------------

    def on_timeout(self) -> None:
        """The response header (504, or a retry), a gap between response reads (close),
        the wait for a connection (503) or for a filter hook's future (500) timed out."""
        self.deadline = NEVER
        task = self.task
        if task.__class__ is Paused:  # a filter phase took too long: the hook failed
            self.task = None
            self.fail(task.expired())
            return
        ticket = self.ticket
        if ticket is not None and ticket.expire():  # waiting for a connection: 503
            return
        self._late("upstream read timeout" if self.resp >= HEAD else "no response header in time")

    def expire(self, reason: str) -> None:
        """The call's own deadline passed (gRPC's ``grpc-timeout``): what is in flight is
        dropped and the call fails with 504 (DEADLINE_EXCEEDED to a gRPC client), never
        retried and not held against the upstream; after the response head, the
        client's stream is reset."""
        if self.done:
            return
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        ticket = self.ticket
        if ticket is not None:
            self.ticket = None
            ticket.cancel()
        task = self.task
        if task is not None:
            self.task = None
            task.cancel()
        if self.resp >= HEAD:
            self.abort()
            self.client.close()
        else:
            self.fail(UpstreamTimeoutError(reason))

    def _late(self, reason: str) -> None:
        """The upstream did not keep time: close its connection; before the response
        head reached the client the attempt failed (504, or a retry), after it the
        client connection is closed (a truncated body is never presented as complete)."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        if self.resp >= HEAD:
            log.warning("%s; closing the client connection", reason)
            self.abort()
            self.client.close()
        else:
            self._attempt_failed(UpstreamTimeoutError(reason))

    def _retry_fresh(self) -> None:
        """A pooled connection was stale: send again on a new connection, once."""
        self.retried = True
        self.pool.retries += 1  # type: ignore[union-attr]
        self._rewind()
        assert self.upstream is not None
        self.attempt = ACQUIRING
        client = self.client
        self.ticket = acquire(self.upstream, self, client.loop, client.clock.now, fresh=True)

    def _rewind(self) -> None:
        """Put the body sent so far back in front of what is still to send (the next
        try sends it again), and stop the attempt's timer."""
        self.pending = [*(self.replay or ()), *self.pending]
        self.pending_size = sum(map(len, self.pending))
        self.replay = None
        self.deadline = NEVER

    def _attempt_failed(self, error: ProxyError) -> None:
        """The attempt failed before any of its response reached the client: count it
        against the upstream (passive health), then retry elsewhere or answer."""
        pool = self.pool
        assert pool is not None
        upstream = self.upstream
        if upstream is not None:
            pool.failure(upstream, error.reason)
        if self.span is not None:
            self.span.failed(error)
        if self._retryable(error.condition in pool.retry.conditions, error.sent):
            log.info(
                "%s %s: upstream %s: %s; retrying elsewhere", self.method.decode(),
                self.target[:200].decode(errors="replace"),
                upstream.address if upstream else "-", error.reason,
            )  # fmt: skip
            self._retry()
            return
        self.fail(error)

    def _retryable(self, enabled: bool, sent: bool) -> bool:
        """May this request be tried again? Only safe ones: nothing reached the upstream,
        or an idempotent method whose body (if any) is still in the retry buffer; and
        only while attempts are left and the pool's retry budget allows."""
        if not enabled or self.done:
            return False
        pool = self.pool
        assert pool is not None
        retry = pool.retry
        if self.attempts >= retry.attempts:
            return False
        if sent and (self.method not in IDEMPOTENT or self.replay is None):
            return False
        return retry.budget.allow(pool.requests, self.client.clock.now)

    def _retry(self) -> None:
        """Give up the current upstream and, after the backoff, try another one."""
        pool = self.pool
        assert pool is not None and self.upstream is not None
        self._release_upstream()
        pool.retries += 1
        self.tried += (self.upstream,)
        self._rewind()
        self.conn = None
        self.attempt = BACKOFF
        delay = pool.retry.backoff(self.attempts)
        self.task = self.client.loop.call_later(delay, self._next_attempt)

    def _next_attempt(self) -> None:
        self.task = None
        if self.done:
            return
        upstream = self._pick_untried()
        if upstream is None:
            self.fail(NoUpstreamError("no upstream available"))
            return
        self.upstream = upstream
        self.attempts += 1
        self.tried_at = perf_counter()
        if self.span is not None:  # a new CLIENT span, named in the resent head
            self.head = self.span.attempt(upstream, self.head)
        self._use(upstream)

    def _pick_untried(self) -> Upstream | None:
        """An available upstream this request has not failed on, preferring the
        balancer's choice, and one with no failure since its last success (when two
        upstreams die together, the second has failed for others already but is not
        ejected yet); the balancer's choice when every one was tried."""
        pool = self.pool
        assert pool is not None
        tried = self.tried
        choice = None
        for _ in range(3):  # random balancers may need another draw
            choice = pool.pick(self)
            if choice is None:
                return None
            if choice not in tried and not choice.failures:
                return choice
        live = [u for u in pool.upstreams if u.available and u not in tried]
        for candidates in (
            [u for u in live if not u.backup and not u.failures],
            [u for u in live if not u.backup],
            [u for u in live if not u.failures],  # a backup, once every primary failed
            live,
        ):
            if candidates:
                return random.choice(candidates)
        return choice

    def _observe(self, pool: Pool, upstream: Upstream) -> None:
        """Give a learning balancer (``Pool.observe``) this attempt's time to the response
        head, at most once per ``OBSERVE_EVERY`` per upstream: under load it learns from
        a sample of the responses (1,000 a second per upstream), below that from all."""
        now = perf_counter()
        if now >= upstream.observed_at:
            upstream.observed_at = now + OBSERVE_EVERY
            pool.observe(upstream, now - self.tried_at, now)  # type: ignore[misc]


#: A learning balancer is given at most one response time per upstream this often (s).
OBSERVE_EVERY: Final = 0.001
