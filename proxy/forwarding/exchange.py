"""One request/response cycle: its phases, in order.

Theory of operation
-------------------
A downstream (``proxy.forwarding.downstream``: an HTTP/1.1 client connection, later an
HTTP/2 stream) creates an ``Exchange`` when a request head has been parsed, and calls
``start`` when it becomes current (pipelined requests wait their turn, so responses
stay in order). The phases of a request run here, in this order, and nowhere else
(pingora's ``process_request`` over its ``ProxyHttp`` hooks):

1. ``start``: the target is resolved and normalised, TRACE / ``OPTIONS *`` answered,
   the route found (404), a redirect or a refused Upgrade answered;
2. the route's **request filters** (``FilterChain.request``);
3. the route's **cache** (``proxy.cache.flow.begin``): a hit answers, a miss or a
   revalidation goes on with a ``CacheState``, a lookup or a collapsed miss waits; a
   stale hit within ``stale-while-revalidate`` also asks for a background request
   (``revalidate``), an exchange of its own that starts at this phase
   (``start_refresh``, ``proxy.forwarding.background``);
4. the **pick**: the pool (a split route's ``Split`` chooses one; a mirrored route
   marks the request for a copy), then the upstream a filter pinned (``sticky``) while
   it is available, else the balancer's;
5. the **upstream request filters** (``FilterChain.upstream``), once;
6. **send** (``Attempts.dispatch``: the head built once, a connection, the body);
7. the **response** (``Responses``): the cache, the response filters, the client;
8. **finish**: counted, logged, handed back to the downstream (``ExchangeCore``).

Each phase's outcome says what happens next: go on, answer locally (a filter's
``LocalResponse``, a cache hit), fail (``FilterError``: 500) or wait: for a filter
hook's future (``Paused``: a callback on the future, ``_wait_on``, and the exchange's
deadline, no task), or for a coroutine the exchange runs in its task (``later``); then
it takes the outcome that comes. Filters and
the cache never touch the exchange's state. Any failure ends in one place,
``ExchangeCore.fail`` (pingora's ``fail_to_proxy``): a stale cache entry may answer,
else the proxy's error page.

A route without filters or a cache goes from ``start`` straight to the pick and the
send: the common request pays for none of the phases it does not have.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from proxy.cache.flow import Answer, CacheState
from proxy.cache.flow import begin as cache_begin
from proxy.clock import NEVER
from proxy.errors import FilterError
from proxy.filters.base import LocalResponse, Request
from proxy.filters.chain import Paused
from proxy.forwarding.background import revalidation
from proxy.forwarding.response import Responses
from proxy.forwarding.states import ANSWERED, DONE
from proxy.http.responses import (
    BAD_AUTHORITY,
    NOT_FORWARD_PROXY,
    OPTIONS_ANSWER,
    TRACE_REFUSED,
)
from proxy.http.target import known_target, normal_target, normalise_host

if TYPE_CHECKING:
    from proxy.forwarding.router import Route
    from proxy.upstream.pool import Pool, Upstream

log = logging.getLogger("aiolb")

#: Methods ``Exchange.start`` hands to ``_answer_here`` (a set: one lookup per request).
_ANSWERED_HERE: Final = frozenset((b"TRACE", b"OPTIONS"))
#: An absolute-form authority we accept: host or [IPv6] and an optional port.
_AUTHORITY: Final = re.compile(rb"(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


class Exchange(Responses):
    __slots__ = ()

    # -- 1. start: target, route ---------------------------------------------------------

    def start(self) -> None:
        """Become the current exchange: route, then the route's phases (if any), pick
        and send; or answer locally."""
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
        route = listener.router.route(self.host, target, self)
        if route is None:
            self.local(404)
            return
        pool = route.pool
        if pool is None:  # a redirect, or a split or mirrored route
            split = route.split
            if split is None:
                self._redirect(route)
                return
            pool = split.choose(self)
            mirror = route.mirror
            if mirror is not None and mirror.sample():
                self.mirror = mirror  # copied when dispatched (``Attempts.dispatch``)
        self.pool = pool
        if self.found.upgrade is not None and not self._allow_upgrade(route):
            return
        pool.requests += 1
        tracer = listener.tracer
        if tracer is not None:  # the traceparent to send; spans if sampled
            # no trace header came and the new trace is not sampled: the common case,
            # no call (``ids`` has None where sampled; ``traceparent`` stands for
            # both headers)
            if self.found.traceparent is None and (trace := next(tracer.ids)) is not None:
                self.trace_id = trace
            else:
                tracer.begin(self, route)
        if route.chain is not None:
            self._request_filters(route)
        elif route.cache is not None:
            self._cached(cache_begin(self, route.cache, False), None)
        else:  # the common route: straight to the pick and the send
            self.dispatch(pool.pick(self), target)

    # -- 2. request filters --------------------------------------------------------------

    def _request_filters(self, route: Route) -> None:
        chain = route.chain
        assert chain is not None
        req = Request(chain, self, self.target)
        if chain.responses[1] or chain.encoder is not None:  # more to do: the response
            self.filters = req
        outcome = chain.request(req)
        if outcome is None:  # the common case: on at once, no continuation to make
            self._consult_cache(route, req)
        else:
            self._go_on(outcome, partial(self._consult_cache, route, req))

    def _go_on(self, outcome: Any, then: Callable[[], None]) -> None:
        """A request or upstream phase's outcome: go on with ``then()``, answer a
        ``LocalResponse``, fail, or wait (for a hook's future, ``Paused``, or for the
        coroutine) and take the outcome it comes to."""
        if outcome is None:
            then()
        elif isinstance(outcome, LocalResponse):
            self.answer = outcome
            self.local(outcome.status)
        elif isinstance(outcome, FilterError):
            self.fail(outcome)
        elif outcome.__class__ is Paused:
            self._wait_on(outcome, then)
        else:
            self.later(outcome, lambda given: self._go_on(given, then))

    def _wait_on(self, paused: Paused, then: Callable[[], None]) -> None:
        """Wait for a filter hook's future without a task: its outcome once it is done,
        unless the exchange is over by then (``abort`` cancels it); past the deadline
        (``paused.timeout`` from now, swept with the others) ``on_timeout`` fails it."""
        self.task = paused
        self.deadline = self.client.clock.now + paused.timeout
        paused.future.add_done_callback(partial(self._resumed, paused, then))

    def _resumed(self, paused: Paused, then: Callable[[], None], _: object) -> None:
        if self.task is not paused:  # over: gone, timed out
            return
        self.task = None
        self.deadline = NEVER
        try:
            self._go_on(paused.resume(), then)
        except Exception as exc:  # a bug: it never escapes into the loop
            log.error("bug after a filter's wait on %r", self.target[:200], exc_info=exc)
            self.abort()
            self.client.close()

    # -- 3. the cache --------------------------------------------------------------------

    def _consult_cache(self, route: Route, req: Request) -> None:
        cache = route.cache
        if cache is None:
            self._pick(req)
            return
        self.filtered_target = req.target  # what a background revalidation sends
        headers = self.headers
        if req.encoding is not None:  # one stored variant per encoding (``compress``)
            headers = [(n, v) for n, v in headers if n.lower() != b"accept-encoding"]
            headers.append((b"accept-encoding", req.encoding))
        self._cached(cache_begin(self, cache, self.filters is not None, headers), req)

    def _cached(self, outcome: Any, req: Request | None) -> None:
        """The cache's outcome: forward (with a ``CacheState``), answer (a hit), or wait
        (a lookup, another request's fetch) and take the outcome it comes to."""
        if outcome.__class__ is Answer:  # a hit
            if self.filters is None:
                self._local_answer(outcome)
            else:
                self.serve(outcome)
        elif isinstance(outcome, CacheState):
            self.cache_state = outcome
            self._pick(req)
        else:
            self.later(outcome, lambda given: self._cached(given, req))

    def revalidate(self, state: CacheState) -> None:
        """``Subject.revalidate``: the cache served a stale entry and wants it again. A
        background exchange sends the request through the pool (``proxy.forwarding.
        background``), to the target this one's request filters left."""
        target: bytes = getattr(self, "filtered_target", self.target)
        revalidation(self, state, target)

    def start_refresh(self, pool: Pool, state: CacheState, target: bytes) -> None:
        """A background revalidation (``revalidation``) starts here, at the cache phase,
        with the ``CacheState`` that revalidates the stored entry: the route's filters
        ran for the request that triggered it and do not run again (neither phase);
        then the balancer's pick and the send, as for any request."""
        self.pool = pool
        pool.requests += 1
        self.req = DONE
        self.cache_state = state
        state.ask(self)
        self.dispatch(pool.pick(self), target)

    def start_copy(self, pool: Pool, body: tuple[bytes, ...], size: int, target: bytes) -> None:
        """A mirror copy (``proxy.forwarding.traffic``) starts here, at the pick: its
        request (and ``body``, read whole) as the real one was dispatched; the route's
        filters ran for the real request and do not run again."""
        self.pool = pool
        pool.requests += 1
        self.req = DONE
        if body:
            self.pending = list(body)
            self.pending_size = self.body_size = size
        self.dispatch(pool.pick(self), target)

    # -- 4. pick, 5. upstream filters, 6. send --------------------------------------------

    def _pick(self, req: Request | None) -> None:
        pool = self.pool
        assert pool is not None
        if req is None:
            self.dispatch(pool.pick(self), self.target)
            return
        pinned = req.pinned
        if pinned is not None and pinned.available and pinned.pool is pool:
            upstream: Upstream | None = pinned
        else:  # none pinned, or of another pool of a split
            upstream = pool.pick(self)
        chain = req.chain
        if upstream is None or not chain.upstreams[1]:
            self.dispatch(upstream, req.target)
            return
        self._go_on(chain.upstream(req, upstream), lambda: self.dispatch(upstream, req.target))

    # -- answered in ``start`` -------------------------------------------------------------

    def _redirect(self, route: Route) -> None:
        """A route that redirects to https: 308 to the same URL there."""
        host = normalise_host(self.host) if self.host else b""
        if not host or _AUTHORITY.fullmatch(host) is None:
            self.local(400)
            return
        port = b"" if route.redirect is True else b":%d" % route.redirect
        location = b"https://" + host + port + self.target
        self.status = 308
        self.resp = ANSWERED
        close = not self.keep_alive or self.client.draining or not self._bodiless()
        self.client.send_redirect(self, location, close)
        if self.req is DONE or close:
            self._finish(close)
        # else finished when the (empty) request completes

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
