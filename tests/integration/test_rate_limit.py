"""``rate_limit`` through real sockets: the answer, every key, the allowance over a
window against the bucket's exact arithmetic, workers sharing one limit, reloads
keeping the buckets, and the Redis store (two instances, an outage under load,
concurrent decisions sharing round trips)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config
from proxy.filters.chain import Paused
from proxy.runtime.server import ProxyServer
from tests.admin_support import samples, scrape
from tests.support import (
    HOST,
    Aiolb,
    Recorder,
    RedisServer,
    make_config,
    proxy_url,
    read_response,
    wait_for,
)

Proxy = Callable[..., Awaitable[ProxyServer]]
Recorders = Callable[..., Awaitable[Recorder]]


def limited(*filters: dict[str, Any], upstream: str, name: str | None = None) -> Config:
    route: dict[str, Any] = {"pool": "main", "filters": [{"rate_limit": f} for f in filters]}
    if name:
        route["name"] = name
    # one connection carries every request of a test (no Connection: close at 1000)
    unlimited = {"limits": {"max_requests_per_connection": None}}
    return make_config([upstream], routes=[route], listener=unlimited)


async def statuses(url: str, n: int, headers: dict[str, str] | None = None) -> list[int]:
    async with aiohttp.ClientSession() as s:
        out = []
        for _ in range(n):
            async with s.get(url, headers=headers) as r:
                await r.read()
                out.append(r.status)
        return out


async def test_over_the_limit_is_a_429_with_the_draft_headers(
    proxy: Proxy, recorders: Recorders
) -> None:
    rec = await recorders("a")
    server = await proxy(limited({"rate": "1/m", "burst": 3, "key": "route"}, upstream=rec.url,
                                 name="api"))  # fmt: skip
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.get(proxy_url(server)) as r:
                assert r.status == 200 and "RateLimit" not in r.headers
        async with s.get(proxy_url(server)) as r:
            assert r.status == 429
            assert r.headers["Retry-After"] == "60"  # one token a minute, none left
            assert r.headers["RateLimit-Policy"] == '"rate_limit";q=3;w=180'
            assert r.headers["RateLimit"] == '"rate_limit";r=0;t=60'
            assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert await r.text() == "429 Too Many Requests: rate limit exceeded\n"
    assert len(rec.seen) == 3
    text = await scrape(server)
    assert samples(text, "aiolb_rate_limited_total") == {
        (("filter", "rate_limit"), ("route", "api")): 1.0}  # fmt: skip
    codes = samples(text, "aiolb_requests_total")
    assert codes[(("code", "429"), ("listener", "test"), ("method", "GET"), ("pool", "main"),
                  ("upstream", ""))] == 1.0  # fmt: skip


async def test_the_allowance_over_a_window_is_the_buckets_exact_arithmetic(
    proxy: Proxy, recorders: Recorders
) -> None:
    """Requests sent back to back for about a second: the admitted count is what a
    bucket of 10 refilled at 40/s allows between the first decision and the last, each
    decision known to lie between its request's send and its answer."""
    rec = await recorders("a")
    rate, size = 40.0, 10
    server = await proxy(limited({"rate": "40/s", "burst": size, "key": "route"},
                                 upstream=rec.url))  # fmt: skip
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    admitted = 0
    sends, answers = [], []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        sends.append(time.monotonic())
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, _ = await read_response(reader)
        answers.append(time.monotonic())
        admitted += status == b"HTTP/1.1 200 OK"
    writer.close()
    most = size + rate * (answers[-1] - sends[0])
    least = size + rate * (sends[-1] - answers[0]) - 1  # the last token may be partial
    assert least <= admitted <= most, (least, admitted, most, len(sends))
    assert len(sends) > 2 * admitted  # the test did go over the limit


@pytest.mark.parametrize(
    ("key", "first", "second", "keyless"),
    [
        ("header:X-User", {"X-User": "alice"}, {"X-User": "bob"}, {}),
        ("cookie:sid", {"Cookie": "a=1; sid=one"}, {"Cookie": "sid=two"}, {"Cookie": "a=1"}),
        ("query:k", "/?k=1", "/?k=2", "/?other=1"),
        ("path", "/a?k=1", "/b?k=1", None),
    ],
)
async def test_each_key_has_its_own_bucket(
    proxy: Proxy, recorders: Recorders, key: str, first: Any, second: Any, keyless: Any
) -> None:
    rec = await recorders("a")
    server = await proxy(limited({"rate": "1/m", "burst": 2, "key": key}, upstream=rec.url))

    async def two(what: Any) -> list[int]:
        if isinstance(what, str):
            return await statuses(proxy_url(server, what), 3)
        return await statuses(proxy_url(server), 3, headers=what)

    assert await two(first) == [200, 200, 429]
    assert await two(second) == [200, 200, 429]  # a key of its own
    assert await two(first) == [429, 429, 429]
    if keyless is not None:  # requests without the key share one bucket
        assert await two(keyless) == [200, 200, 429]


