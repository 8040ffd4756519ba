"""Filters written in Python for the tests (``python: tests.filter_support:NAME``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic import BaseModel, ConfigDict

from proxy.filters import Filter, LocalResponse, Request, Response, UpstreamInfo


class Boom(Filter):
    """Raises in the phase its options name (``phase``), in the way they say."""

    def request_filter(self, request: Request) -> Any:
        return self._maybe("request", request)

    def response_filter(self, request: Request, response: Response) -> Any:
        return self._maybe("response", request)

    def _maybe(self, phase: str, request: Request) -> Any:
        if self.options.get("phase") != phase or request.path.startswith("/ok"):
            return None
        how = self.options.get("how", "raise")
        if how == "raise":
            raise RuntimeError(f"boom in {phase}")
        if how == "wrong":
            return 42
        if how == "async-raise":
            return self._async_raise(phase)
        if how == "future-raise":  # a future, not a coroutine: its exception, soon
            return _later(ValueError(f"future boom in {phase}"))
        if how == "future-slow":  # a future nobody settles
            return asyncio.get_running_loop().create_future()
        return self._slow()

    async def _async_raise(self, phase: str) -> None:
        await asyncio.sleep(0)
        raise ValueError(f"async boom in {phase}")

    async def _slow(self) -> None:
        await asyncio.sleep(30)


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    """``future``'s result (its exception, if ``result`` is one), unless it is done
    (cancelled by the proxy) already."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _later(result: Any) -> asyncio.Future[Any]:
    """A future (no coroutine) of ``result`` in 10 ms."""
    future = asyncio.get_running_loop().create_future()
    future.get_loop().call_later(0.01, _settle, future, result)
    return future


class Stamp(Filter):
    """Every phase, sync, async (``async: true``) or as a future settled 10 ms later
    (``async: future``), leaves a mark: a header upstream, one on the response;
    ``/deny`` is answered here with 401."""

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        mode = (options or {}).get("async")
        if mode == "future":
            self.request_filter = self._request_future  # type: ignore[method-assign]
            self.upstream_request_filter = self._upstream_future  # type: ignore[method-assign]
            self.response_filter = self._response_future  # type: ignore[method-assign]
        elif mode:
            self.request_filter = self._request_async  # type: ignore[method-assign]
            self.upstream_request_filter = self._upstream_async  # type: ignore[method-assign]
            self.response_filter = self._response_async  # type: ignore[method-assign]

    def request_filter(self, request: Request) -> LocalResponse | None:
        if request.path.startswith("/deny"):
            return LocalResponse(401, {"WWW-Authenticate": "Stamp"}, "denied by a filter\n")
        request.headers.set("X-Stamp-Request", f"{request.method} {request.client_ip}")
        request.state["seen"] = request.request_id
        return None

    def upstream_request_filter(self, request: Request, upstream: UpstreamInfo) -> None:
        request.headers.set("X-Stamp-Upstream", upstream.address)

    def response_filter(self, request: Request, response: Response) -> None:
        response.headers.set("X-Stamp-Response", str(response.status))
        response.headers.add("X-Stamp-State", request.state.get("seen", "-"))
        if request.path.startswith("/teapot"):
            response.status = 418

    async def _request_async(self, request: Request) -> LocalResponse | None:
        await asyncio.sleep(0.01)
        return Stamp.request_filter(self, request)

    async def _upstream_async(self, request: Request, upstream: UpstreamInfo) -> None:
        await asyncio.sleep(0.01)
        Stamp.upstream_request_filter(self, request, upstream)

    async def _response_async(self, request: Request, response: Response) -> None:
        await asyncio.sleep(0.01)
        Stamp.response_filter(self, request, response)

    def _request_future(self, request: Request) -> asyncio.Future[Any]:
        return _later(Stamp.request_filter(self, request))

    def _upstream_future(self, request: Request, upstream: UpstreamInfo) -> asyncio.Future[Any]:
        return _later(Stamp.upstream_request_filter(self, request, upstream))

    def _response_future(self, request: Request, response: Response) -> asyncio.Future[Any]:
        return _later(Stamp.response_filter(self, request, response))


class Promise(Filter):
    """A request hook that returns a future (no coroutine) and keeps it in
    ``futures``: the test settles it (``/ok`` passes without one)."""

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.futures: list[asyncio.Future[Any]] = []

    def request_filter(self, request: Request) -> asyncio.Future[Any] | None:
        if request.path.startswith("/ok"):
            return None
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


class WorkerPid(Filter):
    """Says which worker process answered (``X-Worker-Pid``)."""

    def response_filter(self, request: Request, response: Response) -> None:
        response.headers.set("X-Worker-Pid", str(os.getpid()))


class Greeting(Filter):
    """Options validated by a model: ``greeting`` (required), ``times`` (>= 1)."""

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        greeting: str
        times: int = 1

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        if options.greeting == "explode":
            raise ValueError("cannot greet like that")

    def response_filter(self, request: Request, response: Response) -> None:
        response.headers.set("X-Greeting", " ".join([self.options.greeting] * self.options.times))


class NotAFilter:
    """Not a subclass of Filter."""


class Pondering(Filter):
    """An async response hook that takes ``seconds`` (options) before it lets go."""

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.seconds = float((options or {}).get("seconds", 1.0))

    async def response_filter(self, request: Request, response: Response) -> None:
        await asyncio.sleep(self.seconds)
        response.headers.set("X-Pondered", "yes")
