"""The admin dashboard page in a real headless Chromium, against the real proxy.

Real upstreams, the real proxy and its admin listener on 127.0.0.1 port 0, and the page
at ``GET /`` polling ``/api/pools``. Every wait polls the DOM or the API against a
deadline. Chromium is required (``tests/browser.py``): without it these tests fail
with the install line, they do not skip.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy import __version__
from proxy.admin import AdminHandle, start_admin
from proxy.config import AdminSpec
from proxy.runtime.server import ProxyServer
from tests.browser import Browser
from tests.support import HOST, make_config, proxy_url

PAGE = Path(__file__).parents[2] / "proxy" / "admin" / "dashboard.html"
TOKEN = "dashboard-test-token"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()  # fails the test here when Chromium is missing
    try:
        yield await b.start()
    finally:
        await b.close()


def admin_of(server: ProxyServer) -> AdminHandle:
    """The admin listener ``ProxyServer.start`` opened (``admin.bind`` port 0)."""
    assert server.admin is not None
    return server.admin


def row(address: str) -> str:
    return f'tr[data-upstream="{address}"]'


def js(selector: str, expression: str) -> str:
    """``expression`` over the element matching ``selector`` (``el``), or null."""
    return (
        f"(() => {{ const el = document.querySelector({json.dumps(selector)}); "
        f"return el ? ({expression}) : null; }})()"
    )


async def api_pools(url: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/pools", headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data


async def api_upstream(url: str, address: str, token: str | None = None) -> dict[str, Any]:
    data = await api_pools(url, token)
    for pool in data["pools"]:
        for upstream in pool["upstreams"]:
            if upstream["address"] == address:
                found: dict[str, Any] = upstream
                return found
    raise AssertionError(f"{address} not in /api/pools: {data}")


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll the async ``check`` until it is true, or fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        await asyncio.sleep(0.05)


async def send(session: aiohttp.ClientSession, server: ProxyServer, n: int) -> list[str]:
    """``n`` GETs through the proxy; the bodies (upstream names) of the 200s."""
    bodies = []
    for _ in range(n):
        async with session.get(proxy_url(server)) as resp:
            body = await resp.text()
            if resp.status == 200:
                bodies.append(body)
    return bodies


async def test_dashboard_shows_upstreams_marks_a_killed_one_and_drains(
    recorders, proxy, browser
):
    ups = [await recorders(name) for name in ("a", "b", "c")]
    a, b, c = (f"{HOST}:{u.port}" for u in ups)
    server = await proxy(make_config([u.url for u in ups]))
    handle = admin_of(server)

    await browser.goto(f"{handle.url}/")
    await browser.wait_until("document.body.dataset.loaded === '1'", what="first poll")
    for address in (a, b, c):
        await browser.wait_until(
            js(f'section[data-pool="main"] {row(address)}', "el.dataset.state === 'up'"),
            what=f"{address} listed as up",
        )
    assert await browser.evaluate("document.querySelectorAll('tr[data-upstream]').length") == 3
    assert await browser.evaluate(js("[data-banner=connection-lost]", "el.hidden")) is True
    assert await browser.evaluate(js("form[data-auth-form]", "el.hidden")) is True

    async with aiohttp.ClientSession() as session:
        # Traffic shows up in the live counters of every row.
        assert sorted(await send(session, server, 6)) == ["a", "a", "b", "b", "c", "c"]
        for address in (a, b, c):
            await browser.wait_until(
                js(f"{row(address)} [data-field=requests]", "el.textContent === '2'"),
                what=f"{address} shows 2 requests",
            )

        # Kill b: requests the balancer sends its way fail to connect (and are retried
        # elsewhere); the row is marked while the other two stay clean.
        await ups[1].stop()
        marked = js(row(b), "el.dataset.state === 'down' || el.dataset.errors === '1'")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not await browser.evaluate(marked):
            assert loop.time() < deadline, (
                f"killed upstream {b} never marked; page: "
                f"{await browser.evaluate('document.body.innerText')}"
            )
            await send(session, server, 3)
        assert (await api_upstream(handle.url, b))["connect_errors"] > 0
        assert await browser.evaluate(
            js(f"{row(b)} [data-badge]", "true")
        ), "a state or errors badge is shown"
        for address in (a, c):
            assert await browser.evaluate(js(row(address), "el.dataset.errors")) == "0"
            assert await browser.evaluate(js(row(address), "el.dataset.state")) == "up"

        # Press Drain on c: the API reports it disabled, the row says drained, and new
        # requests only reach a.
        await browser.click(f'{row(c)} button[data-action="drain"]')

        async def c_enabled(expected: bool) -> bool:
            return bool((await api_upstream(handle.url, c))["enabled"] is expected)

        await until(lambda: c_enabled(False), 10, f"{c} drained in /api/pools")
        await browser.wait_until(
            js(row(c), "el.dataset.state === 'drained' && el.dataset.enabled === 'false'"),
            what=f"{c} shown as drained",
        )
        await browser.wait_until(
            js(f'{row(c)} button[data-action="enable"]', "!el.disabled"), what="Enable button"
        )
        assert set(await send(session, server, 6)) == {"a"}

        # And Enable puts it back.
        await browser.click(f'{row(c)} button[data-action="enable"]')
        await until(lambda: c_enabled(True), 10, f"{c} enabled again in /api/pools")
        await browser.wait_until(js(row(c), "el.dataset.state === 'up'"), what=f"{c} up again")

    # The admin listener goes away: the banner says so; it comes back: the banner goes.
    banner = "[data-banner=connection-lost]"
    await handle.stop()
    await browser.wait_until(js(banner, "!el.hidden"), what="connection-lost banner shown")
    assert await browser.evaluate(js(banner, "el.offsetHeight > 0")), "banner is visible"
    # (the proxy's shutdown stops the new one)
    server.admin = await start_admin(server, AdminSpec(bind=f"{HOST}:{handle.port}"))
    await browser.wait_until(js(banner, "el.hidden"), timeout=15, what="banner gone")
    assert browser.errors == []


async def test_dashboard_asks_for_the_token_once_and_sends_it(recorders, proxy, browser):
    ups = [await recorders(name) for name in ("a", "b")]
    a, b = (f"{HOST}:{u.port}" for u in ups)
    config = make_config([u.url for u in ups])
    config = config.model_copy(update={"admin": AdminSpec(bind=f"{HOST}:0", token=TOKEN)})
    server = await proxy(config)
    handle = admin_of(server)

    await browser.goto(f"{handle.url}/")
    form = "form[data-auth-form]"
    await browser.wait_until(js(form, "!el.hidden"), what="token form shown on 401")
    assert await browser.evaluate("document.querySelectorAll('tr[data-upstream]').length") == 0

    await browser.click("[data-token-input]")
    await browser.type_text(TOKEN)
    await browser.press_enter()
    await browser.wait_until(js(form, "el.hidden"), what="token form gone")
    for address in (a, b):
        await browser.wait_until(js(row(address), "el.dataset.state === 'up'"), what=address)
    assert await browser.evaluate("sessionStorage.getItem('aiolb.token')") == TOKEN

    # A reload of the page in the same tab does not ask again.
    await browser.goto(f"{handle.url}/")
    await browser.wait_until(js(row(a), "el.dataset.state === 'up'"), what="rows after reload")
    assert await browser.evaluate(js(form, "el.hidden")) is True

    # Drain from the page carries the token too.
    await browser.click(f'{row(b)} button[data-action="drain"]')

    async def drained() -> bool:
        return (await api_upstream(handle.url, b, TOKEN))["enabled"] is False

    await until(drained, 10, f"{b} drained in /api/pools")

    # A token the API refuses is forgotten and asked for again.
    await browser.evaluate("sessionStorage.setItem('aiolb.token', 'wrong')")
    await browser.goto(f"{handle.url}/")
    await browser.wait_until(js(form, "!el.hidden"), what="form shown again for a wrong token")
    assert await browser.evaluate("sessionStorage.getItem('aiolb.token')") is None
    assert browser.errors == []


def test_dashboard_page_is_self_contained():
    """No CDN, no external font, script or stylesheet: the page works air-gapped."""
    html = PAGE.read_text()
    assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I) is None
    assert re.search(r"@import|url\(\s*['\"]?(https?:)?//", html, re.I) is None
    assert "<link" not in html.lower()
    for hook in ("data-upstream", "data-state", "data-action", "data-errors",
                 'data-banner="connection-lost"', "data-auth-form", "sessionStorage",
                 "Authorization", "encodeURIComponent", "data-listeners", "data-chart",
                 "retry_budget", "api/server", "api/trends"):
        assert hook in html, hook


LINE_BLUE = "the rate chart's line (--accent, #2563eb in the light scheme)"
LINE_PURPLE = "the p99 chart's line (--ejected, #8a3ffc)"


def blue(pixel: tuple[int, int, int]) -> bool:
    r, g, b = pixel
    return b > 180 and r < 90 and 60 < g < 150


def purple(pixel: tuple[int, int, int]) -> bool:
    r, g, b = pixel
    return b > 200 and 100 < r < 180 and g < 110


def dark(pixel: tuple[int, int, int]) -> bool:
    return sum(pixel) < 250  # text in the light scheme (#1d2330 and anti-aliasing)


async def test_dashboard_shows_version_listeners_names_trends_and_pool_state(
    recorders, proxy, browser, tmp_path
):
    a, b = await recorders("a"), await recorders("b")
    routes = [{"match": {"host": "api.example.com", "path_prefix": "/v1/"}, "pool": "main",
               "filters": [{"rate_limit": {"rate": "100/s"}}, "sticky"]},
              {"match": {"path_prefix": "/"}, "pool": "main"}]  # fmt: skip
    pool = {"upstreams": [{"url": a.url, "name": "app-a"}, {"url": b.url}]}
    server = await proxy(make_config([], pool=pool, routes=routes))
    server.config_path = "dashboard-test.yaml"
    handle = admin_of(server)
    port = server.listeners[0].port
    await browser.call("Emulation.setEmulatedMedia",
                       features=[{"name": "prefers-color-scheme", "value": "light"}])  # fmt: skip
    await browser.goto(f"{handle.url}/")
    await browser.wait_until("document.body.dataset.loaded === '1'", what="first poll")

    # the header: version and uptime
    await browser.wait_until(
        js("[data-field=version]", f"el.textContent === 'v{__version__}'"), what="version"
    )
    uptime = await browser.wait_until(js("[data-field=uptime]", "el.textContent"), what="uptime")
    assert re.fullmatch(r"up \d+s", uptime), uptime

    # the listeners and their routes
    listener = 'section[data-listeners] tr[data-listener="test"]'
    await browser.wait_until(
        js(f"{listener} [data-field=bind]", f"el.textContent === '{HOST}:{port}'"),
        what="listener address",
    )
    routes_text = await browser.evaluate(js(f"{listener} [data-field=routes]", "el.textContent"))
    assert routes_text == (
        "api.example.com/v1/ → main [rate_limit, sticky] 0 rate-limited/ → main"
    ), routes_text
    assert await browser.evaluate(js("section[data-listeners]", "el.hidden")) is False

    # upstream names: the config's, with the address underneath; else the address
    a_addr, b_addr = f"{HOST}:{a.port}", f"{HOST}:{b.port}"
    name_a = await browser.evaluate(js(f"{row(a_addr)} [data-field=name]", "el.innerText"))
    assert name_a.split() == ["app-a", a_addr], name_a
    assert await browser.evaluate(js(f"{row(b_addr)} [data-field=name]", "el.innerText")) == b_addr

    # the pool's retry budget and ejection state
    heading = 'section[data-pool="main"] h2'
    assert await browser.wait_until(js(f"{heading} [data-field=retry_budget]", "el.textContent"),
                                    what="retry budget") == (
        "retry budget: 10 retries left (20% of requests + 10/s), 0 denied")  # fmt: skip
    assert await browser.evaluate(js(f"{heading} [data-field=ejection]", "el.textContent")) == (
        "ejected: 0 of 2 (at most 50%)")  # fmt: skip

    # no traffic yet: the charts draw no line
    trends = 'section[data-pool="main"] .trends'
    before = await browser.screenshot(trends, save=tmp_path / "trends-before.png")
    assert before.count(blue) == 0 and before.count(purple) == 0

    # traffic: the charts fill in (a point a second, fetched every 2 s)
    rate_chart = 'section[data-pool="main"] svg[data-chart="rate"]'
    p99_chart = 'section[data-pool="main"] svg[data-chart="p99"]'
    drawn = js(rate_chart, "Number(el.dataset.count) >= 2") + " && " + js(
        p99_chart, "Number(el.dataset.count) >= 2")  # fmt: skip
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    async with aiohttp.ClientSession() as session:
        while not await browser.evaluate(drawn):
            assert loop.time() < deadline, await browser.evaluate("document.body.innerText")
            assert len(await send(session, server, 10)) == 10
    assert float(await browser.evaluate(js(rate_chart, "el.dataset.last"))) > 0
    caption = await browser.evaluate(js(f"{trends} figcaption", "el.textContent"))
    assert re.fullmatch(r"requests/s: [\d.]+ now, max [\d.]+ \(last \d+ s\)", caption), caption

    # and on screen: both lines are there, in their colours
    after = await browser.screenshot(trends, save=tmp_path / "trends-after.png")
    assert after.count(blue) > 40, LINE_BLUE
    assert after.count(purple) > 40, LINE_PURPLE
    header = await browser.screenshot("header", save=tmp_path / "header.png")
    listeners = await browser.screenshot("section[data-listeners]", save=tmp_path / "l.png")
    assert header.count(dark) > 100 and listeners.count(dark) > 200  # text is drawn
    assert browser.errors == []


async def test_dashboard_shows_each_cache_with_its_hit_ratio_and_size(
    recorders, proxy, browser, tmp_path
):
    async def cacheable(request):
        return web.Response(text="cached body", headers={"Cache-Control": "max-age=60"})

    up = await recorders("a", {"/c": cacheable})
    server = await proxy(make_config([up.url], routes=[{"pool": "main", "cache": "main"}],
                                     caches={"main": {"max_size": "1MiB"}}))  # fmt: skip
    handle = admin_of(server)
    await browser.call("Emulation.setEmulatedMedia",
                       features=[{"name": "prefers-color-scheme", "value": "light"}])  # fmt: skip
    await browser.goto(f"{handle.url}/")
    await browser.wait_until("document.body.dataset.loaded === '1'", what="first poll")
    cache_row = 'section[data-caches] tr[data-cache="main"]'
    await browser.wait_until(js(f"{cache_row} [data-field=store]", "el.textContent === 'memory'"),
                             what="the cache's row")  # fmt: skip
    assert await browser.evaluate(js(f"{cache_row} [data-field=ratio]", "el.textContent")) == "—"
    route = await browser.wait_until(js("span[data-route] [data-field=cache]", "el.textContent"),
                                     what="the route's cache")  # fmt: skip
    assert route == " cache main"
    meter = f"{cache_row} .meter"
    before = await browser.screenshot(meter, save=tmp_path / "meter-before.png")
    assert before.count(blue) == 0  # no lookups yet: an empty bar

    async with aiohttp.ClientSession() as session:
        for _ in range(4):  # a miss that is stored, then three hits
            async with session.get(proxy_url(server, "/c")) as resp:
                assert (resp.status, await resp.text()) == (200, "cached body")
    assert len(up.seen) == 1
    await browser.wait_until(js(f"{cache_row} [data-field=ratio]", "el.textContent === '75.0%'"),
                             what="hit ratio 75%")  # fmt: skip
    texts = await browser.evaluate(js(cache_row, "Array.from(el.children, (td) => td.textContent)"))
    size = texts[3]
    assert re.fullmatch(r"\d+ B of 1\.0 MiB, 1 entry", size), size
    assert int(size.split()[0]) == server.caches["main"].store.size > len("cached body")
    assert texts[4:] == ["3 hit, 0 stale, 0 revalidated, 1 miss, 0 bypass", "1", "0"], texts
    after = await browser.screenshot(meter, save=tmp_path / "meter-after.png")
    share = after.count(blue) / (after.width * after.height)
    assert 0.6 < share < 0.85, f"the bar fills three quarters, not {share:.0%}"
    section = await browser.screenshot("section[data-caches]", save=tmp_path / "caches.png")
    assert section.count(dark) > 200  # text is drawn
    assert browser.errors == []


async def test_dashboard_marks_upstreams_from_docker(recorders, proxy, browser):
    """An upstream a Docker container stands for (``providers.docker``) shows the
    container's short id beside its name, and its row says where it came from."""
    a, b = await recorders("a"), await recorders("b")
    server = await proxy(make_config([a.url, b.url]))
    pool = server.pools["main"]
    pool.upstreams[1].container = ("0123456789abcdef" * 4, "web-2")
    await browser.goto(f"{admin_of(server).url}/")
    await browser.wait_until("document.body.dataset.loaded === '1'", what="first poll")
    docker_row, file_row = row(f"{HOST}:{b.port}"), row(f"{HOST}:{a.port}")
    assert await browser.evaluate(js(docker_row, "el.dataset.source")) == "docker"
    assert await browser.evaluate(js(file_row, "el.dataset.source")) == "config"
    marked = js(f"{docker_row} [data-source=docker]", "el.textContent")
    assert await browser.evaluate(marked) == "docker 0123456789ab"
    title = await browser.evaluate(js(f"{docker_row} td", "el.title"))
    assert "Docker container web-2 0123456789ab" in title
