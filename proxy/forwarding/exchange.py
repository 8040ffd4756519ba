"""One request/response cycle: route, select an upstream, send, stream back.

Theory of operation
-------------------
An ``Exchange`` is created by the client connection when a request head has been
parsed. It becomes *current* at once, or waits in the client's pipeline queue; only
the current exchange writes to the client, so pipelined responses stay in order.

``start`` routes the request and picks an upstream. A pooled idle connection is used
at once; otherwise a connect task is the one task created, and only for new
connections. Request body chunks (already de-chunked by the parser) are framed again
and gathered in ``pending``; after each read from the client ``flush_upstream``
writes them in one call (``proxy.tcp.write_pieces``), or, while no connection is
attached yet, keeps them and pauses the client above the high-water mark.

Response events come from the upstream connection: the head is rewritten
(hop-by-hop headers removed, our framing and ``Connection`` header added) and body
chunks are gathered in ``out``, written once per upstream read by ``flush_client``.
Back-pressure is explicit both ways: a full client write buffer pauses upstream
reading, a full upstream write buffer pauses client reading.

Failure before the response head reaches the client becomes a short response from
the proxy (``ProxyError.status``); after that the client connection is closed, so a
truncated body is never presented as complete. A pooled connection that closes
before any response byte is retried once on a fresh connection, if the body sent so
far still fits the replay buffer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from time import perf_counter
from typing import TYPE_CHECKING, Final

from proxy.cache.flow import Answer
from proxy.cache.flow import begin as cache_begin
from proxy.clock import NEVER
from proxy.errors import (
    CircuitOpenError,
    NoUpstreamError,
    ProxyError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
)
from proxy.forwarding.router import normalise_host
from proxy.forwarding.tunnel import Tunnel
from proxy.http.headers import RequestHeaders, ResponseHead, request_head
from proxy.http.responses import (
    BAD_AUTHORITY,
    CONTINUE_100,
    NOT_FORWARD_PROXY,
    OPTIONS_ANSWER,
    TRACE_REFUSED,
    Fixed,
    error_response,
    redirect_response,
)
from proxy.http.target import known_target, normal_target
from proxy.tcp import JOIN_BELOW, write_pieces
from proxy.upstream.acquire import acquire
from proxy.upstream.retry import IDEMPOTENT
from proxy.upstream.session import CLIENT_SLOW, STORE_BEHIND

if TYPE_CHECKING:
    from proxy.cache.flow import CacheState
    from proxy.filters.base import LocalResponse, Request
    from proxy.forwarding.router import Route
    from proxy.server.protocol import ClientConnection
    from proxy.tracing import ServerSpan
    from proxy.upstream.acquire import Ticket
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import Pool, Upstream
    from proxy.upstream.session import UpstreamSession

log = logging.getLogger("aiolb")

#: A learning balancer is given at most one response time per upstream this often (s).
OBSERVE_EVERY: Final = 0.001
#: Body bytes held while no upstream connection is attached, before pausing the client.
PENDING_HIGH_WATER: Final = 64 * 1024

# Response framing towards the client.
NO_BODY: Final = 0
LENGTH: Final = 1
CHUNKED: Final = 2
UNTIL_CLOSE: Final = 3

_LAST_CHUNK: Final = b"0\r\n\r\n"
#: An absolute-form authority we accept: host or [IPv6] and an optional port.
#: Methods ``Exchange.start`` hands to ``_answer_here`` (a set: one lookup per request).
_ANSWERED_HERE: Final = frozenset((b"TRACE", b"OPTIONS"))
_AUTHORITY: Final = re.compile(rb"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


_UPGRADE_HEADER: Final = re.compile(rb"\r\nupgrade[ \t]*:[ \t]*([^\r]*)", re.IGNORECASE)


def _upgrade_token(head: bytes) -> bytes | None:
    """The protocol a ``101`` head switches to (its ``Upgrade`` header), lower case."""
    m = _UPGRADE_HEADER.search(head)
    return m.group(1).strip().lower() if m is not None else None


class Exchange:
    __slots__ = (
        "answer",
        "attempts",
        "body_size",
        "bytes_out",
        "cache_state",
        "client",
        "conn",
        "connect_seconds",  # unset unless this request opened a connection
        "deadline",
        "deferred",
        "discard",
        "done",
        "filters",
        "found",
        "head",
        "head_request",
        "header_at",  # unset unless the access log asks for upstream_header_time
        "headers",
        "host",
        "http_minor",
        "keep_alive",
        "local_cause",
        "local_status",
        "method",
        "mode",
        "out",
        "parse_only",
        "pending",
        "pending_size",
        "pool",
        "released",
        "replay",
        "replay_size",
        "req_done",
        "request_id",
        "resp_done",
        "resp_eof",
        "resp_started",
        "retried",
        "sent_at",
        "sent_mark",
        "span",
        "started",
        "status",
        "target",
        "task",
        "ticket",
        "traceparent",
        "tried",
        "tried_at",
        "upstream",
    )

    def __init__(
        self,
        client: ClientConnection,
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
        self.request_id = found.request_id or client.request_ids.next()
        self.head = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.body_size = 0
        self.req_done = False
        self.discard = False
        self.local_status = 0
        self.local_cause = ""
        self.pool: Pool | None = None
        #: the route's filters' view of this request while its chain has more to do
        #: (response hooks, a local answer); None on routes without filters
        self.filters: Request | None = None
        #: what the route's cache does for this request (None on routes without one)
        self.cache_state: CacheState | None = None
        #: the ``traceparent`` sent upstream, and the spans of a sampled request
        #: (``proxy.tracing``; None without ``tracing``)
        self.traceparent: bytes | None = None
        self.span: ServerSpan | None = None
        #: a response made for this request in place of the upstream's (a filter's
        #: ``LocalResponse``, a cache hit): what ``local`` writes; None: an error page
        self.answer: LocalResponse | Answer | Fixed | None = None
        self.upstream: Upstream | None = None
        self.released = False
        self.conn: UpstreamSession | None = None
        #: the claim on a session of ``upstream`` (``proxy.upstream.acquire``) while it
        #: waits in the queue or its connection opens; ``abort`` cancels it
        self.ticket: Ticket | None = None
        #: the timer of a retry's backoff (or another owner's task)
        self.task: asyncio.Task[None] | asyncio.TimerHandle | None = None
        #: body chunks sent, to replay on a retry or if a reused connection proves stale;
        #: None once they outgrow the retry buffer (or nothing could use them)
        self.replay: tuple[bytes, ...] | None = None
        self.tried: tuple[Upstream, ...] = ()  # upstreams that failed this request
        self.replay_size = 0
        #: the upstream picked and the target, while a small body is read whole before
        #: a connection is taken (``limits.body_buffer_size``)
        self.deferred: tuple[Upstream, bytes] | None = None
        #: the upstream's write buffer when the client was paused for it, and when
        self.sent_mark = 0
        self.sent_at = 0.0
        self.retried = False
        self.out: list[bytes | memoryview] = []  # views: large bodies, not copied
        self.mode = NO_BODY
        self.resp_started = False
        self.resp_done = False
        self.resp_eof = False
        self.done = False
        self.deadline = NEVER
        self.status = 0  # what the client was answered; 0 until then
        self.attempts = 0  # upstreams tried (1 + retries)
        self.bytes_out = 0
        # perf_counter, not loop.time(): uvloop's loop clock has millisecond resolution
        self.started: float = perf_counter()
        #: when the current attempt started (a retry's, once there is one): the start of
        #: the latency a learning balancer is given (``Pool.observe``)
        self.tried_at = self.started

    # -- RequestView, for balancers ---------------------------------------------------

    @property
    def client_ip(self) -> str:
        return self.client.client_ip

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    # -- start: route, pick, connect --------------------------------------------------

    def start(self) -> None:
        """Become the current exchange: route, run the route's filters (if any), pick
        and send, or answer locally."""
        if (self.host is None or self.target[:1] != b"/") and not self._resolve_target():
            return
        if self.method in _ANSWERED_HERE and self._answer_here():
            return
        # what routes, filters, the cache and the upstream see (``proxy.http.target``)
        target = known_target(self.target) or normal_target(self.target)
        if target is None:
            log.info("400 request target refused: %r", self.target[:200])
            self.local(400, close=True)
            return
        self.target = target
        listener = self.client.listener
        route = listener.router.route(self.host, target)
        if route is None:
            self.local(404)
            return
        pool = route.pool
        if pool is None:
            self._redirect(route)
            return
        self.pool = pool
        if self.found.upgrade is not None and not self._allow_upgrade(route):
            return
        pool.requests += 1
        tracer = listener.tracer
        if tracer is not None:  # the traceparent to send; spans if sampled
            found = self.found
            fresh = found.traceparent is None and found.tracestate is None
            line = tracer.next() if fresh else None
            if line is not None:  # a new trace, not sampled: the common case, no call
                found.parts += line
                self.traceparent = line[2]
            else:
                tracer.begin(self, route)
        if route.chain is not None:  # the request phase, then the cache and ``dispatch``
            route.chain.request(self)
            return
        if route.cache is not None:  # a hit answers; anything else goes on to ``pick``
            cache_begin(self, route.cache, self.pick)
            return
        self.dispatch(pool.pick(self), self.target)

    def pick(self) -> None:
        """Pick an upstream of the route's pool and send (after the cache missed)."""
        pool = self.pool
        assert pool is not None
        self.dispatch(pool.pick(self), self.target)

    def dispatch(self, upstream: Upstream | None, target: bytes) -> None:
        """Send the request for ``target`` to the picked ``upstream`` (None: 503)."""
        if upstream is None:
            self._fail(NoUpstreamError("no upstream available"))
            return
        client = self.client
        found = self.found
        body_to_come = (found.content_length is not None or found.chunked) and not self.req_done
        if body_to_come and self._defer(upstream, target):
            return
        pool = self.pool
        assert pool is not None
        self.upstream = upstream
        self.attempts = 1
        if self.span is not None:
            self.span.attempt(upstream)
        if found.expect_continue and not self.req_done:
            self._continue()
        if self.host is None:
            self.found.parts += (b"Host: ", upstream.address.encode(), b"\r\n")
        self.head = head = request_head(
            self.method,
            target,
            self.found,
            client.client_ip_bytes,
            self.host,
            self.request_id,
            client.head_template,
        )
        if pool.fast_path and not self.pending:  # the fast path: nothing but the head
            conn = upstream.take_idle()
            if conn is not None:  # ``_use`` and ``_send``, for a pooled connection
                upstream.begin_request()
                self.replay = ()  # a pooled connection may prove stale: nothing to replay
                self.conn = conn
                conn.send_head(self, head, ())
                if self.req_done:  # a pipelined request, read whole while it waited
                    self._await_response()
                if client.write_paused:
                    conn.pause_reading(CLIENT_SLOW)
                return
        self._use(upstream)

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
        if client.paused & BODY_WAIT:  # gathered while a filter ran: now it is buffered
            client.resume(BODY_WAIT)
        if found.expect_continue:
            self._continue()
        return True

    def _continue(self) -> None:
        """``Expect: 100-continue``: ask for the body, once (HTTP/1.1 clients only)."""
        self.found.expect_continue = False
        if self.http_minor:
            self.client.transport.write(CONTINUE_100)

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

    def _redirect(self, route: Route) -> None:
        """A route that redirects to https: 308 to the same URL there."""
        host = normalise_host(self.host) if self.host else b""
        if not host or _AUTHORITY.fullmatch(host) is None:
            self.local(400)
            return
        port = b"" if route.redirect is True else b":%d" % route.redirect
        location = b"https://" + host + port + self.target
        self.status = 308
        self.discard = True
        close = not self.keep_alive or self.client.draining or not self._bodiless()
        self.client.transport.write(redirect_response(location, close))
        self.local_status = 0
        if self.req_done or close:
            self._finish(close)
        else:
            self.local_status = -1  # finished when the (empty) request completes

    def _bodiless(self) -> bool:
        return not self.found.chunked and self.found.content_length in (None, b"0")

    def _allow_upgrade(self, route: Route) -> bool:
        """An Upgrade request: forward the protocols its route allows (``upgrades``),
        with ``Connection: upgrade``; none allowed -> 403. ``h2c`` never got here."""
        found = self.found
        allowed = route.upgrades
        asked = found.upgrade or []
        tokens = [t for t in asked if t.partition(b"/")[0] in allowed]
        if not tokens:
            found.upgrade = None
            log.info(
                "403 %s %s: upgrade to %s is not allowed on this route", self.method.decode(),
                self.target[:200].decode(errors="replace"),
                b", ".join(asked)[:200].decode(errors="replace"),
            )  # fmt: skip
            self.local(403)
            return False
        found.upgrade = tokens
        value = b", ".join(tokens)
        found.parts += (b"Connection", b": ", b"upgrade", b"\r\n")
        found.parts += (b"Upgrade", b": ", value, b"\r\n")
        self.parse_only = True  # a 101 (or any answer to it) goes through the parser
        return True

    def _use(self, upstream: Upstream) -> None:
        """Start the attempt on ``upstream``: ``acquire`` answers (maybe at once) with
        ``granted`` (an idle connection, or one it opened), ``queued``, ``refused`` or
        ``failed``."""
        upstream.begin_request()
        self.ticket = acquire(upstream, self, self.client.loop, self.client.clock.now)

    # -- Waiter (``proxy.upstream.acquire``): the answers to ``_use`` -------------------

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
        self._fail(error)

    def failed(self, error: ProxyError) -> None:
        """Opening a connection failed: an attempt failure (retried or answered)."""
        self.ticket = None
        if not self.done:
            self._attempt_failed(error)

    def _answer_here(self) -> bool:
        """TRACE: 405, never forwarded. OPTIONS: the proxy answers ``*`` and a
        ``Max-Forwards: 0``, and forwards a larger ``Max-Forwards`` one less (RFC 9110
        7.6.2). True when answered."""
        if self.method == b"TRACE":
            log.info("405 TRACE %r: not forwarded", self.target[:200])
            self.answer = TRACE_REFUSED
            self.local(405)
            return True
        parts = self.found.parts
        if self.target != b"*":
            for i in range(0, len(parts), 4):
                if parts[i].lower() == b"max-forwards":
                    hops = parts[i + 2].strip()
                    if not hops.isdigit() or len(hops) > 9:
                        return False  # not a number (or absurd): passed on as it came
                    left = int(hops)
                    if left:
                        parts[i + 2] = b"%d" % (left - 1)
                        return False
                    break
            else:
                return False
        self.answer = OPTIONS_ANSWER
        self.local(200)
        return True

    def _resolve_target(self) -> bool:
        """Origin-form passes; absolute-form only for hosts a route names; else 400."""
        target = self.target
        if target[:1] == b"/" or (target == b"*" and self.method == b"OPTIONS"):
            if self.host is None and self.http_minor == 1:
                self.local(400, close=True)  # RFC 9112 3.2: HTTP/1.1 requires Host
                return False
            return True
        lower = target[:8].lower()
        start = 7 if lower.startswith(b"http://") else 8 if lower.startswith(b"https://") else 0
        authority, slash, path = target[start:].partition(b"/")
        if not start:
            why = "neither a path nor an http(s) URL"
        elif _AUTHORITY.fullmatch(authority) is None:  # no userinfo, no stray characters
            why, self.answer = "its authority is malformed", BAD_AUTHORITY
        elif not self.client.listener.router.serves_host(authority):
            why, self.answer = "aiolb is not a forward proxy for this host", NOT_FORWARD_PROXY
        else:
            why = ""
        if why:
            log.info("400 absolute-form target refused (%s): %r", why, target[:200])
            self.local(400, close=True)
            return False
        self.target = slash + path if slash else b"/"
        self.host = authority
        self.found.set_host(authority)
        return True

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
        conn.send_head(self, self.head, pending)
        if self.client.paused:  # a new connection: its own write buffer decides from here
            self.client.resume(BODY_WAIT | UPSTREAM_FULL)
        if self.req_done:
            self._await_response()
        if self.client.write_paused:
            conn.pause_reading(CLIENT_SLOW)

    # -- request body, from the client connection ------------------------------------

    def on_request_body(self, data: bytes) -> None:
        if self.discard:
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
        self.req_done = True
        if self.local_status:
            if self.local_status < 0:  # answered already (a redirect)
                self._finish(False)
            else:
                self._write_local(self.local_status, False, self.local_cause)
            return
        if self.found.chunked and not self.discard:
            self.pending.append(_LAST_CHUNK)
        if self.deferred is not None:
            self._undefer()
            return
        if self.resp_done:
            self._finish(False)
        elif self.conn is not None and not self.resp_started:
            self._await_response()

    def _await_response(self) -> None:
        """The whole request is sent: the response header timeout starts now."""
        pool = self.pool
        assert pool is not None
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

    # -- response, from the upstream connection --------------------------------------

    def on_informational(self, status: int, raw: bytes) -> None:
        """1xx before the final response: relayed to HTTP/1.1 clients, except 100."""
        if status == 100 or not self.http_minor:
            return
        self.out += (ResponseHead(raw).head, b"\r\n")

    def on_response_head(self, status: int, found: ResponseHead) -> bool:
        """The final response head, rewritten (``response_head``) and through the
        route's response filters; False when it is dropped to retry elsewhere or
        because a filter failed (then the connection is closed unread)."""
        pool = self.pool
        assert pool is not None
        upstream = self.upstream
        assert upstream is not None
        outlier = pool.outlier
        if status >= 500 and outlier is not None and outlier.with_5xx:
            pool.failure(upstream, f"status {status}")
        elif upstream.failures:  # an answer: the run of failures is over
            upstream.failures = 0
        if status in pool.retry.statuses and self._retryable(True, True):
            self.conn = None
            if self.span is not None:
                self.span.answered(status)
            log.info(
                "%s %s: upstream %s answered %d; retrying elsewhere", self.method.decode(),
                self.target[:200].decode(errors="replace"), upstream.address, status,
            )  # fmt: skip
            self._retry()
            return False
        cache = self.cache_state
        if cache is not None:
            given = cache.on_head(self, status, found)
            if isinstance(given, Answer):  # the cache answers instead (a 304, a 5xx)
                return self._answered_instead(given)
            found = given
        filters = self.filters
        if filters is not None:
            changed = filters.chain.response(self, status, found)
            if changed is None:  # a filter failed: answered 500
                self.conn = None
                return False
            found, status = changed
        self.status = status
        self.replay = None
        self.resp_started = True
        if pool.observe is not None:
            self._observe(pool, upstream)
        client = self.client
        if client.log_times:
            self.header_at = perf_counter()
        self.deadline = client.clock.now + pool.read_timeout
        keep = self.keep_alive and not self.client.draining
        extra = b""
        if self.head_request or status == 204 or status == 304:
            mode = NO_BODY
        elif found.has_length:
            mode = LENGTH
        else:
            self.resp_eof = not found.chunked
            if self.http_minor:
                mode = CHUNKED
                extra = b"Transfer-Encoding: chunked\r\n"
            else:
                mode = UNTIL_CLOSE
                keep = False
        self.mode = mode
        self.keep_alive = keep
        if not keep:
            extra += b"Connection: close\r\n"
        elif not self.http_minor:
            extra += b"Connection: keep-alive\r\n"
        self.out += (found.head, extra, b"\r\n") if extra else (found.head, b"\r\n")
        return True

    def _answered_instead(self, answer: Answer) -> bool:
        """The cache answers this request in place of the upstream's response head
        (a 304 revalidated the stored one; a failure status and a stale one may stand
        in), through the route's response filters: its response goes out, the
        upstream's body is read and dropped. False when a filter failed (500)."""
        head, status = answer.head, answer.status
        filters = self.filters
        if filters is not None:
            changed = filters.chain.response(self, status, answer.response_head())
            if changed is None:  # a filter failed: answered 500
                self.conn = None
                return False
            head, status = changed[0].head, changed[1]
        self.status = status
        self.replay = None
        self.resp_started = True
        self.mode = NO_BODY
        self.keep_alive = self.keep_alive and not self.client.draining
        self.out.append(head)  # where a held response's head goes
        if answer.framing:
            self.out.append(answer.framing)
        if answer.body and not self.head_request:
            self.out.append(answer.body)
        self.deadline = self.client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]
        return True

    def relay_whole(
        self, conn: UpstreamConnection, known: ResponseHead, body: bytes | memoryview
    ) -> bool:
        """The fast path: the whole response, framed by a known head (``Content-Length``
        with ``body`` complete, HTTP/1.1, a final status with a body), arrived in one
        read of ``conn``: relay and complete it in one step, with the client's head and
        body in one write. False (nothing done) unless the request was sent whole and
        the status needs no retry or passive-health decision; then the general path
        (``on_response_head``, ``on_response_body``, ``on_response_complete``) takes the
        same response, to the same bytes (a property test holds the two together)."""
        pool = self.pool
        assert pool is not None
        status = known.status
        if (
            not self.req_done
            or self.pending
            or self.filters is not None  # response filters run on the general path
            or self.cache_state is not None  # and so does a cache
            or status in pool.retry.statuses
            or (status >= 500 and pool.outlier is not None and pool.outlier.with_5xx)
        ):
            return False
        upstream = self.upstream
        assert upstream is not None
        if upstream.failures:  # an answer: the run of failures is over
            upstream.failures = 0
        self.status = status
        self.replay = None
        self.resp_started = self.resp_done = True
        if pool.observe is not None:
            self._observe(pool, upstream)
        client = self.client
        if client.log_times:
            self.header_at = perf_counter()
        keep = self.keep_alive = self.keep_alive and not client.draining
        if not keep:
            end = b"Connection: close\r\n\r\n"
        elif self.http_minor:
            end = b"\r\n"
        else:
            end = b"Connection: keep-alive\r\n\r\n"
        size = self.bytes_out = len(body)
        if size <= JOIN_BELOW:
            client.transport.write(b"".join((known.head, end, body)))
        else:
            client.transport.writelines((known.head + end, body))
        self.conn = conn.exchange = None  # the connection is released
        conn.collecting = False
        if known.close:
            conn.close()
        else:
            upstream.put_idle(conn, client.clock.now)
        self.released = True
        upstream.end_request()
        self._finish(False)
        return True

    def on_switch(self, conn: UpstreamConnection, head: bytes, rest: bytes) -> bool:
        """The upstream answered the Upgrade with ``101`` (``head``, raw); ``rest``
        followed it. Relay the head and make both connections a tunnel: the request is
        counted (status 101) and stays in flight on the upstream until the tunnel ends.
        Never retried from here on. False (a 502 answered) when the ``101`` switches
        to a protocol the request did not offer."""
        asked = self.found.upgrade or []
        protocol = _upgrade_token(head)
        if protocol is None or protocol.partition(b"/")[0] not in {
            t.partition(b"/")[0] for t in asked
        }:
            self.conn = None
            self._attempt_failed(UpstreamProtocolError(
                f"upstream switched to {protocol!r}, not to what was asked"
            ))  # fmt: skip
            return False
        pool, upstream, client = self.pool, self.upstream, self.client
        assert pool is not None and upstream is not None
        if upstream.failures:
            upstream.failures = 0
        if pool.observe is not None:
            self._observe(pool, upstream)
        self.status = 101
        self.replay = None
        self.conn = None
        self.resp_started = self.resp_done = self.done = True
        self.deadline = NEVER
        client.transport.write(head)
        if client.log_times:
            self.header_at = perf_counter()
        if client.record:  # counted now; logged when the tunnel closes (``log_tunnel``)
            seconds = perf_counter() - self.started
            upstream.stats.record(client.listener.name, self.method, 101, seconds)
        if self.span is not None:
            self.span.end(self)
        tunnel = Tunnel(client, conn, protocol.decode(errors="replace"), pool.tunnel_idle, self)
        tunnel.start(rest)
        return True

    def _observe(self, pool: Pool, upstream: Upstream) -> None:
        """Give a learning balancer (``Pool.observe``) this attempt's time to the response
        head, at most once per ``OBSERVE_EVERY`` per upstream: under load it learns from
        a sample of the responses (1,000 a second per upstream), below that from all."""
        now = perf_counter()
        if now >= upstream.observed_at:
            upstream.observed_at = now + OBSERVE_EVERY
            pool.observe(upstream, now - self.tried_at, now)  # type: ignore[misc]

    def on_response_body(self, data: bytes | memoryview) -> None:
        mode = self.mode
        if self.cache_state is not None:
            self.cache_state.on_body(data)
            if mode == NO_BODY:  # the cache answered instead: this body is dropped
                return
        self.bytes_out += len(data)
        if mode == CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif mode != NO_BODY:
            self.out.append(data)
        self.deadline = self.client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]

    def on_response_complete(self, conn: UpstreamConnection, upstream_keep_alive: bool) -> None:
        filters = self.filters
        if filters is not None and filters.chain.hold_complete(filters, conn, upstream_keep_alive):
            return  # an async response filter holds the response
        if self.mode == CHUNKED:
            self.out.append(_LAST_CHUNK)
        if self.cache_state is not None:
            self.cache_state.on_complete()
        self.flush_client()
        self.resp_done = True
        self.conn = None
        conn.release()
        upstream = self.upstream
        assert upstream is not None
        if upstream_keep_alive and self.req_done and not self.pending:
            upstream.put_idle(conn, self.client.clock.now)
        else:
            conn.close()
        self._release_upstream()
        if self.req_done:
            self._finish(False)
        else:
            self._finish(True)  # the client is still sending: close after the response

    def on_upstream_lost(
        self, conn: UpstreamConnection, error: ProxyError, reset: bool = False
    ) -> None:
        """The upstream connection closed or broke during this exchange (``reset``: not
        a clean end of file, so never the end of a close-delimited body)."""
        self.conn = None
        if self.done:
            return
        if not self.resp_started:
            stale = conn.uses > 1 and not conn.responded  # a pooled connection died idle
            if stale and self.replay is not None and not self.retried:
                self._retry_fresh()
                return
            self._attempt_failed(error)
        elif self.resp_eof and not reset:  # a close-delimited body ends with a clean close
            self.on_response_complete(conn, False)
        else:
            log.warning(
                "%s %s: upstream %s closed mid-response; closing the client connection",
                self.method.decode(),
                self.target[:200].decode(errors="replace"),
                conn.upstream.address,
            )
            self.abort()
            self.client.close()

    def flush_client(self) -> None:
        """Write what one upstream read produced, in one call."""
        out = self.out
        if out:
            if self.filters is not None and self.filters.held:
                return  # an async response filter is running
            self.out = []
            write_pieces(self.client.transport, out)

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

    def client_write_paused(self, paused: bool) -> None:
        """The client's write buffer crossed a water mark: stop or restart the upstream."""
        self._hold_upstream(CLIENT_SLOW, paused)

    def store_behind(self, behind: bool) -> None:
        """The cache's store fell behind this response's body, or caught up: stop or
        restart the upstream, as a slow client does."""
        self._hold_upstream(STORE_BEHIND, behind)

    def _hold_upstream(self, reason: int, hold: bool) -> None:
        """Stop reading the upstream for ``reason``, or drop that reason (it reads again
        when no other holds it). A held upstream has no read deadline: a slow reader is
        not a slow upstream."""
        conn = self.conn
        if conn is None:
            return
        if hold:
            conn.pause_reading(reason)
            self.deadline = NEVER
            return
        conn.resume_reading(reason)
        if not conn.reading_paused and self.resp_started:
            self.deadline = self.client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]

    # -- endings ------------------------------------------------------------------------

    def on_timeout(self) -> None:
        """The response header (504, or a retry), a gap between response reads (close),
        or the wait for a connection (503) timed out."""
        self.deadline = NEVER
        ticket = self.ticket
        if ticket is not None and ticket.expire():  # waiting for a connection: 503
            return
        self._late("upstream read timeout" if self.resp_started else "no response header in time")

    def _late(self, reason: str) -> None:
        """The upstream did not keep time: close its connection; before the response
        head reached the client the attempt failed (504, or a retry), after it the
        client connection is closed (a truncated body is never presented as complete)."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.close()
        if self.resp_started:
            log.warning("%s; closing the client connection", reason)
            self.abort()
            self.client.close()
        else:
            self._attempt_failed(UpstreamTimeoutError(reason))

    def local(self, status: int, close: bool = False, cause: str = "") -> None:
        """Answer with the proxy's own response (``cause``: ``ProxyError.cause``).

        The connection is kept only when the request is (or will be, having no body)
        read completely; a request with a body still arriving is answered and closed.
        """
        self.discard = True
        self.pending = []
        self.pending_size = 0
        if close:
            self._write_local(status, True, cause)
        elif self.req_done:
            self._write_local(status, False, cause)
        elif self.found.chunked or self.found.content_length not in (None, b"0"):
            self._write_local(status, True, cause)
        else:
            self.local_status = status  # written when the (empty) request completes
            self.local_cause = cause

    def _write_local(self, status: int, close: bool, cause: str = "") -> None:
        self.local_status = 0
        self.status = status
        close = close or not self.keep_alive or self.client.draining
        answer = self.answer
        if answer is None:
            self.client.transport.write(error_response(status, close, self.head_request, cause))
        else:  # a filter's LocalResponse, a cache hit
            data = answer.render(close, self.head_request)
            write_pieces(self.client.transport, data if isinstance(data, list) else [data])
        self._finish(close)

    def fail(self, error: ProxyError) -> None:
        """Answer ``error.status`` for ``error`` (a filter's failure) and log it."""
        self._fail(error)

    def _fail(self, error: ProxyError) -> None:
        cache = self.cache_state
        answered = cache is not None and cache.on_failure(self, error)  # a stale entry
        self._release_upstream()
        if answered:
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

    def _retry_fresh(self) -> None:
        """A pooled connection was stale: send again on a new connection, once."""
        self.retried = True
        self.pool.retries += 1  # type: ignore[union-attr]
        self._rewind()
        assert self.upstream is not None
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
        self._fail(error)

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
        delay = pool.retry.backoff(self.attempts)
        self.task = self.client.loop.call_later(delay, self._next_attempt)

    def _next_attempt(self) -> None:
        self.task = None
        if self.done:
            return
        upstream = self._pick_untried()
        if upstream is None:
            self._fail(NoUpstreamError("no upstream available"))
            return
        self.upstream = upstream
        self.released = False
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

    def _release_upstream(self) -> None:
        upstream = self.upstream
        if upstream is not None and not self.released:
            self.released = True
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
        self.client.exchange_done(self, self.keep_alive and not close)

    def _record(self) -> None:
        """Count the finished request (``Stats``) and write its access log line."""
        client = self.client
        seconds = perf_counter() - self.started
        upstream = self.upstream
        if upstream is not None and self.resp_started:  # the upstream answered
            stats = upstream.stats
        elif self.pool is not None:  # the proxy answered for this pool
            stats = self.pool.stats
            upstream = None
        else:
            stats = client.listener.stats
        stats.record(client.listener.name, self.method, self.status, seconds)
        access_log = client.access_log
        if access_log is not None:
            access_log.record(
                time.time(),
                client.client_ip,
                self.method,
                self.target,
                self.status,
                self.body_size,
                self.bytes_out,
                seconds,
                self.attempts,
                self.request_id,
                self.host,
                self.headers,
                client.listener.name,
                self.pool,
                self.upstream,  # the one tried, also when the proxy answered (a 502, 504)
                self,
            )

    def log_tunnel(self, bytes_in: int, bytes_out: int) -> None:
        """The Upgrade tunnel this request became closed: its access log line, with
        the bytes each way and the time from the request to the close."""
        client = self.client
        access_log = client.access_log
        if access_log is None:
            return
        access_log.record(
            time.time(), client.client_ip, self.method, self.target, self.status,
            self.body_size + bytes_in, self.bytes_out + bytes_out, perf_counter() - self.started,
            self.attempts, self.request_id, self.host, self.headers, client.listener.name,
            self.pool, self.upstream, self,
        )  # fmt: skip

    def abort(self) -> None:
        """The client went away or broke: drop everything (idempotent)."""
        if self.done:
            return
        self.done = True
        self.deadline = NEVER
        if self.task is not None:
            self.task.cancel()
            self.task = None
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

    def __repr__(self) -> str:
        state = "done" if self.done else "streaming" if self.resp_started else "waiting"
        up = self.upstream.address if self.upstream else "-"
        return f"<Exchange {self.method.decode()} {self.target[:60]!r} -> {up} [{state}]>"


# Reasons a client connection's reading is paused (bits, see ClientConnection.pause).
PIPELINE: Final = 1
BODY_WAIT: Final = 2
UPSTREAM_FULL: Final = 4
UPGRADE: Final = 8  # an Upgrade request waits for its answer (``ClientConnection.held``)
