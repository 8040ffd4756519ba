"""Route filters through real sockets: the mechanism (phases, sync and async hooks,
failures, the fast path kept where it may be) and the headers, rewrite, redirect,
sticky and access filters. Rate limits: ``test_rate_limit.py``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.config.models import AccessLogSpec
from proxy.filters import LocalResponse
from proxy.filters.chain import Paused
from proxy.forwarding.exchange import Exchange
from proxy.runtime.server import ProxyServer
from tests.admin_support import samples, scrape
from tests.filter_support import Promise
from tests.h2_support import exchange as h2_exchange
from tests.support import (
    HOST,
    RawUpstream,
    Recorder,
    make_config,
    proxy_url,
    raw_exchange,
    read_response,
    wait_for,
)

Proxy = Callable[..., Awaitable[ProxyServer]]
Recorders = Callable[..., Awaitable[Recorder]]


def route(*filters: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{"match": {"path_prefix": "/"}, "pool": "main", "filters": list(filters), **extra}]


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], str, aiohttp.ClientResponse]:
    async with aiohttp.ClientSession() as s, s.get(url, allow_redirects=False, **kw) as r:
        return r.status, dict(r.headers), await r.text(), r


async def from_address(port: int, source: str, request: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """One request from a chosen loopback source address (127.0.0.2 ...)."""
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        writer.write(request)
        status, headers, _ = await read_response(reader)
        return status, headers
    finally:
        writer.close()


# --- the mechanism --------------------------------------------------------------------


async def test_a_route_without_filters_has_no_chain_and_keeps_the_fast_path(
    proxy: Proxy, recorders: Recorders, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = await recorders("a")
    server = await proxy(make_config([rec.url], routes=[
        {"match": {"path_prefix": "/plain"}, "pool": "main"},
        {"match": {"path_prefix": "/request-only"}, "pool": "main",
         "filters": [{"headers": {"request": {"set": {"X-A": "1"}}}}]},
        {"match": {"path_prefix": "/"}, "pool": "main",
         "filters": [{"headers": {"response": {"set": {"X-B": "2"}}}}]},
    ]))  # fmt: skip
    relayed: list[str] = []
    whole = Exchange.relay_whole

    def counting(ex: Exchange, *args: Any) -> bool:
        done = whole(ex, *args)
        if done:
            relayed.append(ex.target.decode())
        return done

    monkeypatch.setattr(Exchange, "relay_whole", counting)
    router = server.listeners[0].router
    assert router.route(None, b"/plain").chain is None  # type: ignore[union-attr]
    for path in ("/plain", "/request-only", "/response", "/plain", "/request-only", "/response"):
        status, headers, body, _ = await get(proxy_url(server, path))
        assert (status, body) == (200, "a")
    # a response whose head was seen before (the head cache) takes relay_whole on the
    # routes without response filters, never on the one with them
    assert "/plain" in relayed and "/request-only" in relayed
    assert "/response" not in relayed
    assert headers["X-B"] == "2"
    assert [s.headers.get("X-A") for s in rec.seen] == [None, "1", None] * 2


@pytest.mark.parametrize("mode", ["sync", "async", "future"])
async def test_every_phase_of_a_python_filter(
    proxy: Proxy, recorders: Recorders, mode: str
) -> None:
    rec = await recorders("a")
    how: bool | str = mode if mode == "future" else mode == "async"
    spec = {"python": "tests.filter_support:Stamp", "options": {"async": how}}
    server = await proxy(make_config([rec.url], routes=route(spec)))
    status, headers, body, _ = await get(proxy_url(server, "/x?y=1"))
    assert (status, body) == (200, "a")
    seen = rec.seen[-1]
    assert seen.headers["X-Stamp-Request"] == "GET 127.0.0.1"
    assert seen.headers["X-Stamp-Upstream"] == f"{HOST}:{rec.port}"
    assert headers["X-Stamp-Response"] == "200"
    assert headers["X-Stamp-State"] == seen.headers["X-Request-ID"]  # state across phases
    status, headers, body, _ = await get(proxy_url(server, "/teapot"))
    assert status == 418 and body == "a" and headers["X-Stamp-Response"] == "200"
    status, headers, body, _ = await get(proxy_url(server, "/deny"))
    assert (status, body, headers["WWW-Authenticate"]) == (401, "denied by a filter\n", "Stamp")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert len(rec.seen) == 2  # the denied request never went upstream


async def test_an_async_response_filter_holds_a_large_streamed_body(
    proxy: Proxy, recorders: Recorders
) -> None:
    from aiohttp import web

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(64):
            await response.write(bytes([65 + i % 26]) * 16384)
        await response.write_eof()
        return response

    rec = await recorders("a", {"/big": big})
    spec = {"python": "tests.filter_support:Stamp", "options": {"async": True}}
    server = await proxy(make_config([rec.url], routes=route(spec)))
    for _ in range(2):  # and the connection is reused after it
        status, headers, body, _ = await get(proxy_url(server, "/big"))
        assert status == 200 and headers["X-Stamp-Response"] == "200"
        assert body == "".join(chr(65 + i % 26) * 16384 for i in range(64))


async def test_an_async_response_filter_and_a_head_request(
    proxy: Proxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]]
) -> None:
    up = await raw_upstreams({b"/h": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"})
    spec = {"python": "tests.filter_support:Stamp", "options": {"async": True}}
    server = await proxy(make_config([up.url], routes=route(spec)))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    for _ in range(2):
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Stamp-Response: 200" in head
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await asyncio.wait_for(read_response(reader), 5)
    assert status == b"HTTP/1.1 200 OK" and body == b"ok"
    writer.close()


@pytest.mark.parametrize(
    ("phase", "how", "message"),
    [
        ("request", "raise", "RuntimeError: boom in request"),
        ("request", "wrong", "TypeError: request_filter returned int, not None or a LocalResponse"),
        ("request", "async-raise", "ValueError: async boom in request"),
        ("request", "slow", "TimeoutError: not done within 0.3s"),
        ("response", "raise", "RuntimeError: boom in response"),
        ("response", "wrong", "TypeError: response_filter returned int, not None"),
        ("response", "async-raise", "ValueError: async boom in response"),
        ("response", "slow", "TimeoutError: not done within 0.3s"),
        ("request", "future-raise", "ValueError: future boom in request"),
        ("request", "future-slow", "TimeoutError: not done within 0.3s"),
        ("response", "future-raise", "ValueError: future boom in response"),
        ("response", "future-slow", "TimeoutError: not done within 0.3s"),
    ],
)
async def test_a_failing_filter_is_a_500_and_one_log_line(
    proxy: Proxy, recorders: Recorders, caplog: pytest.LogCaptureFixture,
    phase: str, how: str, message: str,
) -> None:  # fmt: skip
    rec = await recorders("a")
    spec = {"python": "tests.filter_support:Boom", "options": {"phase": phase, "how": how}}
    pool = {"timeouts": {"response_header": "300ms"}}
    server = await proxy(make_config([rec.url], routes=route(spec), pool=pool))
    with caplog.at_level(logging.INFO, logger="aiolb"):
        started = time.monotonic()
        status, _, body, _ = await get(proxy_url(server, "/x"))
        waited = time.monotonic() - started
    assert (status, body) == (500, "500 Internal Server Error\n")
    lines = [r.getMessage() for r in caplog.records if "filter python:" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"route test/0: {phase}_filter failed: {message}" in lines[0]
    assert "Traceback" not in caplog.text
    if how in ("raise", "async-raise"):
        assert "filter_support.py:" in lines[0]  # where it raised
    if how.endswith("slow"):
        assert waited >= 0.3, waited  # never before the timeout
    # the proxy goes on: the next request, on a path the filter lets through, passes
    status, _, body, _ = await get(proxy_url(server, "/ok"))
    assert (status, body) == (200, "a")


async def test_a_slow_async_request_filter_is_cancelled_when_the_client_leaves(
    proxy: Proxy, recorders: Recorders
) -> None:
    rec = await recorders("a")
    spec = {"python": "tests.filter_support:Boom", "options": {"phase": "request", "how": "slow"}}
    server = await proxy(make_config([rec.url], routes=route(spec)))
    _, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    listener = server.listeners[0]
    await _eventually(lambda: any(c.exchange is not None for c in listener.connections))
    exchange = next(c.exchange for c in listener.connections if c.exchange is not None)
    task = exchange.task  # type: ignore[union-attr]
    assert isinstance(task, asyncio.Task) and not task.done()
    writer.close()
    await _eventually(task.done)
    assert task.cancelled() and not rec.seen


def _promise(server: ProxyServer) -> Promise:
    """The route's ``Promise`` filter (its futures, as the requests asked them)."""
    chain = server.listeners[0].router.route(None, b"/").chain  # type: ignore[union-attr]
    assert chain is not None
    found = chain.filters[0][1]
    assert isinstance(found, Promise)
    return found


