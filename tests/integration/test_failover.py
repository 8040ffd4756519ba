"""Losing an upstream costs the client nothing: active checks, outlier ejection,
retries with failover, the retry budget and circuit breaking, through the real proxy to
real upstreams on 127.0.0.1.

Counts are what the upstreams received or what the clients got; times are waited for
with deadlines (``wait_for``), never slept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from proxy.upstream.pool import Upstream
from tests.support import HOST, Recorder, make_config, proxy_url, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

FAST_CHECK = {"path": "/healthz", "interval": "100ms", "timeout": "500ms",
              "healthy_threshold": 2, "unhealthy_threshold": 2}  # fmt: skip


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def upstream_of(server: ProxyServer, url: str, pool: str = "main") -> Upstream:
    found = server.pools[pool].upstream(url.removeprefix("http://"))
    assert found is not None
    return found


async def get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, str]:
    async with session.get(url, **kw) as resp:
        return resp.status, await resp.text()


def messages(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]


def health_app(status: dict[str, int]) -> dict[str, Any]:
    """``/healthz`` answering ``status["code"]`` (the test changes it)."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=status["code"], text="state")

    return {"/healthz": healthz}


# -- active health checks ---------------------------------------------------------------------


async def test_active_checks_take_an_upstream_out_and_back_with_the_reason(
    proxy: MakeProxy, recorders: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "aiolb")
    status = {"code": 200}
    a = await recorders("a")
    b = await recorders("b", health_app(status))
    server = await proxy(make_config([a.url, b.url], pool={
        "health_check": {"active": FAST_CHECK}}))  # fmt: skip
    ub = upstream_of(server, b.url)
    async with aiohttp.ClientSession() as session:
        status["code"] = 503
        await wait_for(lambda: not ub.healthy, 5.0)
        answers = Counter([(await get(session, proxy_url(server)))[1] for _ in range(20)])
        assert answers == {"a": 20}

        status["code"] = 200
        await wait_for(lambda: ub.healthy, 5.0)
        answers = Counter([(await get(session, proxy_url(server)))[1] for _ in range(20)])
        assert answers == {"a": 10, "b": 10}

        async with session.get(f"{server.admin.url}/metrics") as resp:  # type: ignore[union-attr]
            metrics = await resp.text()
    down = messages(caplog, f"{b.url[7:]} is DOWN")
    assert down == [f"upstream main/{b.url[7:]} is DOWN: 2 consecutive checks failed "
                    "(last: status 503)"]  # fmt: skip
    assert len(messages(caplog, f"{b.url[7:]} is UP")) == 1
    assert not messages(caplog, f"{a.url[7:]} is")  # a never changed: nothing logged
    assert ub.health_checks["failure"] >= 2 and ub.health_checks["success"] >= 2
    line = (f'aiolb_health_checks_total{{pool="main",result="failure",'
            f'upstream="{b.url[7:]}"}} {float(ub.health_checks["failure"])}')  # fmt: skip
    assert line in metrics


async def test_tcp_check_marks_a_refusing_upstream_down_and_says_why(
    proxy: MakeProxy, recorders: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "aiolb")
    a = await recorders("a")
    dead = f"http://{HOST}:{closed_port()}"
    server = await proxy(make_config([a.url, dead], pool={
        "health_check": {"active": {**FAST_CHECK, "type": "tcp"}}}))  # fmt: skip
    await wait_for(lambda: not upstream_of(server, dead).healthy, 5.0)
    assert upstream_of(server, a.url).healthy
    assert messages(caplog, "is DOWN") == [
        f"upstream main/{dead[7:]} is DOWN: 2 consecutive checks failed "
        "(last: connection refused)"
    ]


async def test_a_probe_that_times_out_fails_with_that_reason(
    proxy: MakeProxy, recorders: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "aiolb")
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()  # never answers while the test runs
        return web.Response(text="late")

    a = await recorders("a")
    b = await recorders("b", {"/healthz": slow})
    server = await proxy(make_config([a.url, b.url], pool={
        "health_check": {"active": {**FAST_CHECK, "timeout": "150ms"}}}))  # fmt: skip
    await wait_for(lambda: not upstream_of(server, b.url).healthy, 5.0)
    gate.set()
    assert messages(caplog, "is DOWN")[0].endswith("(last: timeout after 0.15s)")


