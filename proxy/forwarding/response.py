"""The upstream's response on its way to the client: the events an upstream session
sends its exchange (``proxy.upstream.connection``), and flow control.

Theory of operation
-------------------
The head is decided here (retry, passive health, the route's cache and response
filters) and framed by the downstream (``Downstream.send_head``); body pieces go to
the downstream as they are parsed and are written once per upstream read
(``flush_client``). A response read whole with a known head takes ``relay_whole``: one
call, one write. A full client write buffer holds the upstream (``CLIENT_SLOW``), and
so does a cache store that fell behind (``STORE_BEHIND``) or an async response filter
(``FILTER_HOLD``: the body waits in ``held`` until the filter is done).
"""

from __future__ import annotations

import logging
import re
from time import perf_counter
from typing import TYPE_CHECKING, Final

from proxy.cache.flow import LATER, Answer
from proxy.clock import NEVER
from proxy.errors import FilterError, ProxyError, UpstreamProtocolError
from proxy.filters.base import Response
from proxy.forwarding.attempt import Attempts
from proxy.forwarding.states import COMPLETE, DONE, HEAD, NONE, RECEIVING, RELEASED
from proxy.http.headers import relayed_trailers
from proxy.upstream.session import CLIENT_SLOW, FILTER_HOLD, STORE_BEHIND

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.http.headers import ResponseHead
    from proxy.upstream.connection import UpstreamConnection

log = logging.getLogger("aiolb")

_UPGRADE_HEADER: Final = re.compile(rb"\r\nupgrade[ \t]*:[ \t]*([^\r]*)", re.IGNORECASE)


def _upgrade_token(head: bytes) -> bytes | None:
    """The protocol a ``101`` head switches to (its ``Upgrade`` header), lower case."""
    m = _UPGRADE_HEADER.search(head)
    return m.group(1).strip().lower() if m is not None else None


