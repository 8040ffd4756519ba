"""A route's filters, run at the phase boundaries of each request.

Theory of operation
-------------------
A ``FilterChain`` is built once per route per config (again on reload, never per
request) from the route's ``filters``: for each phase, the hooks of the filters that
implement it, in config order. A route without filters has no chain, and its
requests take exactly the path they take without this package.

The exchange (``proxy.forwarding.exchange``, where the phases are ordered) asks the
chain to run one phase at a time, and the chain answers with an outcome; it never
touches the exchange:

- ``request(req)`` and ``upstream(req, upstream)``: None (go on), a
  ``LocalResponse`` (answer it; request hooks only), a ``FilterError`` (answer 500);
- ``response(req, head)``: the ``Response`` the hooks leave (its ``head()``, its
  ``status``; ``Response.framed`` makes the head to relay), or a ``FilterError``.

Sync hooks run inline. A request or upstream hook may return an ``asyncio.Future``
(the Redis ``rate_limit`` does): done already, its result is taken inline; else the
outcome is ``Paused`` (the phase, the hook, its future). The exchange attaches a
callback to the future, and bounds the wait by its own deadline (the pool's response
header timeout, swept by the clock like its other deadlines): no task, no coroutine,
no timer per request. Done, ``Paused.resume`` takes the future's result and runs the
phase's next hooks (which may pause in turn); past the deadline ``Paused.expired``
cancels the future and is the hook's failure; the exchange over first (the client
gone), ``Paused.cancel`` cancels it and the callback does nothing.

Any other awaitable (an ``async def`` hook; any future in the response phase) makes
the outcome a coroutine instead: it finishes the phase (bounded by the same timeout,
``asyncio.timeout``) and returns one of the outcomes above; the exchange runs it in
its task and waits (a response waits, held, meanwhile). A hook that raises, whose
future fails or is cancelled, or that returns what it may not is a ``FilterError``
naming the filter, the route, the hook and where it raised.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from collections.abc import Awaitable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from proxy.errors import FilterError
from proxy.filters.base import (
    Filter,
    LocalResponse,
    Request,
    Response,
    ResponseEncoder,
    UpstreamInfo,
    implements,
)
from proxy.filters.compress import Compress

if TYPE_CHECKING:
    from proxy.upstream.pool import Pool, Upstream

log = logging.getLogger("aiolb")

Hook = Any
#: the hooks of one phase: the phase's name (the hook's) and ``(label, hook)`` pairs
Phase = tuple[str, tuple[tuple[str, Hook], ...]]
#: what a request or upstream phase comes to: go on (None), answer, fail
Outcome = LocalResponse | FilterError | None
#: ... or a coroutine that finishes the phase and returns one of those
Pending = Coroutine[Any, Any, Outcome]


class FilterChain:
    """The filters of one route, by phase: ``(label, hook)`` pairs in config order."""

    __slots__ = ("encoder", "filters", "pool", "requests", "responses", "route", "upstreams")

    def __init__(self, route: str, pool: Pool, filters: Sequence[tuple[str, Filter]]) -> None:
        self.route = route
        self.pool = pool
        self.filters = tuple(filters)
        self.requests = self._hooks("request_filter")
        self.upstreams = self._hooks("upstream_request_filter")
        self.responses = self._hooks("response_filter")
        #: the filter that encodes the response body (``compress``), if one is listed
        self.encoder: ResponseEncoder | None = next(
            (f for _, f in self.filters if isinstance(f, Compress)), None
        )

    def _hooks(self, name: str) -> Phase:
        hooks = tuple((label, getattr(f, name)) for label, f in self.filters if implements(f, name))
        return name, hooks

    def request(self, req: Request) -> Outcome | Paused | Pending:
        """The request phase: before the cache and the pick."""
        return self._run(self.requests, (req,))

    def upstream(self, req: Request, upstream: Upstream) -> Outcome | Paused | Pending:
        """The upstream phase: the upstream is picked, the head not yet built."""
        return self._run(self.upstreams, (req, UpstreamInfo(upstream)))

    def response(
        self, req: Request, head: bytes
    ) -> Response | FilterError | Coroutine[Any, Any, Response | FilterError]:
        """The response phase over ``head`` (status line and header lines, as the
        upstream's or the cache's answer has them)."""
        response = Response(head)
        outcome = self._run(self.responses, (req, response))
        if outcome is None:
            return response
        if isinstance(outcome, FilterError):
            return outcome
        return self._respond(outcome, response)  # type: ignore[arg-type]

    async def _respond(self, pending: Pending, response: Response) -> Response | FilterError:
        outcome = await pending
        return response if outcome is None else outcome  # type: ignore[return-value]

    def _run(
        self, phase: Phase, args: tuple[Any, ...], start: int = 0
    ) -> Outcome | Paused | Pending:
        """Run the phase's hooks from ``start`` with ``args`` inline, until one answers,
        fails or waits: on a future (request and upstream phases: ``Paused``), or on
        another awaitable (then the rest of the phase is a coroutine)."""
        hooks = phase[1]
        for i in range(start, len(hooks)):
            label, hook = hooks[i]
            try:
                result = hook(*args)
            except Exception as exc:
                return self._failed(phase, label, exc)
            if result is None:
                continue
            if isinstance(result, asyncio.Future) and phase is not self.responses:
                if not result.done():
                    return Paused(self, phase, i, args, result)
                try:  # done already (a store's open circuit): no wait
                    result = result.result()
                except (Exception, asyncio.CancelledError) as exc:
                    return self._failed(phase, label, exc)
                if result is None:
                    continue
            elif inspect.isawaitable(result):
                return self._finish(phase, i, args, result)
            return self._outcome(phase, label, result)
        return None

    async def _finish(
        self, phase: Phase, at: int, args: tuple[Any, ...], pending: Awaitable[Any]
    ) -> Outcome:
        """The rest of a phase after hook ``at`` went async."""
        label = phase[1][at][0]
        try:
            async with asyncio.timeout(self.pool.response_header_timeout):
                result = await pending
                if result is not None:
                    return self._outcome(phase, label, result)
                for label, hook in phase[1][at + 1 :]:
                    result = hook(*args)
                    if inspect.isawaitable(result):
                        result = await result
                    if result is not None:
                        return self._outcome(phase, label, result)
                return None
        except TimeoutError:
            return self._failed(phase, label, TimeoutError(
                f"not done within {self.pool.response_header_timeout:g}s"))  # fmt: skip
        except Exception as exc:
            return self._failed(phase, label, exc)

    def _outcome(self, phase: Phase, label: str, result: object) -> LocalResponse | FilterError:
        """A hook's non-None result: a ``LocalResponse`` (request hooks only) answers;
        anything else is a failure."""
        name = phase[0]
        if isinstance(result, LocalResponse) and name == "request_filter":
            return result
        allowed = "None or a LocalResponse" if name == "request_filter" else "None"
        return self._failed(phase, label, TypeError(
            f"{name} returned {type(result).__name__}, not {allowed}"))  # fmt: skip

    def _failed(self, phase: Phase, label: str, exc: BaseException) -> FilterError:
        """The error of a hook that failed; its one log line says which and where."""
        where = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
        at = f" ({where[0].filename}:{where[0].lineno})" if where else ""
        return FilterError(
            f"filter {label} on route {self.route}: {phase[0]} failed: "
            f"{type(exc).__name__}: {exc}{at}"
        )

    def __repr__(self) -> str:
        labels = ", ".join(label for label, _ in self.filters)
        return f"<FilterChain {self.route} [{labels}]>"


class Paused:
    """A request or upstream phase waiting on the future hook ``at`` returned. The
    exchange waits for ``future`` without a task (``add_done_callback``), bounded by its
    own deadline (``timeout`` from now), then takes ``resume()``; past the deadline,
    ``expired()``; the exchange over first, ``cancel()``."""

    __slots__ = ("args", "at", "chain", "future", "phase")

    def __init__(
        self, chain: FilterChain, phase: Phase, at: int, args: tuple[Any, ...],
        future: asyncio.Future[Any],
    ) -> None:  # fmt: skip
        self.chain = chain
        self.phase = phase
        self.at = at
        self.args = args
        self.future = future

    @property
    def timeout(self) -> float:
        """How long the rest of the phase may take (the pool's response header timeout,
        as for a coroutine hook)."""
        return self.chain.pool.response_header_timeout

    def resume(self) -> Outcome | Paused | Pending:
        """The future is done: its outcome, else the phase's next hooks' (which may
        wait in turn)."""
        chain, phase = self.chain, self.phase
        try:
            result = self.future.result()
        except (Exception, asyncio.CancelledError) as exc:
            return chain._failed(phase, phase[1][self.at][0], exc)
        if result is not None:
            return chain._outcome(phase, phase[1][self.at][0], result)
        if self.at + 1 == len(phase[1]):  # the phase's last hook (a rate limit, often)
            return None
        return chain._run(phase, self.args, self.at + 1)

    def expired(self) -> FilterError:
        """Not done in time: the future is cancelled, and the hook failed."""
        self.future.cancel()
        return self.chain._failed(self.phase, self.phase[1][self.at][0], TimeoutError(
            f"not done within {self.timeout:g}s"))  # fmt: skip

    def cancel(self) -> None:
        """The exchange is over: the hook's future is cancelled (its answer dropped)."""
        self.future.cancel()

    def __repr__(self) -> str:
        state = "done" if self.future.done() else "waiting"
        return f"<Paused {self.phase[0]} at {self.phase[1][self.at][0]} [{state}]>"