async def test_initially_unhealthy_upstreams_serve_once_checks_pass_and_503_before(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    status = {"code": 503}
    a = await recorders("a", health_app(status))
    server = await proxy(make_config([a.url], pool={"health_check": {
        "active": {**FAST_CHECK, "initial_state": "unhealthy"}}}))  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(server)) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
        assert not [s for s in a.seen if s.path == "/"]
        status["code"] = 200
        await wait_for(lambda: upstream_of(server, a.url).available, 5.0)
        assert await get(session, proxy_url(server)) == (200, "a")


async def test_flapping_health_does_not_flip_the_state(
    proxy: MakeProxy, recorders: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Probes alternately pass and fail: with rise 2 / fall 2 the state never changes."""
    caplog.set_level(logging.INFO, "aiolb")
    calls = {"n": 0}

    async def flapping(request: web.Request) -> web.Response:
        calls["n"] += 1
        return web.Response(status=200 if calls["n"] % 2 else 500)

    a = await recorders("a", {"/healthz": flapping})
    server = await proxy(make_config([a.url], pool={"health_check": {"active": FAST_CHECK}}))
    ua = upstream_of(server, a.url)
    await wait_for(lambda: ua.health_checks.get("failure", 0) >= 10, 10.0)
    assert ua.health_checks["success"] >= 10
    assert ua.healthy
    assert not messages(caplog, "is DOWN") and not messages(caplog, "is UP")


# -- retries ---------------------------------------------------------------------------------


async def test_an_upstream_that_never_answers_is_retried_after_the_per_try_timeout(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    hang = await raw_upstreams({b"/": None})
    good = await recorders("good")
    server = await proxy(make_config([hang.url, good.url], pool={
        "retries": {"retry_on": ["timeout"], "per_try_timeout": "200ms"},
        "health_check": {"passive": None}}))  # fmt: skip
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        started = loop.time()
        results = [await get(session, proxy_url(server)) for _ in range(6)]
        took = loop.time() - started
    assert results == [(200, "good")] * 6
    tried_first = len(hang.heads)
    assert tried_first >= 3  # round robin sent at least every other request there first
    assert server.pools["main"].retries == tried_first
    assert took >= tried_first * 0.15  # each of those waited for the per-try timeout


async def test_a_503_is_retried_on_another_upstream_when_asked(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    bad = await recorders("bad", {"/": unavailable})
    good = await recorders("good")
    server = await proxy(make_config([bad.url, good.url], pool={
        "retries": {"retry_on": [503]}}))  # fmt: skip
    async with aiohttp.ClientSession() as session:
        results = Counter([await get(session, proxy_url(server)) for _ in range(10)])
        assert results == {(200, "good"): 10}
        assert len(bad.seen) >= 5  # round robin sent at least every other request there
        assert server.pools["main"].retries == len(bad.seen)

        # without retry_on 503 the upstream's answer is the client's answer
        plain = await proxy(make_config([bad.url, good.url]))
        results = Counter([await get(session, proxy_url(plain)) for _ in range(10)])
    assert results == {(503, "busy"): 5, (200, "good"): 5}


async def retry_setup(proxy: MakeProxy, recorders: MakeRecorder, first: str) -> tuple[
    ProxyServer, Recorder
]:
    """``first`` is the only primary (it fails); ``good`` is the backup that retries
    reach. Passive ejection off, so that every request tries ``first`` first."""
    good = await recorders("good")
    server = await proxy(make_config([first], pool={
        "upstreams": [{"url": first}, {"url": good.url, "backup": True}],
        "health_check": {"passive": None}}))  # fmt: skip
    return server, good


async def test_idempotent_request_with_a_small_body_is_replayed_elsewhere(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    reset = await raw_upstreams({b"/": b""}, close_after={b"/"})  # reads it all, answers nothing
    server, good = await retry_setup(proxy, recorders, reset.url)
    body = os.urandom(16 * 1024)
    async with aiohttp.ClientSession() as session:
        async with session.put(proxy_url(server), data=body) as resp:
            assert (resp.status, await resp.text()) == (200, "good")
    assert len(reset.heads) == 1
    assert [s.method for s in good.seen] == ["PUT"]


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_a_body_streamed_past_the_retry_buffer_is_not_retried(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any, method: str
) -> None:
    reset = await raw_upstreams({b"/": b""}, close_after={b"/"})
    server, good = await retry_setup(proxy, recorders, reset.url)
    body = os.urandom(256 * 1024)  # > the 64 KiB retry buffer

    async def chunks() -> Any:
        for i in range(0, len(body), 16 * 1024):
            yield body[i : i + 16 * 1024]

    async with aiohttp.ClientSession() as session:
        async with session.request(method, proxy_url(server), data=chunks()) as resp:
            assert resp.status == 502  # the original error
    assert len(reset.heads) == 1 and good.seen == []
    assert server.pools["main"].retries == 0


async def test_a_post_that_reached_the_upstream_is_not_retried(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    reset = await raw_upstreams({b"/": b""}, close_after={b"/"})
    server, good = await retry_setup(proxy, recorders, reset.url)
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_url(server), data=b"order=1") as resp:
            assert resp.status == 502
    assert len(reset.heads) == 1 and good.seen == []


async def test_a_post_that_never_left_the_proxy_is_retried(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    server, good = await retry_setup(proxy, recorders, f"http://{HOST}:{closed_port()}")
    async with aiohttp.ClientSession() as session:
        async with session.post(proxy_url(server), data=b"order=1") as resp:
            assert (resp.status, await resp.text()) == (200, "good")
    assert [(s.method, s.path) for s in good.seen] == [("POST", "/")]


async def test_retries_avoid_an_upstream_that_just_failed_for_others(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """Two of three upstreams die together and passive health may eject only one: a
    retry prefers the upstream with no recent failure, so after the first requests
    have found the dead ones, no retry lands on the second dead one."""
    good = await recorders("good")
    dead = [f"http://{HOST}:{closed_port()}" for _ in range(2)]
    server = await proxy(make_config([*dead, good.url], pool={
        "health_check": {"passive": {"consecutive_failures": 1000}},
        "retries": {"budget": {"min_retries_per_second": 100}}}))  # fmt: skip
    async with aiohttp.ClientSession() as session:
        results = Counter([(await get(session, proxy_url(server)))[0] for _ in range(60)])
    assert results[200] >= 58 and set(results) <= {200, 502}
    assert server.pools["main"].retries >= 38  # two thirds started on a dead upstream


async def test_a_freshly_started_pool_retries_every_request_that_needs_it(
    proxy: MakeProxy, recorders: MakeRecorder, raw_upstreams: Any
) -> None:
    """One of two upstreams never answers; 20 GETs, 4 at a time, on a proxy that has
    just started and so has earned no 20% budget yet: the reserve (a rate, 10 a second
    by default) lets every one that hit the silent upstream be retried."""
    hang = await raw_upstreams({b"/": None})
    good = await recorders("good")
    server = await proxy(make_config([hang.url, good.url], pool={
        "retries": {"attempts": 2, "retry_on": ["connect_failure", "timeout"],
                    "per_try_timeout": "500ms"}}))  # fmt: skip
    statuses = Counter[int]()

    async def client(session: aiohttp.ClientSession) -> None:
        for _ in range(5):
            status, _ = await get(session, proxy_url(server))
            statuses[status] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(4)))
    assert statuses == {200: 20}
    assert len(good.seen) == 20
    assert server.pools["main"].retries == len(hang.heads) >= 2
    assert server.pools["main"].retry.budget.denied == 0


async def test_an_outage_of_every_upstream_stays_within_the_retry_budget(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """Every upstream answers 503 and 503 is retryable with 3 attempts: without a budget
    the upstreams would see 3x the requests; with the default 20% budget, at most 1.2x
    plus the reserve's 10 a second, and every client gets its 503."""

    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    ups = [await recorders(f"u{i}", {"/": unavailable}) for i in range(3)]
    server = await proxy(make_config([u.url for u in ups], pool={
        "retries": {"attempts": 3, "retry_on": [503]}}))  # fmt: skip
    total, statuses = 400, Counter[int]()

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        for _ in range(n):
            async with session.get(proxy_url(server)) as resp:
                statuses[resp.status] += 1
                await resp.read()

    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        started = loop.time()
        await asyncio.gather(*(client(session, total // 20) for _ in range(20)))
        seconds = loop.time() - started
    attempts = sum(len(u.seen) for u in ups)
    assert statuses == {503: total}
    # the reserve starts with one second's worth (10) and refills at 10 a second
    assert total < attempts <= total * 1.2 + 10 * seconds + 10 + 1  # +1: decay rounding
    assert attempts < total * 2  # far below the 3x that 3 attempts would allow
    assert server.pools["main"].retry.budget.denied > 0


async def test_no_available_upstream_answers_503_with_retry_after(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    a = await recorders("a")
    server = await proxy(make_config([a.url]))
    upstream_of(server, a.url).enabled = False
    server.pools["main"].rebuild()
    async with aiohttp.ClientSession() as session, session.get(proxy_url(server)) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert a.seen == []


# -- circuit breaking ----------------------------------------------------------------------


async def test_max_connections_queues_then_refuses_at_once(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    gate = asyncio.Event()
    active = {"now": 0, "max": 0}

    async def slow(request: web.Request) -> web.Response:
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        await gate.wait()
        active["now"] -= 1
        return web.Response(text="done")

    a = await recorders("a", {"/": slow})
    server = await proxy(make_config([a.url], pool={
        "circuit_breaker": {"max_connections": 2, "max_pending": 2, "queue_timeout": "10s"}}))
    pool = server.pools["main"]
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.ensure_future(get(session, proxy_url(server))) for _ in range(6)]
        await wait_for(lambda: active["now"] == 2 and pool.pending == 2 and pool.overflows == 2)
        refused = [t for t in tasks if t.done()]
        assert [t.result()[0] for t in refused] == [503, 503]  # at once, not after a wait
        gate.set()
        results = Counter([r[0] for r in await asyncio.gather(*tasks)])
    assert results == {200: 4, 503: 2}
    assert active["max"] == 2  # the upstream never saw more than max_connections
    assert upstream_of(server, a.url).conns <= 2 and pool.pending == 0


async def test_a_request_waiting_past_the_queue_timeout_gets_503(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    gate = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response(text="done")

    a = await recorders("a", {"/": slow})
    server = await proxy(make_config([a.url], pool={
        "circuit_breaker": {"max_connections": 1, "queue_timeout": "200ms"}}))
    async with aiohttp.ClientSession() as session:
        first = asyncio.ensure_future(get(session, proxy_url(server)))
        await wait_for(lambda: len(a.seen) == 1)
        assert (await get(session, proxy_url(server)))[0] == 503
        gate.set()
        assert await first == (200, "done")
    assert server.pools["main"].overflows == 1 and server.pools["main"].pending == 0


# -- an upstream process killed under load ---------------------------------------------------


class UpstreamProcess:
    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.upstream_process", "--port", str(self.port),
            "--name", self.name, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert line.strip() == b"ready", line

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


async def test_sigkill_of_an_upstream_under_load_fails_no_request(proxy: MakeProxy) -> None:
    procs = [UpstreamProcess(f"p{i}", closed_port()) for i in range(3)]
    for p in procs:
        await p.start()
    try:
        interval, rise = 0.2, 2
        server = await proxy(make_config([p.url for p in procs], pool={"health_check": {
            "active": {"path": "/healthz", "interval": "200ms", "timeout": "200ms",
                       "healthy_threshold": rise, "unhealthy_threshold": 2},
            "passive": {"consecutive_failures": 3, "ejection_time": "30s"}}}))  # fmt: skip
        victim = procs[1]
        dead = upstream_of(server, victim.url)
        answers: Counter[str] = Counter()
        failures: list[str] = []
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                try:
                    status, text = await get(session, proxy_url(server))
                    if status == 200:
                        answers[text] += 1
                    else:
                        failures.append(f"{status} {text[:80]}")
                except aiohttp.ClientError as exc:
                    failures.append(repr(exc))

        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session:
            clients = [asyncio.ensure_future(client(session)) for _ in range(16)]
            await wait_for(lambda: answers["p1"] >= 50, 10.0)
            await victim.kill()
            killed_at = answers.total()
            await wait_for(lambda: not dead.available, 5.0)
            served_by_dead = answers["p1"]
            await wait_for(lambda: answers.total() >= killed_at + 300, 10.0)
            assert answers["p1"] == served_by_dead  # out of rotation
            # attempts on the dead upstream: the in-flight ones, then connects refused
            # until the passive threshold ejected it
            assert dead.stats.connect_errors <= 3 + 16

            await victim.start()
            restarted = loop.time()
            await wait_for(lambda: dead.available, interval * rise + interval + 1.0)
            back_after = loop.time() - restarted
            await wait_for(lambda: answers["p1"] > served_by_dead + 20, 5.0)
            stop.set()
            await asyncio.gather(*clients)
        assert failures == []
        assert back_after <= interval * rise + interval + 1.0
        assert dead.ejections == 1
    finally:
        for p in procs:
            await p.kill()