class Responses(Attempts):
    __slots__ = ()

    def on_informational(self, status: int, raw: bytes) -> None:
        """1xx before the final response: relayed where the client can take it."""
        if status != 100:  # the proxy answers ``Expect: 100-continue`` itself
            self.client.send_informational(self, status, raw)

    def on_response_head(self, status: int, found: ResponseHead) -> bool:
        """The final response head, rewritten (``response_head``), through the cache and
        the route's response filters; False when it is dropped to retry elsewhere or
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
        self.attempt = RECEIVING
        framing = found  # the upstream's: where its body ends
        filters = self.filters
        if filters is not None and filters.chain.encoder is not None:  # before the cache:
            encoded = filters.chain.encoder.encode(  # it stores what the client gets
                filters, status, found, self.head_request
            )
            if encoded is not None:
                found, filters.coder = encoded
        cache = self.cache_state
        if cache is not None:
            given = cache.on_head(self, status, found)
            if isinstance(given, Answer):  # the cache answers instead (a 304, a 5xx)
                return self._answered_instead(given)
            if given is LATER:  # a range, cut from the whole once it is stored
                return self._answer_later()
            found = given  # type: ignore[assignment]
        self.replay = None
        self.resp = HEAD
        if pool.observe is not None:
            self._observe(pool, upstream)
        client = self.client
        if client.log_times:
            self.header_at = perf_counter()
        self.deadline = client.clock.now + pool.read_timeout
        self.resp_eof = not (
            framing.has_length or framing.chunked or self.head_request or status in (204, 304)
        )
        if filters is None:
            self.status = status
            client.send_head(self, status, found)
            return True
        return self._filter_response(status, found)

    def _filter_response(self, status: int, found: ResponseHead) -> bool:
        """The route's response hooks over the head: sent as they leave it, held while
        an async hook runs, or a 500 when one fails."""
        filters = self.filters
        assert filters is not None
        self.status = status

        def send(response: Response) -> None:
            self.status = response.status
            self.client.send_head(self, response.status, response.framed(found))

        return self._filtered(filters.chain.response(filters, found.head), send)

    def _answered_instead(self, answer: Answer) -> bool:
        """The cache answers this request in place of the upstream's response head
        (a 304 revalidated the stored one; a failure status and a stale one may stand
        in), through the route's response filters: its response goes out, the
        upstream's body is read and dropped. False when a filter failed (500)."""
        self.answer = answer  # from here on the upstream's body is dropped
        self.bytes_out = len(answer.body)
        self.replay = None
        self.resp = HEAD
        client = self.client
        self.deadline = client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]

        def send(response: Response | None) -> None:
            given = answer
            if response is not None:
                given = answer.with_head(response.head(), response.status)
            self.status = given.status
            close = not self.keep_alive or client.draining
            self.keep_alive = not close
            client.send_answer(self, given, close)

        filters = self.filters
        if filters is None:
            send(None)
            return True
        self.status = answer.status
        return self._filtered(filters.chain.response(filters, answer.head), send)

    def _answer_later(self) -> bool:
        """The cache stores the whole response and then answers the range the client
        asked for (``CacheState.final``): the body goes to the cache only."""
        self.answer = LATER  # from here on the upstream's body is not the client's
        self.replay = None
        self.resp = HEAD
        self.deadline = self.client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]
        return True

    def _filtered(self, outcome: object, send: Callable[[Response], None]) -> bool:
        """A response phase's outcome: ``send`` the head it leaves, hold the response
        while an async hook runs (the body waits in ``held``), or answer 500 for a hook
        that failed (False: the upstream connection is closed unread)."""
        if isinstance(outcome, Response):
            send(outcome)
            return True
        if isinstance(outcome, FilterError):
            self.conn = None  # closed unread by the connection (False)
            self._filter_failed(outcome)
            return False
        self.held = []
        self._hold_upstream(FILTER_HOLD, True)  # the proxy holds it: no read deadline
        self.later(outcome, lambda done: self._release_held(done, send))  # type: ignore[arg-type]
        return True

    def _release_held(self, outcome: object, send: Callable[[Response], None]) -> None:
        """The async response hooks are done: send the head they left and what was held,
        or drop the response for a 500 when one failed."""
        held = self.held or []
        complete = self.held_complete
        self.held = None
        self.held_complete = None
        client = self.client
        if not isinstance(outcome, Response):
            client.flush()  # informational heads before it
            conn = complete[0] if complete is not None else self.conn
            self.conn = None
            if conn is not None:
                conn.close()
            self._filter_failed(outcome)  # type: ignore[arg-type]
            return
        send(outcome)
        if self.answer is None:
            for piece in held:
                client.send_body(self, piece)
        client.flush()
        if complete is not None:
            self.on_response_complete(*complete)
        else:  # the upstream reads again, and its read deadline runs again
            self._hold_upstream(FILTER_HOLD, False)

    def _filter_failed(self, error: FilterError) -> None:
        """A response hook failed: nothing of the held response (nor a cache's stand-in)
        is the client's; the failure path answers 500."""
        self.resp = NONE
        self.answer = None
        self.bytes_out = 0
        self.fail(error)

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
            self.req is not DONE
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
        self.resp = COMPLETE
        if pool.observe is not None:
            self._observe(pool, upstream)
        client = self.client
        if client.log_times:
            self.header_at = perf_counter()
        self.bytes_out = len(body)
        client.send_whole(self, known, body)
        self.conn = conn.exchange = None  # the connection is released
        conn.collecting = False
        if known.close:
            conn.close()
        else:
            upstream.put_idle(conn, client.clock.now)
        self.attempt = RELEASED  # ``_release_upstream``, inline
        upstream.end_request()
        self._finish(False)
        return True

    def on_switch(self, conn: UpstreamConnection, head: bytes, rest: bytes) -> bool:
        """The upstream answered the Upgrade with ``101`` (``head``, raw); ``rest``
        followed it. The downstream relays the head and joins both connections: the
        request is counted (status 101) and stays in flight on the upstream until the
        tunnel ends. Never retried from here on. False (a 502 answered) when the ``101``
        switches to a protocol the request did not offer."""
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
        self.attempt = RECEIVING
        self.resp = COMPLETE
        self.done = True
        self.deadline = NEVER
        if client.log_times:
            self.header_at = perf_counter()
        if client.record:  # counted now; logged when the tunnel closes (``log_tunnel``)
            seconds = perf_counter() - self.started
            upstream.stats.record(client.listener.name, self.method, 101, seconds)
        if self.span is not None:
            self.span.end(self)
        client.switch(self, conn, protocol.decode(errors="replace"), head, rest)
        return True

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response's trailers (before its end): relayed where the client's
        protocol carries them (HTTP/2; chunked HTTP/1.1 to a client that said ``TE:
        trailers``), never into a cache entry or a held response; only the fields
        ``relayed_trailers`` lets through (no framing, no invalid bytes)."""
        filters = self.filters
        if filters is not None and filters.coder is not None:  # the body's end first
            self._coded(True)
        if self.answer is None and self.held is None and self.cache_state is None:
            fields = relayed_trailers(trailers)
            if fields:
                self.client.send_trailers(self, fields)

    def on_response_body(self, data: bytes | memoryview) -> None:
        filters = self.filters
        if filters is not None and filters.coder is not None:
            data = filters.coder.compress(data)
            if not data:  # the compressor keeps it for now
                self._body_read()
                return
        if self.cache_state is not None:
            self.cache_state.on_body(data)
            if self.answer is not None:  # the cache answered instead: this body is dropped
                return
        self.bytes_out += len(data)
        held = self.held
        if held is None:
            self.client.send_body(self, data)
        else:
            held.append(bytes(data))
        conn = self.conn
        if conn is not None and not conn.reading_paused:  # held: no read deadline
            self.deadline = self.client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]

    def _body_read(self) -> None:
        """A body piece was read and nothing of it goes out yet: the read deadline runs
        again from now."""
        conn = self.conn
        if conn is not None and not conn.reading_paused:
            self.deadline = self.client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]

    def _coded(self, last: bool) -> None:
        """What the body's coder holds goes out (an upstream read ended), or the rest of
        it (``last``: the body ended; the coder is done)."""
        filters = self.filters
        assert filters is not None
        coder = filters.coder
        assert coder is not None
        filters.coder = None  # what comes out is relayed as it is
        data = coder.finish() if last else coder.flush()
        if data:
            self.on_response_body(data)
        if not last:
            filters.coder = coder

    def on_response_complete(self, conn: UpstreamConnection, upstream_keep_alive: bool) -> None:
        filters = self.filters
        if filters is not None and filters.coder is not None:
            self._coded(True)
        if self.held is not None:  # an async response filter holds the response
            self.held_complete = (conn, upstream_keep_alive)
            return
        client = self.client
        if self.answer is None:
            client.send_end(self)
        cache = self.cache_state
        if cache is not None:
            cache.on_complete()
            if self.answer is LATER:  # stored: the client's range, cut from it
                final = cache.final
                assert final is not None
                self.answer = final
                self.status = final.status
                self.bytes_out = len(final.body)
                close = not self.keep_alive or client.draining
                self.keep_alive = not close
                client.send_answer(self, final, close)
        client.flush()
        self.resp = COMPLETE
        self.conn = None
        conn.release()
        upstream = self.upstream
        assert upstream is not None
        if upstream_keep_alive and self.req is DONE and not self.pending:
            upstream.put_idle(conn, client.clock.now)
        else:
            conn.close()
        self._release_upstream()
        # a client still sending is closed after the response
        self._finish(self.req is not DONE)

    def on_upstream_lost(
        self, conn: UpstreamConnection, error: ProxyError, reset: bool = False
    ) -> None:
        """The upstream connection closed or broke during this exchange (``reset``: not
        a clean end of file, so never the end of a close-delimited body)."""
        self.conn = None
        if self.done:
            return
        if self.resp < HEAD:
            stale = conn.uses > 1 and not conn.responded  # a pooled connection died idle
            # (or an HTTP/2 stream refused unprocessed: ``sent`` False, as safe to resend)
            if (stale or not error.sent) and self.replay is not None and not self.retried:
                self._retry_fresh()
                return
            if self.replay is None:  # the body sent so far is gone: never sent again
                error.sent = True
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
        """Write what one upstream read produced, in one call (not while held)."""
        filters = self.filters
        if filters is not None and filters.coder is not None and self.answer is None:
            self._coded(False)
        if self.held is None:
            self.client.flush()

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
        if not conn.reading_paused and self.resp >= HEAD:
            self.deadline = self.client.clock.now + self.pool.read_timeout  # type: ignore[union-attr]
