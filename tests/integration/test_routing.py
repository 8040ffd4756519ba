"""Route matching, traffic splits and mirroring through real sockets (issue #28, part 3).

Each recorder answers with its own name, so a client sees which pool served it; the
mirror pool's recorder shows what the copies carried.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx
from aiohttp import web

from proxy.runtime.server import ProxyServer
from tests.admin_support import get_json, samples, scrape
from tests.support import (
    HOST,
    RawUpstream,
    Recorder,
    make_config,
    proxy_url,
    raw_exchange,
    unused_port,
    wait_for,
)

MakeProxy = Callable[..., Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]


def config(routes: list[dict[str, Any]], pools: dict[str, str], **kwargs: Any) -> Any:
    """A config whose pools each have one upstream (``pools``: name -> url)."""
    extra = {name: {"upstreams": [{"url": url}]} for name, url in pools.items() if name != "main"}
    return make_config([pools["main"]], routes=routes, pools=extra, **kwargs)


async def get(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str]:
    async with session.request(kwargs.pop("method", "GET"), url, **kwargs) as resp:
        return resp.status, await resp.text()


# --- matching ------------------------------------------------------------------------------


async def test_each_matcher_picks_its_pool(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    main, canary, api, exact, mobile = [
        await recorders(n) for n in ("main", "canary", "api", "exact", "mobile")
    ]
    routes = [
        {"match": {"methods": ["GET", "HEAD"], "headers": {"X-Canary": "1"}}, "pool": "canary"},
        {"match": {"path_regex": "^/api/v[0-9]+/", "query": {"debug": "1"}}, "pool": "api"},
        {"match": {"path": "/exact"}, "pool": "exact"},
        {"match": {"headers": {"User-Agent": {"regex": "(?i)android|iphone"},
                               "Authorization": {"present": False}}}, "pool": "mobile"},
        {"match": {"path_prefix": "/"}, "pool": "main"},
    ]  # fmt: skip
    pools = {r.name: r.url for r in (main, canary, api, exact, mobile)}
    server = await proxy(config(routes, pools))
    url = proxy_url(server)
    async with aiohttp.ClientSession() as s:
        assert await get(s, url, headers={"X-Canary": "1"}) == (200, "canary")
        assert await get(s, url, method="POST", headers={"X-Canary": "1"}) == (200, "main")
        assert await get(s, url + "api/v2/x?debug=1") == (200, "api")
        assert await get(s, url + "api/v2/x?debug=1&debug=0") == (200, "api")  # the first counts
        assert await get(s, url + "api/v2/x?debug=0&debug=1") == (200, "main")
        assert await get(s, url + "api/v2/x?debug=%31") == (200, "api")
        assert await get(s, url + "api/v2/x?debug=%3") == (200, "main")  # invalid: absent
        assert await get(s, url + "api/vx/x?debug=1") == (200, "main")
        assert await get(s, url + "exact") == (200, "exact")
        assert await get(s, url + "exact/") == (200, "main")
        phone = {"User-Agent": "Mozilla (iPhone)"}
        assert await get(s, url, headers=phone) == (200, "mobile")
        assert await get(s, url, headers={**phone, "Authorization": "x"}) == (200, "main")
    assert [seen.path for seen in api.seen] == [  # %31 is "1" in the normalised target
        "/api/v2/x?debug=1", "/api/v2/x?debug=1&debug=0", "/api/v2/x?debug=1"]  # fmt: skip


async def test_a_huge_header_against_a_regex_is_answered_at_once(
    proxy: MakeProxy, raw_upstreams: Callable[..., Awaitable[RawUpstream]]
) -> None:
    main = await raw_upstreams({b"/seg/end": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nmain"})
    other = await raw_upstreams({})
    routes = [
        {"match": {"headers": {"X-Token": {"regex": "^a.*b$"}},
                   "path_regex": "^/(?:seg/)+end$"}, "pool": "other"},
        {"match": {"path_prefix": "/"}, "pool": "main"},
    ]  # fmt: skip
    server = await proxy(config(routes, {"main": main.url, "other": other.url}))
    value = b"a" * 60000 + b"c"
    request = (
        b"GET /seg/end HTTP/1.1\r\nHost: x\r\nX-Token: " + value + b"\r\nConnection: close\r\n\r\n"
    )
    answer = await raw_exchange(server.listeners[0].port, request, timeout=5.0)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"main")


# --- splits --------------------------------------------------------------------------------


async def test_a_split_gives_each_pool_its_weight(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    stable, canary = await recorders("main"), await recorders("canary")
    shares = [{"pool": "main", "weight": 95}, {"pool": "canary", "weight": 5}]
    routes = [{"match": {"path_prefix": "/"}, "pools": shares}]
    server = await proxy(config(routes, {"main": stable.url, "canary": canary.url}))
    url = proxy_url(server, "/s")
    counts: Counter[str] = Counter()
    async with aiohttp.ClientSession() as s:
        for _ in range(40):
            answers = await asyncio.gather(*(get(s, url) for _ in range(50)))
            counts.update(text for _, text in answers)
    assert counts == {"main": 1900, "canary": 100}  # smooth weighted round robin: exact
    split = samples(await scrape(server), "aiolb_split_requests_total")
    assert split == {(("pool", "canary"), ("route", "test/0")): 100.0,
                     (("pool", "main"), ("route", "test/0")): 1900.0}  # fmt: skip


async def test_sticky_splits_keep_each_client_on_its_pool(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    a, b = await recorders("main"), await recorders("b")
    shares = [{"pool": "main", "weight": 50}, {"pool": "b", "weight": 50}]
    routes = [
        {"match": {"path_prefix": "/ip"}, "pools": shares, "sticky": "client_ip"},
        {"match": {"path_prefix": "/"}, "pools": shares, "sticky": "cookie:user"},
    ]
    server = await proxy(config(routes, {"main": a.url, "b": b.url}))
    async with aiohttp.ClientSession() as s:
        by_ip = {(await get(s, proxy_url(server, "/ip")))[1] for _ in range(20)}
        assert len(by_ip) == 1  # one client address, one pool
        first: dict[str, str] = {}
        for round_ in range(2):
            for i in range(200):
                _, text = await get(s, proxy_url(server, "/u"), headers={"Cookie": f"user=u{i}"})
                if round_ == 0:
                    first[f"u{i}"] = text
                else:
                    assert first[f"u{i}"] == text
    share = Counter(first.values())["main"] / len(first)
    assert 0.35 < share < 0.65


# --- mirroring -----------------------------------------------------------------------------


async def test_the_mirror_gets_a_copy_with_its_body(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    bodies: list[bytes] = []

    async def keep(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.read())
        return web.Response(text="shadow")

    main, shadow = await recorders("main"), await recorders("shadow", {"/p": keep})
    routes = [{"match": {"path_prefix": "/"}, "pool": "main", "mirror": {"pool": "shadow"}}]
    server = await proxy(config(routes, {"main": main.url, "shadow": shadow.url}))
    payload = bytes(range(256)) * 20
    async with aiohttp.ClientSession() as s:
        headers = {"Host": "app.example", "X-Request-ID": "r1"}
        answer = await get(
            s, proxy_url(server, "/p?q=1"), method="POST", data=payload, headers=headers
        )
        assert answer == (200, "main")
        assert await get(s, proxy_url(server, "/g")) == (200, "main")

        async def chunks() -> Any:
            yield payload[:1000]
            yield payload[1000:]

        chunked = await get(s, proxy_url(server, "/p"), method="PUT", data=chunks())
        assert chunked == (200, "main")
    await wait_for(lambda: len(shadow.seen) == 3)
    post = next(seen for seen in shadow.seen if seen.method == "POST")
    assert post.path == "/p?q=1" and post.headers["Host"] == "app.example"
    assert post.headers["X-Request-ID"] == "r1-mirror"
    await wait_for(lambda: len(bodies) == 2)
    assert bodies == [payload, payload]  # Content-Length, then chunked
    assert shadow.seen[2].headers.get("Transfer-Encoding") == "chunked"
    assert main.seen[0].headers["X-Request-ID"] == "r1"
    await wait_for(lambda: _mirrored(server).get("answered") == 3)


def _mirrored(server: ProxyServer) -> dict[str, int]:
    return {labels[3]: t.n for labels, t in server.filters.traffic.items() if labels[0] == "mirror"}


async def test_a_streamed_body_is_not_copied(proxy: MakeProxy, recorders: MakeRecorder) -> None:
    main, shadow = await recorders("main"), await recorders("shadow")
    routes = [{"match": {"path_prefix": "/"}, "pool": "main", "mirror": {"pool": "shadow"}}]
    listener = {"limits": {"body_buffer_size": 1024}}
    server = await proxy(
        config(routes, {"main": main.url, "shadow": shadow.url}, listener=listener)
    )
    async with aiohttp.ClientSession() as s:
        assert await get(s, proxy_url(server), method="PUT", data=b"y" * 100_000) == (200, "main")
    assert _mirrored(server) == {"answered": 0, "failed": 0, "dropped": 0, "skipped": 1}
    assert shadow.seen == []


async def test_a_dead_or_slow_mirror_never_touches_the_real_requests(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(text="late")

    main, slow = await recorders("main"), await recorders("slow", {"/slow": stall})
    dead = f"http://{HOST}:{unused_port()}"
    routes = [
        {"match": {"path_prefix": "/slow"}, "pool": "main",
         "mirror": {"pool": "slow", "max_in_flight": 5}},
        {"match": {"path_prefix": "/"}, "pool": "main", "mirror": {"pool": "dead"}},
    ]  # fmt: skip
    server = await proxy(config(routes, {"main": main.url, "slow": slow.url, "dead": dead}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with aiohttp.ClientSession() as s:
        for _ in range(20):
            assert await get(s, proxy_url(server, "/slow")) == (200, "main")
            assert await get(s, proxy_url(server, "/d"), method="POST", data=b"z") == (200, "main")
    assert loop.time() - started < 5.0  # each pair well under the mirror's stall
    await wait_for(lambda: _count(server, "test/1", "dead", "failed") == 20)
    assert _count(server, "test/0", "slow", "dropped") == 15
    await wait_for(lambda: len(slow.seen) == 5)
    release.set()
    await wait_for(lambda: _count(server, "test/0", "slow", "answered") == 5)
    mirror = samples(await scrape(server), "aiolb_mirror_requests_total")
    assert mirror[(("outcome", "dropped"), ("pool", "slow"), ("route", "test/0"))] == 15.0
    assert mirror[(("outcome", "failed"), ("pool", "dead"), ("route", "test/1"))] == 20.0


def _count(server: ProxyServer, route: str, pool: str, outcome: str) -> int:
    tally = server.filters.traffic.get(("mirror", route, pool, outcome))
    return tally.n if tally is not None else 0


async def test_a_fraction_of_requests_is_mirrored(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    main, shadow = await recorders("main"), await recorders("shadow")
    routes = [{"match": {"path_prefix": "/"}, "pool": "main",
               "mirror": {"pool": "shadow", "fraction": 0.25}}]  # fmt: skip
    server = await proxy(config(routes, {"main": main.url, "shadow": shadow.url}))
    async with aiohttp.ClientSession() as s:
        for _ in range(8):
            await asyncio.gather(*(get(s, proxy_url(server)) for _ in range(50)))
    await wait_for(lambda: sum(_mirrored(server).values()) == _mirrored(server)["answered"] > 0)
    assert 40 < _mirrored(server)["answered"] < 170  # 100 expected; ~6 sd either side


# --- HTTP/2 clients --------------------------------------------------------------------------


async def test_h2_clients_are_matched_split_and_mirrored(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    bodies: list[bytes] = []

    async def keep(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.read())
        return web.Response(text="shadow")

    main, canary = await recorders("main"), await recorders("canary")
    shadow = await recorders("shadow", {"/s": keep})
    routes = [
        {"match": {"headers": {"X-Canary": "1"}}, "pool": "canary"},
        {"match": {"path_prefix": "/"},
         "pools": [{"pool": "main", "weight": 3}, {"pool": "canary", "weight": 1}],
         "mirror": {"pool": "shadow"}},
    ]  # fmt: skip
    pools = {"main": main.url, "canary": canary.url, "shadow": shadow.url}
    server = await proxy(config(routes, pools, listener={"protocols": ["http/1.1", "h2c"]}))
    port = server.listeners[0].port
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        canaried = await client.get(f"http://{HOST}:{port}/c", headers={"X-Canary": "1"})
        assert canaried.http_version == "HTTP/2" and canaried.text == "canary"
        split = [(await client.post(f"http://{HOST}:{port}/s", content=b"body")).text
                 for _ in range(8)]  # fmt: skip
    assert Counter(split) == {"main": 6, "canary": 2}
    await wait_for(lambda: len(shadow.seen) == 8)
    assert {seen.path for seen in shadow.seen} == {"/s"}
    assert all(seen.method == "POST" for seen in shadow.seen)
    await wait_for(lambda: len(bodies) == 8)
    assert bodies == [b"body"] * 8


# --- several workers -----------------------------------------------------------------------


async def test_workers_count_splits_and_mirrors_and_a_reload_keeps_the_counts(
    aiolb: Any, recorders: MakeRecorder
) -> None:
    main, canary, shadow = [await recorders(n) for n in ("main", "canary", "shadow")]
    text = f"""\
