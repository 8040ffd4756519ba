"""The response cache through real sockets: a real upstream, the real proxy, a route
with ``cache:``. What is asserted is what a client and the upstream see: bodies,
``Age``, ``Cache-Status``, and how many requests reached the upstream."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.cache.flow import CacheState
from proxy.config import Config
from proxy.forwarding.exchange import Exchange
from proxy.runtime.server import ProxyServer
from tests.admin_support import get_json, samples, scrape
from tests.support import HOST, Recorder, make_config, proxy_url, read_response, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]


def cached_config(url: str, **cache: Any) -> Config:
    return make_config([url], routes=[{"pool": "main", "cache": "main"}],
                       caches={"main": cache})  # fmt: skip


def answering(headers: dict[str, str], body: str = "body", status: int = 200,
              counter: list[int] | None = None) -> Any:  # fmt: skip
    """A handler answering ``body`` with ``headers``; counts its calls in ``counter``."""

    async def handler(request: web.Request) -> web.Response:
        if counter is not None:
            counter.append(1)
        return web.Response(status=status, text=f"{body} {len(counter or [])}", headers=headers)

    return handler


async def fetch(session: aiohttp.ClientSession, server: ProxyServer, path: str,
                **kw: Any) -> tuple[int, str, Any]:  # fmt: skip
    async with session.get(proxy_url(server, path), **kw) as resp:
        return resp.status, await resp.text(), resp.headers


async def test_a_fresh_response_is_served_from_the_cache_with_age_and_cache_status(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    calls: list[int] = []
    up = await recorders("a", {"/c": answering({"Cache-Control": "max-age=60"}, "hi", 200, calls)})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        first = await fetch(session, server, "/c")
        second = await fetch(session, server, "/c")
        third = await fetch(session, server, "/c")
    assert calls == [1]  # one request reached the upstream
    assert first[:2] == second[:2] == third[:2] == (200, "hi 1")
    assert first[2]["Cache-Status"] == "aiolb; fwd=miss; stored"
    assert second[2]["Cache-Status"].startswith("aiolb; hit; ttl=")
    assert 0 <= int(second[2]["Age"]) <= 1
    assert second[2]["Cache-Control"] == "max-age=60"  # the upstream's headers, kept


@pytest.mark.parametrize(
    ("headers", "request_headers"),
    [
        ({"Cache-Control": "no-store, max-age=60"}, {}),
        ({"Cache-Control": "private, max-age=60"}, {}),
        ({}, {}),  # no freshness, and heuristics are off by default
        ({"Cache-Control": "max-age=60"}, {"Authorization": "Bearer x"}),
        ({"Cache-Control": "max-age=60", "Vary": "*"}, {}),
        ({"Cache-Control": "max-age=60"}, {"Cache-Control": "no-store"}),
    ],
    ids=["no-store", "private", "no-freshness", "authorization", "vary-star", "request-no-store"],
)
async def test_what_must_not_be_stored_reaches_the_upstream_every_time(
    proxy: MakeProxy, recorders: MakeRecorder, headers: dict[str, str],
    request_headers: dict[str, str],
) -> None:  # fmt: skip
    calls: list[int] = []
    up = await recorders("a", {"/c": answering(headers, "x", 200, calls)})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        answers = [await fetch(session, server, "/c", headers=request_headers) for _ in range(3)]
    assert calls == [1, 1, 1]
    assert [a[1] for a in answers] == ["x 1", "x 2", "x 3"]
    assert "stored" not in answers[0][2]["Cache-Status"]


async def test_authorization_with_a_public_response_is_stored(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    calls: list[int] = []
    handler = answering({"Cache-Control": "public, max-age=60"}, "p", 200, calls)
    up = await recorders("a", {"/c": handler})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            await fetch(session, server, "/c", headers={"Authorization": "Bearer x"})
    assert calls == [1]


@pytest.mark.parametrize(
    ("surrogate", "cache_control", "option", "stored", "passed_on"),
    [
        ("max-age=60", "no-store", True, True, False),  # ours, and it says store
        ("max-age=60;aiolb", "no-store", True, True, False),  # targeted at aiolb
        ("no-store", "max-age=60", True, False, False),  # ours says no
        ("max-age=60;other-cdn", "no-store", True, False, True),  # another device's
        ("max-age=60", "no-store", False, False, True),  # surrogate_control: false
    ],
    ids=["max-age", "targeted", "no-store", "other-target", "option-off"],
)
async def test_surrogate_control_goes_before_cache_control_and_is_not_passed_on(
    proxy: MakeProxy, recorders: MakeRecorder, surrogate: str, cache_control: str,
    option: bool, stored: bool, passed_on: bool,
) -> None:  # fmt: skip
    calls: list[int] = []
    headers = {"Cache-Control": cache_control, "Surrogate-Control": surrogate}
    up = await recorders("a", {"/c": answering(headers, "s", 200, calls)})
    server = await proxy(cached_config(up.url, surrogate_control=option))
    async with aiohttp.ClientSession() as session:
        answers = [await fetch(session, server, "/c") for _ in range(2)]
    assert calls == ([1] if stored else [1, 1])
    assert [a[1] for a in answers] == (["s 1", "s 1"] if stored else ["s 1", "s 2"])
    for _, _, got in answers:  # the client's Cache-Control is the upstream's, always
        assert got["Cache-Control"] == cache_control
        assert got.get("Surrogate-Control") == (surrogate if passed_on else None)
    capability = up.seen[0].headers.get("Surrogate-Capability")
    assert capability == ('aiolb="Surrogate/1.0"' if option else None)


async def test_vary_keeps_one_response_per_variant(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    calls: list[str] = []

    async def negotiated(request: web.Request) -> web.Response:
        language = request.headers.get("Accept-Language", "en")
        calls.append(language)
        return web.Response(text=f"in {language}", headers={
            "Cache-Control": "max-age=60", "Vary": "Accept-Language"})  # fmt: skip

    up = await recorders("a", {"/c": negotiated})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        got = [await fetch(session, server, "/c", headers={"Accept-Language": lang})
               for lang in ("de", "en", "de", "en", "fr")]  # fmt: skip
    assert [g[1] for g in got] == ["in de", "in en", "in de", "in en", "in fr"]
    assert calls == ["de", "en", "fr"]


async def test_a_stale_response_is_revalidated_and_a_304_merges_its_headers(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    seen: list[str | None] = []

    async def validated(request: web.Request) -> web.Response:
        seen.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"', "X-Checked": "yes",
                                                     "Cache-Control": "max-age=0"})  # fmt: skip
        return web.Response(text="content", headers={"ETag": '"v1"', "Cache-Control": "max-age=0"})

    up = await recorders("a", {"/c": validated})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        first = await fetch(session, server, "/c")
        second = await fetch(session, server, "/c")
    assert seen == [None, '"v1"']  # the second one asked the upstream conditionally
    assert first[:2] == second[:2] == (200, "content")
    assert second[2]["Cache-Status"] == "aiolb; fwd=stale; fwd-status=304; ttl=0"
    assert second[2]["X-Checked"] == "yes"  # the 304's headers replaced the stored ones
    assert server.caches["main"].results["revalidated"] == 1


async def test_the_clients_no_cache_and_max_age_0_are_honoured(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    calls: list[int] = []
    handler = answering({"Cache-Control": "max-age=60"}, "v", 200, calls)
    up = await recorders("a", {"/c": handler})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/c")
        fresh = await fetch(session, server, "/c", headers={"Cache-Control": "no-cache"})
        again = await fetch(session, server, "/c", headers={"Cache-Control": "max-age=0"})
        cached = await fetch(session, server, "/c")
    assert calls == [1, 1, 1]  # no validator to ask with: fetched again twice
    assert (fresh[1], again[1], cached[1]) == ("v 2", "v 3", "v 3")  # the new one is stored
    assert fresh[2]["Cache-Status"] == "aiolb; fwd=request; stored"


async def test_head_is_served_from_a_stored_get(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    calls: list[int] = []
    up = await recorders("a", {"/c": answering({"Cache-Control": "max-age=60"}, "12345", 200,
                                               calls)})  # fmt: skip
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/c")
        async with session.head(proxy_url(server, "/c")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "7"  # "12345 1"
            assert resp.headers["Cache-Status"].startswith("aiolb; hit")
            assert await resp.read() == b""
    assert calls == [1]


async def test_the_clients_own_validators_get_a_304_from_the_cache(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("a", {"/c": answering({"Cache-Control": "max-age=60",
                                                "ETag": '"abc"'})})  # fmt: skip
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/c")
        status, body, headers = await fetch(session, server, "/c",
                                            headers={"If-None-Match": 'W/"abc"'})  # fmt: skip
    assert (status, body) == (304, "")
    assert headers["ETag"] == '"abc"'


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_an_unsafe_method_that_succeeds_invalidates_the_uri(
    proxy: MakeProxy, recorders: MakeRecorder, method: str
) -> None:
    calls: list[int] = []
    up = await recorders("a", {"/c": answering({"Cache-Control": "max-age=60"}, "g", 200, calls)})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/c")
        await fetch(session, server, "/c")
        async with session.request(method, proxy_url(server, "/c"), data=b"x") as resp:
            assert resp.headers["Cache-Status"] == "aiolb; fwd=method"
            await resp.read()
        _, body, _ = await fetch(session, server, "/c")
    assert len(calls) == 3  # the GET after the unsafe method was a miss again
    assert body == "g 3"


async def test_concurrent_misses_make_one_upstream_request(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """Request collapsing: ten clients miss the same key at once; the first fetches,
    the other nine wait for its response and are served from the cache."""
    gate = asyncio.Event()
    calls: list[int] = []

    async def slow(request: web.Request) -> web.Response:
        calls.append(1)
        await gate.wait()
        return web.Response(text="once", headers={"Cache-Control": "max-age=60"})

    up = await recorders("a", {"/c": slow})
    server = await proxy(cached_config(up.url))
    listener = server.listeners[0]

    def waiting() -> int:
        return sum(1 for c in listener.connections
                   if c.exchange is not None and c.exchange.task is not None)  # fmt: skip

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(fetch(session, server, "/c")) for _ in range(10)]
        await wait_for(lambda: len(calls) == 1 and waiting() == 9, 5.0)
        gate.set()
        answers = await asyncio.gather(*clients)
    assert calls == [1]
    assert [a[1] for a in answers] == ["once"] * 10
    assert sum("hit" in a[2]["Cache-Status"] for a in answers) == 9


async def test_a_waiting_miss_goes_upstream_itself_after_the_lock_timeout(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    gate = asyncio.Event()
    calls: list[int] = []

    async def slow(request: web.Request) -> web.Response:
        calls.append(1)
        if len(calls) == 1:
            await gate.wait()  # the first fetch hangs until the test ends it
        return web.Response(text=f"n{len(calls)}", headers={"Cache-Control": "max-age=60"})

    up = await recorders("a", {"/c": slow})
    server = await proxy(cached_config(up.url, lock_timeout="200ms"))
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(fetch(session, server, "/c"))
        await wait_for(lambda: len(calls) == 1, 5.0)
        started = time.monotonic()
        second = await fetch(session, server, "/c")
        waited = time.monotonic() - started
        gate.set()
        await first
    assert second[1] == "n2" and waited >= 0.15  # it waited, then fetched for itself
    assert calls == [1, 1]


async def test_stale_while_revalidate_serves_at_once_and_refreshes_in_the_background(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    calls: list[int] = []
    handler = answering({"Cache-Control": "max-age=1, stale-while-revalidate=60"}, "s", 200,
                        calls)  # fmt: skip
    up = await recorders("a", {"/c": handler})
    server = await proxy(cached_config(up.url))
    cache = server.caches["main"]
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/c")
        entry = cache.store.get(b"127.0.0.1 /c", [])  # type: ignore[union-attr]
        assert entry is not None
        await wait_for(lambda: entry.ttl(time.time()) < 0, 5.0)  # it turned stale
        status, body, headers = await fetch(session, server, "/c")
        assert (status, body) == (200, "s 1")  # the stale one, at once
        assert headers["Cache-Status"].startswith("aiolb; hit; fwd=stale")
        await wait_for(lambda: len(calls) == 2, 5.0)  # refreshed behind the client's back
        await wait_for(lambda: not cache.flights and not cache.tasks, 5.0)  # it landed
        _, body, _ = await fetch(session, server, "/c")
    assert body == "s 2"


async def test_a_refresh_is_a_request_through_the_pool_with_its_own_log_line(
    proxy: MakeProxy, recorders: MakeRecorder, tmp_path: Path
) -> None:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"',
                                                     "Cache-Control": "max-age=60"})  # fmt: skip
        return web.Response(text="s", headers={
            "ETag": '"v1"', "Cache-Control": "max-age=0, stale-while-revalidate=60", "Age": "1",
        })  # fmt: skip

    up = await recorders("a", {"/c": handler})
    log_path = tmp_path / "access.log"
    config = cached_config(up.url).model_dump()
    server = await proxy(Config.model_validate({**config, "access_log": {"path": str(log_path)}}))
    cache = server.caches["main"]
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/c")
        _, _, headers = await fetch(session, server, "/c", headers={"X-Request-ID": "client-1"})
        assert headers["Cache-Status"].startswith("aiolb; hit; fwd=stale")
        await wait_for(lambda: len(seen) == 2 and not cache.flights, 5.0)
        _, _, headers = await fetch(session, server, "/c")
    assert headers["Cache-Status"].startswith("aiolb; hit; ttl=")  # the 304 refreshed it
    refresh = seen[1]
    assert refresh["If-None-Match"] == '"v1"' and refresh["X-Forwarded-For"] == "127.0.0.1"
    assert refresh["X-Request-ID"].endswith("-revalidate")
    assert cache.results["revalidated"] == 1

    def lines() -> list[dict[str, Any]]:
        text = log_path.read_text() if log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    await wait_for(lambda: len(lines()) == 4, 5.0)
    [line] = [x for x in lines() if x["request_id"].endswith("-revalidate")]
    assert (line["method"], line["path"], line["client"], line["listener"], line["pool"]) == (
        "GET", "/c", "127.0.0.1", "test", "main")  # fmt: skip
    assert line["upstream"] == up.url.removeprefix("http://") and line["attempts"] == 1


async def test_losing_every_upstream_costs_a_cached_url_nothing(
    proxy: MakeProxy, recorders: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """use_stale (default: error, timeout, 502, 503, 504): the stored response answers
    when no upstream can, however stale; not when it said must-revalidate."""
    up = await recorders("a", {
        "/c": answering({"Cache-Control": "max-age=0", "ETag": '"e"'}, "kept"),
        "/strict": answering({"Cache-Control": "max-age=0, must-revalidate", "ETag": '"e"'}),
    })  # fmt: skip
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        assert (await fetch(session, server, "/c"))[1] == "kept 0"
        assert (await fetch(session, server, "/strict"))[0] == 200
        await up.stop()  # every upstream gone: refused
        status, body, headers = await fetch(session, server, "/c")
        assert (status, body) == (200, "kept 0")
        assert headers["Cache-Status"] == "aiolb; hit; fwd=stale; detail=error; ttl=0"
        assert (await fetch(session, server, "/strict"))[0] == 502
    assert server.caches["main"].results["stale"] == 1


async def test_a_5xx_from_the_upstream_is_replaced_by_the_stale_response(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    broken = {"on": False}

    async def flaky(request: web.Request) -> web.Response:
        if broken["on"]:
            return web.Response(status=503, text="down")
        return web.Response(text="good", headers={"Cache-Control": "max-age=0", "ETag": '"g"'})

    up = await recorders("a", {"/c": flaky})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/c")
        broken["on"] = True
        status, body, headers = await fetch(session, server, "/c")
        again = await fetch(session, server, "/c")  # the connection stayed usable
    assert (status, body) == (200, "good")
    assert headers["Cache-Status"] == "aiolb; hit; fwd=stale; fwd-status=503; ttl=0"
    assert again[:2] == (200, "good")


async def test_a_body_cut_off_by_the_upstream_is_never_stored(
    proxy: MakeProxy, raw_upstreams: Any
) -> None:
    cut = (b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 100\r\n\r\n"
           b"only part")  # fmt: skip
    raw = await raw_upstreams({b"/c": cut}, close_after={b"/c"})
    server = await proxy(cached_config(raw.url))
    for _ in range(2):
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        writer.write(b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5.0)  # closed mid-body
        assert data.endswith(b"only part")
        writer.close()
    assert len(raw.heads) == 2  # the second request was not served from the cache
    assert len(server.caches["main"].store) == 0  # type: ignore[arg-type]


async def test_large_responses_stream_through_and_a_4_mib_one_is_stored_byte_identical(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    four = bytes(i % 251 for i in range(4 * 1024 * 1024))
    calls: list[int] = []

    async def big(request: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(body=four, headers={"Cache-Control": "max-age=60"})

    async def huge(request: web.Request) -> web.StreamResponse:
        calls.append(1)
        resp = web.StreamResponse(headers={"Cache-Control": "max-age=60"})
        resp.content_length = 64 * 1024 * 1024
        await resp.prepare(request)
        chunk = b"z" * 65536
        for _ in range(1024):
            await resp.write(chunk)
        return resp

    up = await recorders("a", {"/four": big, "/huge": huge})
    server = await proxy(cached_config(up.url, max_object_size="8MiB"))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(proxy_url(server, "/four")) as resp:
                assert await resp.read() == four
        for _ in range(2):
            async with session.get(proxy_url(server, "/huge")) as resp:
                assert "stored" not in resp.headers["Cache-Status"]
                size = 0
                async for part in resp.content.iter_chunked(1 << 20):
                    size += len(part)
                assert size == 64 * 1024 * 1024
    assert len(calls) == 3  # /four once, /huge twice: too large to keep
    assert server.caches["main"].store.size < 5 * 1024 * 1024  # type: ignore[union-attr]


async def test_metrics_api_and_purge(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    calls: list[int] = []
    handler = answering({"Cache-Control": "max-age=60"}, "m", 200, calls)
    up = await recorders("a", {"/static/a": handler, "/static/b": handler, "/api": handler})
    server = await proxy(cached_config(up.url))
    async with aiohttp.ClientSession() as session:
        for path in ("/static/a", "/static/a", "/static/b", "/api", "/api"):
            await fetch(session, server, path)
    text = await scrape(server)
    requests = samples(text, "aiolb_cache_requests_total")
    assert requests[(("cache", "main"), ("result", "hit"))] == 2
    assert requests[(("cache", "main"), ("result", "miss"))] == 3
    assert samples(text, "aiolb_cache_entries")[(("cache", "main"),)] == 3
    assert samples(text, "aiolb_cache_bytes")[(("cache", "main"),)] > 0
    status, view, _ = await get_json(server, "/api/caches")
    (main,) = view["caches"]
    assert (status, main["name"], main["entries"], main["hit_ratio"]) == (200, "main", 3, 0.4)
    status, answer, _ = await get_json(server, "/api/caches/main/purge", "POST",
                                       json={"prefix": "/static/"})  # fmt: skip
    assert (status, answer) == (200, {"cache": "main", "purged": 2})
    status, answer, _ = await get_json(server, "/api/caches/main/purge", "POST",
                                       json={"url": "http://127.0.0.1/api"})  # fmt: skip
    assert answer["purged"] == 1
    status, answer, _ = await get_json(server, "/api/caches/main/purge", "POST",
                                       json={"path": "/x"})  # fmt: skip
    assert status == 400 and "url" in answer["error"]
    status, _, _ = await get_json(server, "/api/caches/nope/purge", "POST", json={"prefix": "/"})
    assert status == 404
    async with aiohttp.ClientSession() as session:
        await fetch(session, server, "/static/a")
    assert len(calls) == 4  # purged: fetched again


async def test_a_route_without_a_cache_has_no_cache_state(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("a", {"/c": answering({"Cache-Control": "max-age=60"})})
    server = await proxy(make_config([up.url]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n")
    _, headers, _ = await read_response(reader)
    writer.close()
    assert b"cache-status" not in headers
    assert server.listeners[0].router.route(b"t", b"/c").cache is None  # type: ignore[union-attr]


@pytest.mark.parametrize("hooks", ["sync", "async"])
async def test_the_routes_response_filters_see_every_answer_from_the_cache(
    proxy: MakeProxy, recorders: MakeRecorder, hooks: str
) -> None:
    """What is stored is the upstream's head; the route's response filters run on each
    response the client gets: a hit, a 304 merged into the stored one, a stale one
    standing in for a 503, a miss (each once, with this request's own values)."""
    calls: list[int] = []

    async def revalidated(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-cache", "ETag": '"v1"'}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(text="r", headers=headers)

    async def failing(request: web.Request) -> web.Response:
        calls.append(1)
        if len(calls) == 1:
            return web.Response(text="s", headers={"Cache-Control": "max-age=0"})
        return web.Response(status=503, text="down")

    up = await recorders("a", {"/fresh": answering({"Cache-Control": "max-age=60"}, "f"),
                               "/revalidated": revalidated, "/stale": failing})  # fmt: skip
    stamp = {"python": "tests.filter_support:Stamp", "options": {"async": hooks == "async"}}
    server = await proxy(make_config([up.url], caches={"main": {}}, routes=[
        {"pool": "main", "cache": "main", "filters": [stamp]}]))  # fmt: skip
    seen: dict[str, list[tuple[int, str, str]]] = {}
    async with aiohttp.ClientSession() as session:
        for path in ["/fresh", "/revalidated", "/stale"]:
            for _ in range(2):
                async with session.get(proxy_url(server, path)) as resp:
                    await resp.read()
                    assert resp.headers.getall("X-Stamp-Response") == ["200"], path
                    state = resp.headers.getall("X-Stamp-State")
                    assert len(state) == 1, (path, state)  # not stored with the response
                    seen.setdefault(path, []).append(
                        (resp.status, resp.headers["Cache-Status"], state[0]))
    for path, (first, second) in seen.items():
        assert first[0] == second[0] == 200 and first[2] != second[2], path  # its own id
        assert "stored" in first[1], path
    assert seen["/fresh"][1][1].startswith("aiolb; hit")
    assert "fwd-status=304" in seen["/revalidated"][1][1]
    assert "fwd-status=503" in seen["/stale"][1][1]


async def test_cached_requests_are_freed_without_the_cyclic_gc(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """Misses, hits, revalidations and bypasses leave no reference cycle: the exchange
    and its cache state go as soon as the response is out, not in a GC pause."""

    async def revalidated(request: web.Request) -> web.Response:
        headers = {"Cache-Control": "no-cache", "ETag": '"v1"'}
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers=headers)
        return web.Response(text="v1", headers=headers)

    up = await recorders("a", {
        "/fresh": answering({"Cache-Control": "max-age=60"}),
        "/revalidated": revalidated,
        "/not-stored": answering({"Cache-Control": "no-store"}),
    })  # fmt: skip
    server = await proxy(cached_config(up.url))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    gc.collect()
    gc.disable()
    try:
        for path in [b"/fresh"] * 3 + [b"/revalidated"] * 2 + [b"/not-stored"]:
            writer.write(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            status, headers, _ = await read_response(reader)
            assert status == b"HTTP/1.1 200 OK" and b"cache-status" in headers
        writer.write(b"POST /fresh HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
        await read_response(reader)

        def left() -> list[object]:
            return [o for o in gc.get_objects() if isinstance(o, (Exchange, CacheState))]

        await wait_for(lambda: not left(), timeout=2.0)
    finally:
        gc.enable()
        writer.close()
    assert server.caches["main"].report()["results"] == {
        "hit": 2, "miss": 3, "stale": 0, "bypass": 1, "revalidated": 1}  # fmt: skip


async def test_the_redis_store_is_shared_by_two_instances_and_survives_an_outage(
    proxy: MakeProxy, recorders: MakeRecorder, redis_server: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    caplog.set_level(logging.WARNING, "aiolb")
    calls: list[int] = []
    up = await recorders("a", {"/c": answering({"Cache-Control": "max-age=60"}, "r", 200, calls),
                               "/d": answering({"Cache-Control": "max-age=60"}, "d", 200, calls)})
    store = {"type": "redis", "url": redis_server.url}
    one = await proxy(cached_config(up.url, store=store))
    two = await proxy(cached_config(up.url, store=store))
    async with aiohttp.ClientSession() as session:
        assert (await fetch(session, one, "/c"))[1] == "r 1"
        await wait_for(lambda: not one.caches["main"].tasks, 5.0)  # written to Redis
        status, body, headers = await fetch(session, two, "/c")
        assert (status, body) == (200, "r 1") and headers["Cache-Status"].startswith("aiolb; hit")
        redis_server.kill()
        answers = [await fetch(session, two, "/d") for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200]  # bypassed, not failed
        assert two.caches["main"].errors >= 1
        redis_server.start()
        await redis_server.ready()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # caching resumes by itself once the store tries Redis again
            await wait_for(lambda: two.caches["main"].store.available, 5.0)  # type: ignore
            await fetch(session, two, "/d")
            await wait_for(lambda: not two.caches["main"].tasks, 5.0)
            status, _, headers = await fetch(session, two, "/d")
            if headers["Cache-Status"].startswith("aiolb; hit"):
                break
            assert loop.time() < deadline, "caching did not resume"
    outages = [r for r in caplog.records if "bypass the cache" in r.getMessage()]
    assert len(outages) == 1


RANGED_BODY = b"0123456789abcdefghij"
LAST_MODIFIED = "Sun, 06 Dec 2026 10:00:00 GMT"


async def test_a_hit_answers_range_with_206_multipart_and_416_like_nginx(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    # issue 27, item 14: a hit sent the whole 200 for any Range. nginx 1.22's proxy_cache
    # answers these same requests from its cache with 206, a multipart 206 and 416 (it
    # also answers 416 for ``bytes=5-2``, which RFC 9110 lets aiolb ignore: a 200)
    await ranges_from_the_cache(proxy, recorders, {})


async def test_a_hit_from_the_redis_store_answers_range_too(
    proxy: MakeProxy, recorders: MakeRecorder, redis_server: Any
) -> None:
    await ranges_from_the_cache(proxy, recorders, {"type": "redis", "url": redis_server.url})


async def ranges_from_the_cache(
    proxy: MakeProxy, recorders: MakeRecorder, store: dict[str, Any]
) -> None:
    calls: list[int] = []

    async def handler(req: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(body=RANGED_BODY, content_type="text/plain", headers={
            "Cache-Control": "max-age=60", "ETag": '"v1"', "Last-Modified": LAST_MODIFIED,
            "Accept-Ranges": "bytes"})  # fmt: skip

    up = await recorders("a", {"/v": handler})
    server = await proxy(cached_config(up.url, **({"store": store} if store else {})))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)

    async def get(*lines: str) -> tuple[bytes, dict[bytes, bytes], bytes]:
        extra = "".join(f"{line}\r\n" for line in lines)
        writer.write(f"GET /v HTTP/1.1\r\nHost: shop.test\r\n{extra}\r\n".encode())
        return await asyncio.wait_for(read_response(reader), 5.0)

    try:
        assert (await get())[2] == RANGED_BODY  # the miss that stores it
        await wait_for(lambda: not server.caches["main"].tasks, 5.0)  # in Redis
        status, headers, body = await get("Range: bytes=2-5")
        assert (status, headers[b"content-range"], body) == (
            b"HTTP/1.1 206 Partial Content", b"bytes 2-5/20", b"2345")  # fmt: skip
        assert headers[b"cache-status"].startswith(b"aiolb; hit")
        assert headers[b"etag"] == b'"v1"' and headers[b"content-length"] == b"4"
        assert (await get("Range: bytes=-3"))[2] == b"hij"
        assert (await get("Range: bytes=15-"))[1][b"content-range"] == b"bytes 15-19/20"
        assert (await get("Range: bytes=0-100"))[1][b"content-range"] == b"bytes 0-19/20"

        status, headers, body = await get("Range: bytes=30-40")
        assert (status, headers[b"content-range"], body) == (
            b"HTTP/1.1 416 Range Not Satisfiable", b"bytes */20", b"")  # fmt: skip

        status, headers, body = await get("Range: bytes=0-1, 5-6")
        assert status == b"HTTP/1.1 206 Partial Content"
        kind, _, boundary = headers[b"content-type"].partition(b"; boundary=")
        assert kind == b"multipart/byteranges" and boundary
        parts = body.split(b"--" + boundary)
        assert parts[0] == b"" and parts[-1] == b"--\r\n"
        assert parts[1:-1] == [
            b"\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-1/20"
            b"\r\n\r\n01\r\n",
            b"\r\nContent-Type: text/plain\r\nContent-Range: bytes 5-6/20"
            b"\r\n\r\n56\r\n",
        ]

        # If-Range (RFC 9110 13.1.5): another validator -> the whole 200
        assert (await get("Range: bytes=2-5", 'If-Range: "v2"'))[2] == RANGED_BODY
        assert (await get("Range: bytes=2-5", 'If-Range: W/"v1"'))[2] == RANGED_BODY
        assert (await get("Range: bytes=2-5", 'If-Range: "v1"'))[2] == b"2345"
        assert (await get("Range: bytes=2-5", f"If-Range: {LAST_MODIFIED}"))[2] == b"2345"
        # ignored: another unit, bad syntax
        assert (await get("Range: items=1-2"))[0] == b"HTTP/1.1 200 OK"
        assert (await get("Range: bytes=5-2"))[0] == b"HTTP/1.1 200 OK"
    finally:
        writer.close()
        await writer.wait_closed()
    assert len(calls) == 1, "every answer came from the cache"


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_range_miss_is_fetched_whole_stored_and_answered_206(
    proxy: MakeProxy, recorders: MakeRecorder, redis_server: Any, store: str
) -> None:
    """Issue 27 left a ``Range`` miss relayed and never stored; nginx's proxy_cache asks
    the upstream for the whole, stores it and answers the range from it."""
    ranges: list[str | None] = []

    async def handler(req: web.Request) -> web.Response:
        ranges.append(req.headers.get("Range"))
        return web.Response(body=RANGED_BODY, content_type="text/plain", headers={
            "Cache-Control": "max-age=60", "ETag": '"v1"'})  # fmt: skip

    up = await recorders("a", {"/v": handler})
    spec = {"store": {"type": "redis", "url": redis_server.url}} if store == "redis" else {}
    server = await proxy(cached_config(up.url, **spec))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)

    async def get(*lines: str) -> tuple[bytes, dict[bytes, bytes], bytes]:
        extra = "".join(f"{line}\r\n" for line in lines)
        writer.write(f"GET /v HTTP/1.1\r\nHost: shop.test\r\n{extra}\r\n".encode())
        return await asyncio.wait_for(read_response(reader), 5.0)

    try:
        status, headers, body = await get("Range: bytes=2-5")
        assert (status, headers[b"content-range"], body) == (
            b"HTTP/1.1 206 Partial Content", b"bytes 2-5/20", b"2345")  # fmt: skip
        assert headers[b"cache-status"].startswith(b"aiolb; fwd=miss; stored")
        await wait_for(lambda: not server.caches["main"].tasks, 5.0)  # in Redis
        status, headers, body = await get()
        assert (status, body) == (b"HTTP/1.1 200 OK", RANGED_BODY)
        assert headers[b"cache-status"].startswith(b"aiolb; hit")
    finally:
        writer.close()
        await writer.wait_closed()
    assert ranges == [None]  # one request upstream, for the whole