def _waiting(server: ProxyServer) -> Exchange | None:
    """The exchange that waits on a filter hook's future (``Paused``), if one does."""
    for conn in server.listeners[0].connections:
        ex = conn.exchange
        if isinstance(ex, Exchange) and isinstance(ex.task, Paused):
            return ex
    return None


async def test_a_future_request_hook_is_waited_on_without_a_task_and_the_next_hooks_run(
    proxy: Proxy, recorders: Recorders
) -> None:
    rec = await recorders("a")
    promise = {"python": "tests.filter_support:Promise"}
    stamp = {"python": "tests.filter_support:Stamp"}
    server = await proxy(make_config([rec.url], routes=route(promise, stamp)))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    await _eventually(lambda: _waiting(server))
    assert not rec.seen  # held at the phase: nothing upstream yet
    _promise(server).futures[0].set_result(None)
    status, _, body = await read_response(reader)
    assert (status, body) == (b"HTTP/1.1 200 OK", b"a")
    assert rec.seen[0].headers["X-Stamp-Request"] == "GET 127.0.0.1"  # the next hook ran
    writer.write(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
    await _eventually(lambda: len(_promise(server).futures) == 2)
    _promise(server).futures[1].set_result(LocalResponse(403, {}, "no\n"))
    status, _, body = await read_response(reader)
    assert (status, body) == (b"HTTP/1.1 403 Forbidden", b"no\n")
    assert len(rec.seen) == 1  # answered by the future's outcome: no later hook, no upstream
    writer.close()


async def test_a_future_hook_whose_client_leaves_is_cancelled_and_nothing_leaks(
    proxy: Proxy, recorders: Recorders, caplog: pytest.LogCaptureFixture
) -> None:
    rec = await recorders("a")
    spec = {"python": "tests.filter_support:Promise"}
    server = await proxy(make_config([rec.url], routes=route(spec)))
    listener = server.listeners[0]
    with caplog.at_level(logging.DEBUG):
        _, writer = await asyncio.open_connection(HOST, listener.port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        await _eventually(lambda: _waiting(server))
        writer.close()
        await _eventually(lambda: not listener.connections)
        first = _promise(server).futures[0]
        assert first.cancelled()
        # settled and gone in one iteration: the callback comes after the exchange ended
        _, writer = await asyncio.open_connection(HOST, listener.port)
        writer.write(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
        await _eventually(lambda: _waiting(server))
        ex = _waiting(server)
        assert ex is not None
        next(iter(listener.connections)).transport.abort()  # type: ignore[attr-defined]
        _promise(server).futures[1].set_result(None)
        await _eventually(lambda: not listener.connections and ex.done)
        writer.close()
        # the future's callback (scheduled by set_result) runs while this request does
        status, _, _, _ = await get(proxy_url(server, "/ok"))
    assert status == 200
    assert ex.task is None and ex.status == 0
    assert len(rec.seen) == 1  # only /ok reached the upstream
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    pool = server.pools["main"]
    assert all(u.active == 0 for u in pool.upstreams)
    codes = samples(await scrape(server), "aiolb_requests_total")
    assert sum(codes.values()) == 1.0  # the gone requests were never answered: not counted


@pytest.mark.parametrize("how", ["future-raise", "future-slow"])
async def test_a_future_request_hook_on_an_http2_stream(
    proxy: Proxy, recorders: Recorders, how: str
) -> None:
    """HTTP/2 streams wait on a hook's future the same way: the stamp's futures (both
    phases) go on, a failing one is a 500, one never settled is a 500 once the stream's
    exchange deadline passes (swept by the connection's tick), never before."""
    rec = await recorders("a")
    stamp = {"python": "tests.filter_support:Stamp", "options": {"async": "future"}}
    boom = {"python": "tests.filter_support:Boom", "options": {"phase": "request", "how": how}}
    pool = {"timeouts": {"response_header": "300ms"}}
    h2c = {"protocols": ["http/1.1", "h2c"]}
    server = await proxy(make_config([rec.url], routes=route(stamp, boom), pool=pool, listener=h2c))
    port = server.listeners[0].port

    def request(path: bytes) -> list[tuple[bytes, bytes]]:
        return [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"),
                (b":path", path)]  # fmt: skip

    head, body, _ = await h2_exchange(port, request(b"/ok"))
    assert dict(head)[b":status"] == b"200" and body == b"a"
    assert rec.seen[-1].headers["X-Stamp-Upstream"] == f"{HOST}:{rec.port}"
    started = time.monotonic()
    head, _, _ = await h2_exchange(port, request(b"/x"))
    waited = time.monotonic() - started
    assert dict(head)[b":status"] == b"500"
    if how == "future-slow":
        assert waited >= 0.3, waited
    assert len(rec.seen) == 1


async def _eventually(predicate: Callable[[], Any]) -> None:
    await wait_for(lambda: bool(predicate()))


# --- headers ----------------------------------------------------------------------------


async def test_headers_set_add_remove_on_both_sides_with_variables(
    proxy: Proxy, recorders: Recorders
) -> None:
    rec = await recorders("a")
    spec = {"headers": {
        "request": {"set": {"X-Client": "${client_ip}", "User-Agent": "aiolb-test",
                            "Host": "backend.internal"},
                    "add": {"X-Tag": "id=${request_id} host=${host} $${literal}"},
                    "remove": ["X-Secret"]},
        "response": {"set": {"Server": "aiolb"}, "add": {"X-Seen-Host": "${host}"},
                     "remove": ["X-Upstream"]},
    }}  # fmt: skip
    server = await proxy(make_config([rec.url], routes=route(spec)))
    request = (b"GET / HTTP/1.1\r\nHost: Example.COM:8080\r\nX-Secret: s\r\nX-Tag: first\r\n"
               b"X-Request-ID: rid-1\r\nUser-Agent: curl\r\n\r\n")  # fmt: skip
    reply = await raw_exchange(server.listeners[0].port, request + b"GET / HTTP/1.1\r\n"
                               b"Host: x\r\nConnection: close\r\n\r\n")  # fmt: skip
    seen = rec.seen[0].raw_headers
    sent = [(n.decode(), v.decode()) for n, v in seen]
    assert ("X-Client", "127.0.0.1") in sent and ("User-Agent", "aiolb-test") in sent
    assert [v for n, v in sent if n == "X-Tag"] == ["first", "id=rid-1 host=example.com ${literal}"]
    assert not [n for n, _ in sent if n == "X-Secret"]
    assert ("Host", "backend.internal") in sent
    assert ("X-Forwarded-Host", "Example.COM:8080") in sent  # what the client asked for
    head = reply.split(b"\r\n\r\n", 1)[0].decode() + "\r\n"
    assert "\r\nServer: aiolb\r\n" in head and "\r\nX-Seen-Host: example.com\r\n" in head
    assert "X-Upstream" not in head and head.count("Server:") == 1


# --- rewrite ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "sent", "forwarded"),
    [
        ({"strip_prefix": "/api"}, {"/api/users?x=1": "/users?x=1", "/api": "/", "/api/": "/",
                                    "/apix/a": "/apix/a", "/other": "/other"}, "/api"),
        ({"strip_prefix": "/api/"}, {"/api/users": "/users"}, "/api"),
        ({"replace_prefix": {"from": "/v1", "to": "/api/v1"}},
         {"/v1/items?q=2": "/api/v1/items?q=2", "/v1": "/api/v1", "/v10": "/v10"}, None),
        ({"path": {"from": r"^/u/(\d+)$", "to": r"/users/\1/profile"}},
         {"/u/42?tab=1": "/users/42/profile?tab=1", "/u/x": "/u/x"}, None),
        ({"path": {"from": "/(?P<word>[a-z]+)$", "to": r"/\g<word>.html"}}, {"/a/b": "/a/b.html"},
         None),
    ],
)  # fmt: skip
async def test_rewrite(
    proxy: Proxy, recorders: Recorders, spec: dict[str, Any], sent: dict[str, str],
    forwarded: str | None,
) -> None:  # fmt: skip
    rec = await recorders("a")
    server = await proxy(make_config([rec.url], routes=route({"rewrite": spec})))
    for path, upstream_path in sent.items():
        status, _, body, _ = await get(proxy_url(server, path))
        assert (status, body) == (200, "a")
        seen = rec.seen[-1]
        assert seen.path == upstream_path, path
        expected = forwarded if forwarded and upstream_path != path else None
        assert seen.headers.get("X-Forwarded-Prefix") == expected, path


async def test_rewrites_chain_in_order_and_the_access_log_keeps_the_client_path(
    proxy: Proxy, recorders: Recorders, tmp_path: Any
) -> None:
    rec = await recorders("a")
    log = tmp_path / "access.log"
    config = make_config([rec.url], routes=route(
        {"rewrite": {"strip_prefix": "/api"}},
        {"rewrite": {"replace_prefix": {"from": "/v1", "to": "/internal/v1"}}},
    ))  # fmt: skip
    config = config.model_copy(update={"access_log": AccessLogSpec(path=str(log))})
    server = await proxy(config)
    await get(proxy_url(server, "/api/v1/x"))
    assert rec.seen[-1].path == "/internal/v1/x"
    await wait_for(lambda: log.exists() and '"/api/v1/x"' in log.read_text())


# --- redirect --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "host", "path", "status", "location"),
    [
        ({"to": "https://example.org/new"}, "a.test", "/x?y=1", 302, "https://example.org/new"),
        ({"status": 301, "scheme": "https"}, "a.test:8080", "/x?y=1", 301, "https://a.test/x?y=1"),
        ({"status": 308, "scheme": "https", "port": 8443}, "a.test", "/p", 308,
         "https://a.test:8443/p"),
        ({"status": 307, "host": "www.a.test"}, "a.test:8080", "/p?q", 307,
         "http://www.a.test:8080/p?q"),
        ({"path": "/moved"}, "[::1]:8080", "/old?k=v", 302, "http://[::1]:8080/moved?k=v"),
        ({"to": "/relative"}, "a.test", "/", 302, "/relative"),
    ],
)  # fmt: skip
async def test_redirect(
    proxy: Proxy, recorders: Recorders, spec: dict[str, Any], host: str, path: str,
    status: int, location: str,
) -> None:  # fmt: skip
    rec = await recorders("a")
    server = await proxy(make_config([rec.url], routes=route({"redirect": spec})))
    got, headers, body, _ = await get(proxy_url(server, path), headers={"Host": host})
    assert (got, headers["Location"]) == (status, location)
    assert body == f"{status} redirect to {location}\n" and not rec.seen


async def test_redirect_answers_head_without_a_body_and_closes_on_an_unread_body(
    proxy: Proxy, recorders: Recorders
) -> None:
    rec = await recorders("a")
    server = await proxy(make_config([rec.url], routes=route({"redirect": {"to": "/b"}})))
    port = server.listeners[0].port
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\nGET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 302 Found\r\n") and b"Location: /b\r\n" in head
    status, _, body = await read_response(reader)  # the body was not sent for HEAD
    assert status == b"HTTP/1.1 302 Found" and body == b"302 redirect to /b\n"
    writer.close()
    reply = await raw_exchange(port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
                               b"\r\nonly part of it")  # fmt: skip
    assert reply.startswith(b"HTTP/1.1 302 Found\r\n") and b"Connection: close\r\n" in reply


# --- sticky -------------------------------------------------------------------------------------


async def test_sticky_pins_a_client_and_falls_back_when_its_upstream_is_gone(
    proxy: Proxy, recorders: Recorders
) -> None:
    a, b = await recorders("a"), await recorders("b")
    spec = {"sticky": {"max_age": "1h", "secure": True, "same_site": "strict", "path": "/app"}}
    server = await proxy(make_config([a.url, b.url], routes=route(spec)))
    url = proxy_url(server, "/app")
    status, headers, first, _ = await get(url)
    cookie = headers["Set-Cookie"]
    value = cookie.split(";")[0].split("=", 1)[1]
    assert cookie == (f"aiolb_sticky={value}; Path=/app; Max-Age=3600; HttpOnly; Secure; "
                      "SameSite=Strict")  # fmt: skip
    assert len(value) == 16
    # with the cookie: always the same upstream (round robin alone would alternate), no
    # new cookie; with another client's cookie (of the other upstream): that one
    sent = {"Cookie": f"theme=dark; aiolb_sticky={value}"}
    for _ in range(4):
        status, headers, body, _ = await get(url, headers=sent)
        assert (status, body) == (200, first) and "Set-Cookie" not in headers
    # that upstream drained: the balancer picks the other, whose cookie replaces it
    pool = server.pools["main"]
    port = (a if first == "a" else b).port
    pinned = next(u for u in pool.upstreams if u.port == port)
    pinned.enabled = False
    pool.rebuild()
    status, headers, body, _ = await get(url, headers=sent)
    assert body != first and headers["Set-Cookie"].split(";")[0] != f"aiolb_sticky={value}"
    moved = headers["Set-Cookie"].split(";")[0]
    status, headers, again, _ = await get(url, headers={"Cookie": moved})
    assert again == body and "Set-Cookie" not in headers
    # an unknown value: the balancer, and a cookie
    status, headers, _, _ = await get(url, headers={"Cookie": "aiolb_sticky=nonsense"})
    assert status == 200 and headers["Set-Cookie"].startswith("aiolb_sticky=")


async def test_sticky_cookie_values_are_the_same_in_every_instance(
    proxy: Proxy, recorders: Recorders
) -> None:
    a = await recorders("a")
    first = await proxy(make_config([a.url], routes=route("sticky")))
    second = await proxy(make_config([a.url], routes=route("sticky")))
    cookies = [(await get(proxy_url(s)))[1]["Set-Cookie"] for s in (first, second)]
    assert cookies[0] == cookies[1] and cookies[0].endswith("; Path=/; HttpOnly; SameSite=Lax")


# --- access -------------------------------------------------------------------------------------


async def test_access_allow_and_deny_by_client_address(proxy: Proxy, recorders: Recorders) -> None:
    rec = await recorders("a")
    spec = {"access": {"allow": ["127.0.0.0/24", "::1"], "deny": ["127.0.0.3"]}}
    server = await proxy(make_config([rec.url], routes=route(spec)))
    port = server.listeners[0].port
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    verdicts = {source: (await from_address(port, source, request))[0]
                for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.1.1")}  # fmt: skip
    assert verdicts == {
        "127.0.0.1": b"HTTP/1.1 200 OK", "127.0.0.2": b"HTTP/1.1 200 OK",
        "127.0.0.3": b"HTTP/1.1 403 Forbidden", "127.0.1.1": b"HTTP/1.1 403 Forbidden",
    }  # fmt: skip


async def test_access_behind_trusted_proxies_judges_the_forwarded_client(
    proxy: Proxy, recorders: Recorders
) -> None:
    rec = await recorders("a")
    spec = {"access": {"deny": ["203.0.113.0/24"], "trusted_proxies": ["127.0.0.1", "10.0.0.0/8"]}}
    headers = {"headers": {"request": {"set": {"X-Real-Client": "${client_ip}"}}}}
    server = await proxy(make_config([rec.url], routes=route(spec, headers)))
    port = server.listeners[0].port

    async def verdict(source: str, forwarded: str) -> bytes:
        request = (f"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {forwarded}\r\n\r\n").encode()
        return (await from_address(port, source, request))[0]

    # a trusted proxy forwarded a denied client (even behind another trusted hop)
    assert await verdict("127.0.0.1", "203.0.113.9") == b"HTTP/1.1 403 Forbidden"
    assert await verdict("127.0.0.1", "203.0.113.9, 10.1.2.3") == b"HTTP/1.1 403 Forbidden"
    # a client cannot hide behind a forged entry left of the real one
    assert await verdict("127.0.0.1", "198.51.100.1, 203.0.113.9") == b"HTTP/1.1 403 Forbidden"
    assert await verdict("127.0.0.1", "203.0.113.9, 198.51.100.1") == b"HTTP/1.1 200 OK"
    assert rec.seen[-1].headers["X-Real-Client"] == "198.51.100.1"
    # an untrusted peer's X-Forwarded-For is not believed; the peer is judged
    assert await verdict("127.0.0.2", "198.51.100.1") == b"HTTP/1.1 200 OK"
    assert rec.seen[-1].headers["X-Real-Client"] == "127.0.0.2"
    assert await verdict("127.0.0.1", "not-an-address") == b"HTTP/1.1 403 Forbidden"


async def test_access_ipv4_mapped_ipv6_clients_are_judged_as_ipv4() -> None:
    from proxy.config.filters import AccessOptions
    from proxy.filters.access import Access

    access = Access(AccessOptions(allow=["192.0.2.0/24"]), None)  # type: ignore[arg-type]
    assert access.allowed("::ffff:192.0.2.7") and not access.allowed("::ffff:198.51.100.7")
    assert not access.allowed("2001:db8::1") and access.allowed("192.0.2.200")


# --- the example config and its Python filter (config/filters.yaml) --------------------


async def test_the_example_filters_config_and_its_python_filter(recorders: Recorders) -> None:
    from proxy.config import parse_config
    from tests.support import REPO

    api, web = await recorders("api"), await recorders("web")
    path = REPO / "config" / "filters.yaml"
    text = (
        path.read_text()
        .replace("127.0.0.1:8080", f"{HOST}:0")
        .replace("http://127.0.0.1:9001", api.url)
        .replace("http://127.0.0.1:9002", web.url)
        .replace("http://127.0.0.1:9003", web.url)
    )
    text += f'admin:\n  bind: "{HOST}:0"\n'
    config = parse_config(text.replace(f'      - url: "{web.url}"\n', "", 1), str(path), {})
    server = ProxyServer(config, config_path=str(path))  # example_filter.py beside it
    await server.start()
    try:
        url = proxy_url(server, "/api/users?page=2")
        status, headers, body, _ = await get(url)
        assert (status, headers["WWW-Authenticate"], body) == (
            401,
            "ApiKey",
            "401: unknown API key\n",
        )
        status, headers, body, _ = await get(url, headers={"X-Api-Key": "k-alice"})
        assert (status, body) == (200, "api")
        seen = api.seen[-1]
        assert seen.path == "/users?page=2" and seen.headers["X-Client"] == "alice"
        assert seen.headers["X-Upstream"] == f"{HOST}:{api.port}"
        assert "X-Api-Key" not in seen.headers and seen.headers["X-Client-IP"] == "127.0.0.1"
        assert headers["Server-Timing"].startswith("aiolb;dur=") and "Server" not in headers
        assert headers["X-Request-ID"] == seen.headers["X-Request-ID"]
        status, headers, _, _ = await get(proxy_url(server, "/old/x?y=1"))
        assert (status, headers["Location"].split("/", 3)[3]) == (301, "new/page?y=1")
        status, headers, body, _ = await get(proxy_url(server, "/"))
        assert (status, body) == (200, "web") and headers["Set-Cookie"].startswith("aiolb_sticky=")
    finally:
        await server.shutdown(timeout=1.0)