listeners:
  - name: test
    bind: "127.0.0.1:0"
    routes:
      - name: split
        pools: [{{pool: main, weight: 3}}, {{pool: canary, weight: 1}}]
        mirror: {{pool: shadow}}
pools:
  main: {{upstreams: [{{url: "{main.url}"}}]}}
  canary: {{upstreams: [{{url: "{canary.url}"}}]}}
  shadow: {{upstreams: [{{url: "{shadow.url}"}}]}}
admin: {{bind: "127.0.0.1:0"}}
workers: 2
"""
    proxy = await aiolb(text, workers=2)
    async with aiohttp.ClientSession() as s:
        for _ in range(10):
            answers = await asyncio.gather(*(get(s, proxy.url) for _ in range(20)))
            assert {status for status, _ in answers} == {200}
    assert len(main.seen) + len(canary.seen) == 200
    await wait_for(lambda: len(shadow.seen) == 200, 10.0)

    async def counted(expected: float) -> bool:
        scraped = samples(await proxy.metrics(), "aiolb_split_requests_total")
        mirrored = samples(await proxy.metrics(), "aiolb_mirror_requests_total")
        answered = mirrored.get((("outcome", "answered"), ("pool", "shadow"), ("route", "split")))
        return sum(scraped.values()) == expected and answered == expected

    await wait_for(lambda: counted(200.0), 10.0)
    proxy.path.write_text(text.replace("weight: 1}", "weight: 2}"))
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)
    reloaded = 'aiolb_config_reloads_total{result="success"} 1.0'
    await wait_for(lambda: _has(proxy, reloaded), 20.0)
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(get(s, proxy.url) for _ in range(40)))
    # a reload rebuilt the routes, not the counts: 240, not 40
    await wait_for(lambda: counted(240.0), 10.0)
    assert await proxy.stop() == 0


async def _has(proxy: Any, text: str) -> bool:
    return text in await proxy.metrics()


async def test_a_bug_in_the_copy_does_not_fail_the_real_request(
    proxy: MakeProxy, recorders: MakeRecorder, monkeypatch: Any, caplog: Any
) -> None:
    from proxy.forwarding.traffic import Mirror

    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(Mirror, "copy", broken)
    main, shadow = await recorders("main"), await recorders("shadow")
    routes = [{"match": {"path_prefix": "/"}, "pool": "main", "mirror": {"pool": "shadow"}}]
    server = await proxy(config(routes, {"main": main.url, "shadow": shadow.url}))
    async with aiohttp.ClientSession() as s:
        assert await get(s, proxy_url(server)) == (200, "main")
    assert "bug in a mirror copy" in caplog.text
    assert shadow.seen == []


async def test_the_admin_api_shows_a_split_and_a_mirror(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    main, canary = await recorders("main"), await recorders("canary")
    shares = [{"pool": "main", "weight": 9}, {"pool": "canary", "weight": 1}]
    routes = [{"match": {"path_prefix": "/"}, "mirror": {"pool": "canary"}, "pools": shares}]
    server = await proxy(config(routes, {"main": main.url, "canary": canary.url}))
    status, body, _ = await get_json(server, "/api/server")
    assert status == 200
    (route,) = body["listeners"][0]["routes"]
    assert route["pools"] == {"main": 9, "canary": 1} and route["mirror"] == "canary"
    assert route["pool"] is None