async def test_client_ip_keys_and_two_named_limits_on_one_route(
    proxy: Proxy, recorders: Recorders
) -> None:
    rec = await recorders("a")
    server = await proxy(limited(
        {"rate": "1/m", "burst": 2, "key": "client_ip", "name": "per_client"},
        {"rate": "1/m", "burst": 3, "key": "route", "name": "whole_route"},
        upstream=rec.url,
    ))  # fmt: skip
    port = server.listeners[0].port

    async def one(source: str) -> bytes:
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = await read_response(reader)
        writer.close()
        return status + b" " + headers.get(b"ratelimit", b"-")

    got = [await one(source) for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1",
                                            "127.0.0.2", "127.0.0.3")]  # fmt: skip
    assert got == [
        b"HTTP/1.1 200 OK -", b"HTTP/1.1 200 OK -",
        b'HTTP/1.1 429 Too Many Requests "per_client";r=0;t=60',
        b"HTTP/1.1 200 OK -",  # another client: its own bucket; the route's third token
        b'HTTP/1.1 429 Too Many Requests "whole_route";r=0;t=60',
    ]  # fmt: skip
    assert samples(await scrape(server), "aiolb_rate_limited_total") == {
        (("filter", "per_client"), ("route", "test/0")): 1.0,
        (("filter", "whole_route"), ("route", "test/0")): 1.0,
    }


async def test_a_reload_keeps_the_buckets(recorders: Recorders, tmp_path: Path) -> None:
    rec = await recorders("a")
    path = tmp_path / "aiolb.yaml"
    path.write_text(f"""listeners:
  - name: test
    bind: "{HOST}:0"
    routes:
      - pool: main
        filters: [{{rate_limit: {{rate: 1/m, burst: 2, key: route}}}}]
pools:
  main:
    upstreams: [{{url: "{rec.url}"}}]
admin:
  bind: "{HOST}:0"
""")
    from proxy.config import load_config

    server = ProxyServer(load_config(path), config_path=str(path))
    await server.start()
    try:
        assert await statuses(proxy_url(server), 3) == [200, 200, 429]
        assert await server.reload() == []
        assert await statuses(proxy_url(server), 1) == [429]
        good = path.read_text()  # a reload with a bad filter is refused; the old one serves
        path.write_text(
            good.replace("burst: 2", "burst: 0").replace(
                "key: route}}", "key: route}}, {python: tests.filter_support:NotAFilter}"
            )
        )
        assert await server.reload() == [
            f"{path}:6: listeners[0].routes[0].filters[0].rate_limit.burst: must be >= 1"
        ]
        path.write_text(good.replace("filters: [", "filters: [{python: tests.nothere:X}, "))
        problems = await server.reload()
        assert problems == [f"{path}:6: listeners[0].routes[0].filters[0].python: cannot "
                            "import tests.nothere: ModuleNotFoundError: No module named "
                            "'tests.nothere'"]  # fmt: skip
        assert await statuses(proxy_url(server), 1) == [429]
        assert samples(await scrape(server), "aiolb_rate_limited_total") == {
            (("filter", "rate_limit"), ("route", "test/0")): 3.0}  # fmt: skip
    finally:
        await server.shutdown(timeout=1.0)


async def _blast(
    port: int, seconds: float, connections: int, pids: set[str] | None = None
) -> tuple[int, int, float, float]:
    """Requests back to back on ``connections`` connections for ``seconds``: (admitted,
    refused, first send, last answer)."""
    first, last = time.monotonic(), 0.0
    counts = [0, 0]

    async def one() -> None:
        nonlocal last
        reader, writer = await asyncio.open_connection(HOST, port)
        end = first + seconds
        while time.monotonic() < end:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await read_response(reader)
            counts[status != b"HTTP/1.1 200 OK"] += 1
            if pids is not None and b"x-worker-pid" in headers:
                pids.add(headers[b"x-worker-pid"].decode())
        last = max(last, time.monotonic())
        writer.close()

    await asyncio.gather(*(one() for _ in range(connections)))
    return counts[0], counts[1], first, last


