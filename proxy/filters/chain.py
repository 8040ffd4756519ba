"""A route's filters, run at the phase boundaries of each request.

Theory of operation
-------------------
A ``FilterChain`` is built once per route per config (again on reload, never per
request) from the route's ``filters``: for each phase, the hooks of the filters that
implement it, in config order. A route without filters has no chain, and its
requests take exactly the path they take without this package.

The exchange calls the chain at three boundaries:

1. ``request(ex)`` after routing: the request hooks run, then the upstream is picked
   (the one a ``sticky`` cookie pinned, while it is available, else the balancer's),
   then the upstream hooks, then ``ex.dispatch(upstream, target)`` builds the head
   and sends it (the fast start included). A hook that returns a ``LocalResponse``
   answers the request there.
2. ``response(ex, status, head)`` from ``on_response_head``, for chains with response
   hooks: a new ``ResponseHead`` with the changed status line and headers (the
   upstream's own head, shared by the head cache, is never changed).

Sync hooks run inline. When a hook returns an awaitable, the rest of that phase runs
in a task (``ex.task``, which ``abort`` cancels) bounded by the pool's response header
timeout; the request side waits meanwhile as it waits for a new connection (a body
that arrives is kept in ``pending``, the client paused above its high-water mark).
An async response hook holds the response: upstream reading pauses, and what that
read already held waits in ``ex.out`` behind the head's place until the hook is done.

A hook that raises (or returns what it may not) answers 500 and logs one line
(``FilterError``); a response the upstream began is then dropped with its
connection. ``ex.filters`` is the request's ``Request`` only while the chain has more
to do with it (response hooks, or a local answer to write), so every other request
takes ``relay_whole`` and the unfiltered response path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from proxy.cache.flow import begin as cache_begin
from proxy.errors import FilterError
from proxy.filters.base import Filter, LocalResponse, Request, Response, UpstreamInfo, implements
from proxy.http.headers import ResponseHead
from proxy.upstream.connection import FILTER_HOLD

if TYPE_CHECKING:
    from proxy.cache import Cache
    from proxy.forwarding.exchange import Exchange
    from proxy.upstream.connection import UpstreamConnection
    from proxy.upstream.pool import Pool

log = logging.getLogger("aiolb")

Hook = Callable[..., Any]
#: the hooks of one phase: the phase's name (the hook's) and ``(label, hook)`` pairs
Phase = tuple[str, tuple[tuple[str, Hook], ...]]


class FilterChain:
    """The filters of one route, by phase: ``(label, hook)`` pairs in config order."""

    __slots__ = ("cache", "filters", "pool", "requests", "responses", "route", "upstreams")

    def __init__(self, route: str, pool: Pool, filters: Sequence[tuple[str, Filter]]) -> None:
        self.route = route
        self.pool = pool
        #: the route's cache, consulted after the request phase (set by the router)
        self.cache: Cache | None = None
        self.filters = tuple(filters)
        self.requests = self._hooks("request_filter")
        self.upstreams = self._hooks("upstream_request_filter")
        self.responses = self._hooks("response_filter")

    def _hooks(self, name: str) -> Phase:
        hooks = tuple((label, getattr(f, name)) for label, f in self.filters if implements(f, name))
        return name, hooks

    # -- request side -------------------------------------------------------------------

    def request(self, ex: Exchange) -> None:
        """The request phase (then the pick and the upstream phase), for a routed ``ex``."""
        req = Request(self, ex)
        if self.responses[1]:
            ex.filters = req
        self._run(req, self.requests, 0, (req,), self._cached)

    def _cached(self, req: Request) -> None:
        """The request phase is done: the route's cache may answer; else ``_pick``."""
        if self.cache is None:
            self._pick(req)
        else:
            cache_begin(req.ex, self.cache, lambda: self._pick(req))

    def _pick(self, req: Request) -> None:
        ex = req.ex
        pinned = req.pinned
        upstream = pinned if pinned is not None and pinned.available else self.pool.pick(ex)
        if upstream is None or not self.upstreams[1]:
            ex.dispatch(upstream, req.target)
            return
        self._run(req, self.upstreams, 0, (req, UpstreamInfo(upstream)),
                  lambda r: r.ex.dispatch(upstream, r.target))  # fmt: skip

    def _run(
        self,
        req: Request,
        phase: Phase,
        start: int,
        args: tuple[Any, ...],
        then: Callable[[Request], None],
    ) -> None:
        """Run the phase's hooks from ``start`` with ``args`` inline; on to ``then``
        unless one answered, failed or went async (then a task finishes the phase)."""
        hooks = phase[1]
        for i in range(start, len(hooks)):
            label, hook = hooks[i]
            try:
                result = hook(*args)
            except Exception as exc:
                self._failed(req, phase, label, exc)
                return
            if result is not None:
                if inspect.isawaitable(result):
                    task = asyncio.get_running_loop().create_task(
                        self._finish(req, phase, i, args, result, then)
                    )
                    req.ex.task = task
                    return
                if not self._outcome(req, phase, label, result):
                    return
        then(req)

    async def _finish(
        self,
        req: Request,
        phase: Phase,
        at: int,
        args: tuple[Any, ...],
        pending: Awaitable[Any],
        then: Callable[[Request], None],
    ) -> None:
        """The rest of a phase after hook ``at`` went async."""
        ex = req.ex
        label = phase[1][at][0]
        try:
            async with asyncio.timeout(self.pool.response_header_timeout):
                result = await pending
                if result is None or self._outcome(req, phase, label, result):
                    for label, hook in phase[1][at + 1 :]:
                        result = hook(*args)
                        if inspect.isawaitable(result):
                            result = await result
                        if result is not None and not self._outcome(req, phase, label, result):
                            break
                    else:
                        ex.task = None
                        if not ex.done:
                            then(req)
                        return
        except TimeoutError:
            self._failed(req, phase, label, TimeoutError(
                f"not done within {self.pool.response_header_timeout:g}s"))  # fmt: skip
        except Exception as exc:
            self._failed(req, phase, label, exc)
        ex.task = None

    def _outcome(self, req: Request, phase: Phase, label: str, result: object) -> bool:
        """A hook's non-None result: a ``LocalResponse`` (request hooks only) answers.
        True to go on."""
        ex = req.ex
        name = phase[0]
        if isinstance(result, LocalResponse) and name == "request_filter":
            if not ex.done:
                ex.answer = result
                ex.local(result.status)
            return False
        allowed = "None or a LocalResponse" if name == "request_filter" else "None"
        self._failed(req, phase, label, TypeError(
            f"{name} returned {type(result).__name__}, not {allowed}"))  # fmt: skip
        return False

    def _failed(self, req: Request, phase: Phase, label: str, exc: BaseException) -> None:
        """Answer 500 for a hook that failed; one log line says which and where."""
        ex = req.ex
        if ex.done:
            return
        where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        at = f" ({where[0].filename}:{where[0].lineno})" if where else ""
        reason = f"filter {label} on route {self.route}: {phase[0]} failed: " + (
            f"{type(exc).__name__}: {exc}{at}"
        )
        if req.held:
            self._drop_held(req)
        ex.fail(FilterError(reason))

    # -- response side --------------------------------------------------------------------

    def response(
        self, ex: Exchange, status: int, found: ResponseHead
    ) -> tuple[ResponseHead, int] | None:
        """The response hooks over ``found``: the head to relay (``found`` itself, or a
        copy when changed) and the status, or None when a hook failed (the exchange
        answered 500). An async hook leaves a placeholder head and holds the response
        until it is done (``_release``)."""
        req = ex.filters
        assert req is not None
        response = Response(found.head)
        done: list[bool] = []
        self._run(req, self.responses, 0, (req, response), lambda r: done.append(True))
        if done:
            return _with_head(found, response), response.status
        if ex.task is None or ex.done:  # a hook failed: answered 500
            return None
        req.held = True  # the task finishes the phase; the response waits for it
        req._head_at = len(ex.out)
        self._hold(req, response)
        return _with_head(found, None), status

    def answer(self, ex: Exchange, head: bytes, then: Callable[[bytes, int], None]) -> None:
        """The response hooks over a response the proxy answers with itself from its
        cache (``head``: status line and header lines): ``then(head, status)`` with what
        they leave, at once or once an async hook is done (nothing was written yet: no
        hold). A hook that fails answers 500 instead."""
        req = ex.filters
        assert req is not None
        response = Response(head)
        self._run(req, self.responses, 0, (req, response),
                  lambda _: then(response.head(), response.status))  # fmt: skip

    def _hold(self, req: Request, response: Response) -> None:
        ex = req.ex
        conn = ex.conn
        if conn is not None:
            conn.pause_reading(FILTER_HOLD)
        task = ex.task
        assert isinstance(task, asyncio.Task)

        def resume(_: object) -> None:
            if req.held and not ex.done and ex.task is None:
                self._release(req, response)

        task.add_done_callback(resume)

    def _release(self, req: Request, response: Response) -> None:
        """The async response hooks are done: put the head in its place and let the
        response go on."""
        ex = req.ex
        req.held = False
        ex.out[req._head_at] = response.head()
        ex.status = response.status
        complete = req._complete
        req._complete = None
        ex.flush_client()
        if complete is not None:
            ex.on_response_complete(*complete)
        elif ex.conn is not None:
            ex.conn.resume_reading(FILTER_HOLD)

    def hold_complete(self, req: Request, conn: UpstreamConnection, keep_alive: bool) -> bool:
        """``on_response_complete`` while the response is held: keep it for later."""
        if not req.held:
            return False
        req._complete = (conn, keep_alive)
        return True

    def _drop_held(self, req: Request) -> None:
        """A held response whose hook failed: forget what was gathered for the client."""
        ex = req.ex
        req.held = False
        del ex.out[req._head_at :]
        ex.flush_client()  # informational heads before it
        ex.resp_started = False
        conn, complete = ex.conn, req._complete
        req._complete = None
        if complete is not None:
            conn = complete[0]
        if conn is not None:
            ex.conn = None
            conn.close()

    def __repr__(self) -> str:
        labels = ", ".join(label for label, _ in self.filters)
        return f"<FilterChain {self.route} [{labels}]>"


def _with_head(found: ResponseHead, response: Response | None) -> ResponseHead:
    """``found`` itself when nothing changed, else a copy with the new head (b"" while
    an async hook runs)."""
    if response is not None and not response.changed:
        return found
    copy = ResponseHead.__new__(ResponseHead)
    copy.chunked, copy.close, copy.has_length = found.chunked, found.close, found.has_length
    copy.length, copy.status = found.length, found.status
    copy.head = response.head() if response is not None else b""
    return copy