async def test_with_workers_the_memory_store_holds_for_the_instance(
    aiolb: Callable[..., Awaitable[Aiolb]], recorders: Recorders
) -> None:
    rec = await recorders("a")
    rate, size = 20.0, 10
    proc = await aiolb(
        f"""listeners:
  - name: public
    bind: "{HOST}:0"
    limits: {{max_requests_per_connection: null}}
    routes:
      - pool: web
        filters:
          - rate_limit: {{rate: 20/s, burst: {size}, key: route}}
          - python: tests.filter_support:WorkerPid
pools:
  web:
    upstreams: [{{url: "{rec.url}"}}]
admin:
  bind: "{HOST}:0"
workers: 2
""",
        workers=2,
    )
    pids: set[str] = set()
    admitted, refused, first, last = await _blast(proc.port, 1.5, 16, pids)
    assert pids == {str(p) for p in proc.worker_pids()}  # both workers answered
    assert admitted <= size + rate * (last - first), (admitted, refused)
    # per worker, each would admit its own bucket's worth: about twice as many
    assert admitted >= size + rate * (last - first - 0.5) - 1, (admitted, refused)
    text = await proc.metrics()
    assert samples(text, "aiolb_rate_limited_total") == {
        (("filter", "rate_limit"), ("route", "public/0")): float(refused)}  # fmt: skip


# --- the Redis store ------------------------------------------------------------------------


def redis_limit(url: str, upstream: str, fail_open: bool = True, rate: str = "20/s",
                burst: int = 5) -> Config:  # fmt: skip
    store = {"type": "redis", "url": url, "fail_open": fail_open, "timeout": "200ms"}
    return limited({"rate": rate, "burst": burst, "key": "route", "store": store},
                   upstream=upstream, name="shared")  # fmt: skip


async def test_two_instances_share_one_limit_through_redis(
    proxy: Proxy, recorders: Recorders, redis_server: RedisServer
) -> None:
    rec = await recorders("a")
    rate, size = 20.0, 5
    first = await proxy(redis_limit(redis_server.url, rec.url))
    second = await proxy(redis_limit(redis_server.url, rec.url))
    results = await asyncio.gather(
        _blast(first.listeners[0].port, 1.0, 4), _blast(second.listeners[0].port, 1.0, 4)
    )
    admitted = sum(r[0] for r in results)
    start, end = min(r[2] for r in results), max(r[3] for r in results)
    assert admitted <= size + rate * (end - start) + 1, admitted
    assert admitted >= size + rate * (end - start - 0.5) - 1, admitted
    assert all(r[0] > 0 and r[1] > 0 for r in results)  # each admitted and refused some


async def test_redis_killed_under_load_fails_open_and_recovers(
    proxy: Proxy, recorders: Recorders, redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    rec = await recorders("a")
    server = await proxy(redis_limit(redis_server.url, rec.url, rate="5/s", burst=5))
    port = server.listeners[0].port
    seen: list[int] = []
    stop = asyncio.Event()

    async def load() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        while not stop.is_set():
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, _ = await read_response(reader)
            seen.append(int(status.split()[1]))
            await asyncio.sleep(0.005)
        writer.close()

    with caplog.at_level(logging.INFO, logger="aiolb"):
        task = asyncio.ensure_future(load())
        await wait_for(lambda: 429 in seen)  # limiting through Redis
        redis_server.kill()
        mark = len(seen)
        await wait_for(lambda: len(seen) > mark + 40)  # answered all along: admitted
        outage = seen[mark + 5 :]
        assert set(outage) == {200}, outage
        redis_server.start()
        await redis_server.ready()
        again = len(seen)
        await wait_for(lambda: 429 in seen[again:], timeout=10)  # limiting once more
        stop.set()
        await task
    lines = [r.getMessage() for r in caplog.records]
    assert len([m for m in lines if "unreachable" in m]) == 1, lines
    assert len([m for m in lines if "answers again" in m]) == 1, lines
    assert set(seen) <= {200, 429}  # never a 5xx, never a dropped connection
    errors = samples(await scrape(server), "aiolb_rate_limit_store_errors_total")
    assert errors[(("filter", "rate_limit"), ("route", "shared"))] >= 40 - 5


async def test_redis_down_with_fail_open_false_is_a_503(
    proxy: Proxy, recorders: Recorders, redis_server: RedisServer
) -> None:
    rec = await recorders("a")
    server = await proxy(redis_limit(redis_server.url, rec.url, fail_open=False))
    assert await statuses(proxy_url(server), 1) == [200]
    redis_server.kill()
    async with aiohttp.ClientSession() as s, s.get(proxy_url(server)) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "1"
        assert "rate limit cannot be checked" in await r.text()
    assert len(rec.seen) == 1


async def test_concurrent_requests_share_redis_round_trips_and_stay_exact(
    proxy: Proxy, recorders: Recorders, redis_server: RedisServer
) -> None:
    """500 requests on 100 connections at once: each decided, exactly the burst
    admitted, in far fewer Redis commands than decisions (one per bucket and loop
    iteration)."""
    rec = await recorders("a")
    server = await proxy(redis_limit(redis_server.url, rec.url, rate="1/m", burst=50))
    port = server.listeners[0].port

    async def five() -> list[bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 5)  # pipelined
        got = [(await read_response(reader))[0] for _ in range(5)]
        writer.close()
        return got

    answers = [s for got in await asyncio.gather(*(five() for _ in range(100))) for s in got]
    assert len(answers) == 500
    assert answers.count(b"HTTP/1.1 200 OK") == 50, set(answers)
    assert answers.count(b"HTTP/1.1 429 Too Many Requests") == 450
    reader, writer = await asyncio.open_connection(HOST, redis_server.port)
    writer.write(b"INFO commandstats\r\n")
    stats = (await asyncio.wait_for(reader.read(65536), 5)).decode()
    writer.close()
    calls = int(stats.split("cmdstat_evalsha:calls=")[1].split(",")[0])
    assert calls < 250, calls  # decisions shared commands


class SilentRedis:
    """A server that accepts connections and never answers: a Redis that hangs."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.accepted = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._hold, HOST, 0)
        return f"redis://{HOST}:{self.server.sockets[0].getsockname()[1]}/0"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        while await reader.read(65536):  # read what comes, answer nothing
            pass
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def _waiting(server: ProxyServer) -> Any:
    """An exchange waiting on a filter hook's future (``Paused``), or None."""
    for conn in server.listeners[0].connections:
        ex = conn.exchange
        if ex is not None and isinstance(getattr(ex, "task", None), Paused):
            return ex
    return None


@pytest.mark.parametrize("fail_open", [True, False])
async def test_a_silent_redis_is_the_stores_answer_within_its_timeout_never_early(
    proxy: Proxy, recorders: Recorders, fail_open: bool
) -> None:
    """Redis accepts and never answers: the decision waits (on the store's future, no
    task), then the store's answer comes after its 200 ms timeout, well before the
    pool's response header timeout; the open circuit then answers at once."""
    rec = await recorders("a")
    silent = SilentRedis()
    url = await silent.start()
    try:
        server = await proxy(redis_limit(url, rec.url, fail_open=fail_open))
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        started = time.monotonic()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: _waiting(server) is not None)
        status, _, _ = await read_response(reader)
        waited = time.monotonic() - started
        assert status == (b"HTTP/1.1 200 OK" if fail_open else b"HTTP/1.1 503 Service Unavailable")
        assert 0.2 <= waited < 1.5, waited
        started = time.monotonic()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the circuit is open: not asked
        again, _, _ = await read_response(reader)
        assert again == status and time.monotonic() - started < 0.15
        writer.close()
        errors = samples(await scrape(server), "aiolb_rate_limit_store_errors_total")
        assert errors[(("filter", "rate_limit"), ("route", "shared"))] == 2.0
        assert len(rec.seen) == (2 if fail_open else 0)
    finally:
        await silent.close()


async def test_a_client_gone_while_redis_decides_is_dropped_and_not_counted(
    proxy: Proxy, recorders: Recorders, caplog: pytest.LogCaptureFixture
) -> None:
    rec = await recorders("a")
    silent = SilentRedis()
    url = await silent.start()
    try:
        server = await proxy(redis_limit(url, rec.url, fail_open=False))
        listener = server.listeners[0]
        with caplog.at_level(logging.INFO, logger="aiolb"):
            _, writer = await asyncio.open_connection(HOST, listener.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_for(lambda: _waiting(server) is not None)
            ex = _waiting(server)
            future = ex.task.future
            writer.close()
            await wait_for(lambda: not listener.connections)
            assert future.cancelled() and ex.task is None and ex.done
            # the store's timeout still passes (its connection ends), answering nobody
            await wait_for(lambda: any("unreachable" in r.getMessage() for r in caplog.records))
        text = await scrape(server)
        assert samples(text, "aiolb_rate_limit_store_errors_total") == {
            (("filter", "rate_limit"), ("route", "shared")): 0.0}  # fmt: skip
        assert sum(samples(text, "aiolb_requests_total").values()) == 0.0
        assert not rec.seen
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
            m for m in (r.getMessage() for r in caplog.records) if "unreachable" in m
        ]
    finally:
        await silent.close()


async def test_the_filters_after_a_redis_rate_limit_run_when_it_admits(
    proxy: Proxy, recorders: Recorders, redis_server: RedisServer
) -> None:
    rec = await recorders("a")
    store = {"type": "redis", "url": redis_server.url, "timeout": "1s"}
    limit = {"rate_limit": {"rate": "1/m", "burst": 2, "key": "route", "store": store}}
    stamp = {"headers": {"request": {"set": {"X-After": "yes"}}}}
    config = make_config([rec.url], routes=[{"pool": "main", "filters": [limit, stamp]}])
    server = await proxy(config)
    assert await statuses(proxy_url(server), 3) == [200, 200, 429]
    assert [s.headers.get("X-After") for s in rec.seen] == ["yes", "yes"]
