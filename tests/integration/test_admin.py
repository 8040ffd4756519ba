"""The admin API over real sockets: probes, /metrics counts, pools, drain, auth, errors.

Counts are checked exactly: every request sent through the proxy appears once in
``aiolb_requests_total`` and in the histogram's ``_count``, under the right upstream,
method and status, including the responses the proxy made itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.admin import AdminError, start_admin
from proxy.admin.security import is_loopback
from proxy.config import AdminSpec, Config
from proxy.metrics.collector import METRICS
from proxy.runtime.server import ProxyServer
from tests.admin_support import admin, get_json, request_counts, samples, scrape, send
from tests.support import HOST, Recorder, make_config, proxy_url, unused_port, wait_for

#: DESIGN.md "Metrics contract": exposition name -> type
CONTRACT = {
    "aiolb_requests_total": "counter",
    "aiolb_request_duration_seconds": "histogram",
    "aiolb_upstream_up": "gauge",
    "aiolb_upstream_active_requests": "gauge",
    "aiolb_upstream_connect_errors_total": "counter",
    "aiolb_upstream_connections_opened_total": "counter",
    "aiolb_retries_total": "counter",
    "aiolb_retries_denied_total": "counter",
    "aiolb_circuit_breaker_overflows_total": "counter",
    "aiolb_pending_requests": "gauge",
    "aiolb_upstream_ejections_total": "counter",
    "aiolb_health_checks_total": "counter",
    "aiolb_client_connections": "gauge",
    "aiolb_config_reloads_total": "counter",
}
UPSTREAM_FIELDS = {
    "address", "name", "weight", "backup", "healthy", "enabled", "drained", "available",
    "active", "idle", "ejected", "ejected_until", "ejections", "connections",
    "connections_opened", "waiting", "tunnels", "requests", "source", "container",
    "errors", "connect_errors", "rate", "error_rate", "p50_ms", "p99_ms",
}  # fmt: skip

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]


def address(rec: Recorder) -> str:
    return f"{HOST}:{rec.port}"


# --- probes -----------------------------------------------------------------------------


async def test_healthz_and_readyz(recorders: MakeRecorder, proxy: MakeProxy) -> None:
    server = await proxy(make_config([(await recorders("a")).url]))
    async with aiohttp.ClientSession() as session:
        async with session.get(admin(server, "/healthz")) as resp:
            assert (resp.status, await resp.text()) == (200, "ok\n")
        async with session.get(admin(server, "/readyz")) as resp:
            assert resp.status == 200
        server.ready = False  # as during a drain
        async with session.get(admin(server, "/readyz")) as resp:
            assert resp.status == 503
        async with session.get(admin(server, "/healthz")) as resp:
            assert resp.status == 200


async def test_dashboard_page_is_served(recorders: MakeRecorder, proxy: MakeProxy) -> None:
    server = await proxy(make_config([(await recorders("a")).url]))
    async with aiohttp.ClientSession() as session:
        async with session.get(admin(server, "/")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/html")
            assert "aiolb" in await resp.text()


# --- metrics ----------------------------------------------------------------------------


async def test_metrics_expose_every_contract_metric(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    server = await proxy(make_config([(await recorders("a")).url]))
    text = await scrape(server)
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name, kind in CONTRACT.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert families.get(base) == kind, (name, families.get(base))
        assert f"# TYPE {name} {kind}" in text
    assert "process_cpu_seconds_total" in text and "python_info" in text
    up = samples(text, "aiolb_upstream_up")
    assert up == {(("pool", "main"), ("upstream", server_rec(server).address)): 1.0}
    reloads = samples(text, "aiolb_config_reloads_total")
    assert reloads == {(("result", "success"),): 0.0, (("result", "failure"),): 0.0}
    # the families are METRICS (docs/metrics.md), no more, no fewer
    ours = {name: kind for name, kind in families.items() if name.startswith("aiolb_")}
    assert ours == {spec.name: spec.kind for spec in METRICS}
    # nothing answered yet: no pool="" series (it appears with the first such response)
    assert samples(text, "aiolb_request_duration_seconds_count") == {(("pool", "main"),): 0.0}


async def test_responses_before_routing_get_a_pool_empty_series(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    routes = [{"match": {"path_prefix": "/api/"}, "pool": "main"}]
    server = await proxy(make_config([(await recorders("a")).url], routes=routes))
    async with aiohttp.ClientSession() as session:
        assert (await send(session, "GET", proxy_url(server, "/nowhere")))[0] == 404
    counts = samples(await scrape(server), "aiolb_request_duration_seconds_count")
    assert counts == {(("pool", ""),): 1.0, (("pool", "main"),): 0.0}


def server_rec(server: ProxyServer) -> Any:
    """The only upstream of the ``main`` pool (has ``port`` like a Recorder)."""
    return server.pools["main"].upstreams[0]


async def test_request_counts_are_exact(recorders: MakeRecorder, proxy: MakeProxy) -> None:
    a, b = await recorders("a"), await recorders("b")
    dead = f"http://{HOST}:{unused_port()}"
    config = make_config(
        [a.url, b.url],
        routes=[{"match": {"path_prefix": "/api/"}, "pool": "main"},
                {"match": {"path_prefix": "/dead/"}, "pool": "dead"}],
        pools={"dead": {"upstreams": [{"url": dead}]}},
    )  # fmt: skip
    server = await proxy(config)
    plan = [("GET", "/api/x")] * 6 + [("POST", "/api/x")] * 2 + [("PURGE", "/api/x")] * 2
    plan += [("GET", "/nowhere")] * 3 + [("GET", "/dead/x")] * 2
    async with aiohttp.ClientSession() as session:
        statuses = [(await send(session, m, proxy_url(server, p)))[0] for m, p in plan]
    assert statuses == [200] * 10 + [404] * 3 + [502] * 2
    n = len(plan)

    def total() -> int:
        return sum(
            s.stats.total
            for s in [server, *server.pools.values(), *(u for p in server.pools.values()
                                                         for u in p.upstreams)]
        )  # fmt: skip

    await wait_for(lambda: total() == n)
    text = await scrape(server)
    expected = {("test", "", "", "GET", "404"): 3, ("test", "dead", "", "GET", "502"): 2}
    for rec in (a, b):
        for method, count in (("GET", 3), ("POST", 1), ("OTHER", 1)):
            expected[("test", "main", address(rec), method, "200")] = count
    counts = request_counts(text)
    assert {k: v for k, v in counts.items() if v} == expected
    assert sum(counts.values()) == n
    durations = samples(text, "aiolb_request_duration_seconds_count")
    assert durations == {(("pool", ""),): 3, (("pool", "dead"),): 2, (("pool", "main"),): 10}
    inf = samples(text, "aiolb_request_duration_seconds_bucket")
    assert sum(v for labels, v in inf.items() if ("le", "+Inf") in labels) == n
    errors = samples(text, "aiolb_upstream_connect_errors_total")
    dead_address = dead.removeprefix("http://")
    assert errors[(("pool", "dead"), ("upstream", dead_address))] >= 2


async def test_client_connections_and_active_requests(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="slow")

    a = await recorders("a", {"/slow": slow})
    server = await proxy(make_config([a.url]))
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(send(session, "GET", proxy_url(server, "/slow")))
        await wait_for(lambda: len(a.seen) == 1)
        text = await scrape(server)
        active = samples(text, "aiolb_upstream_active_requests")
        assert active[(("pool", "main"), ("upstream", address(a)))] == 1
        assert samples(text, "aiolb_client_connections")[(("listener", "test"),)] == 1
        release.set()
        assert await task == (200, "slow")


# --- /api/pools, drain, enable ------------------------------------------------------------


async def test_api_pools_describes_every_upstream(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    a, b = await recorders("a"), await recorders("b")
    pool = {"balancer": "weighted_round_robin",
            "upstreams": [{"url": a.url, "weight": 3, "name": "app-a"},
                          {"url": b.url, "backup": True}]}  # fmt: skip
    server = await proxy(make_config([], pool=pool))
    async with aiohttp.ClientSession() as session:
        for _ in range(4):
            assert (await send(session, "GET", proxy_url(server, "/x")))[0] == 200
    await wait_for(lambda: server.pools["main"].upstreams[0].stats.total == 4)
    status, body, headers = await get_json(server, "/api/pools")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["ready"] is True and body["window_s"] >= 0
    [main] = body["pools"]
    assert (main["name"], main["balancer"], main["available"], main["total"]) == (
        "main", "weighted_round_robin", 2, 2)  # fmt: skip
    first, second = main["upstreams"]
    assert set(first) == UPSTREAM_FIELDS
    assert (first["address"], first["weight"], first["backup"]) == (address(a), 3, False)
    assert (second["address"], second["backup"]) == (address(b), True)
    assert (first["name"], second["name"]) == ("app-a", address(b))  # default: the address
    assert first["healthy"] and first["enabled"] and not first["drained"] and first["available"]
    assert (first["requests"], first["errors"], first["active"]) == (4, 0, 0)
    assert first["ejected_until"] is None and first["ejections"] == 0 and not first["ejected"]
    assert (first["connections"], first["waiting"]) == (1, 0)  # one kept-alive connection
    assert (main["retries"], main["retries_denied"], main["pending"], main["overflows"]) == (
        0, 0, 0, 0)  # fmt: skip
    assert first["rate"] > 0 and first["error_rate"] == 0.0
    assert first["p50_ms"] is not None and first["p99_ms"] >= first["p50_ms"]
    assert second["requests"] == 0 and second["p50_ms"] is None
    # 4 requests deposited 20% each, on top of a full reserve (one second's worth: 10)
    assert main["retry_budget"] == {"left": 10.8, "percent": 20.0, "min_retries_per_second": 10.0,
                                    "denied": 0}  # fmt: skip
    assert main["ejection"] == {"passive": True, "ejected": 0, "max_percent": 50}


async def test_api_server_describes_the_listeners_and_routes(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    routes = [{"match": {"host": "api.example.com", "path_prefix": "/v1/"}, "pool": "main",
               "name": "api", "filters": [{"rate_limit": {"rate": "1/m", "burst": 1}}, "sticky",
                                          {"python": "tests.filter_support:Stamp"}]},
              {"match": {"path_prefix": "/"}, "pool": "main"}]  # fmt: skip
    server = await proxy(make_config([(await recorders("a")).url], routes=routes))
    server.config_path = "some/aiolb.yaml"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # one admitted, two rate-limited
            async with session.get(proxy_url(server, "/v1/"), headers={"Host": "api.example.com"}):
                pass
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(server, "/x")) as resp:  # keep-alive: still open
            assert resp.status == 200
            status, body, _ = await get_json(server, "/api/server")
    assert status == 200
    assert body["version"] == __version__ and body["config_path"] == "some/aiolb.yaml"
    assert body["workers"] == 1 and body["ready"] is True
    assert 0 <= body["uptime_s"] < 60 and abs(body["started_at"] - server.started_at) < 0.01
    assert body["listeners"] == [{
        "name": "test", "bind": f"{HOST}:{server.listeners[0].port}", "connections": 1,
        "routes": [{"name": "api", "host": "api.example.com", "path_prefix": "/v1/",
                    "pool": "main", "filters": ["rate_limit", "sticky",
                                                "python:tests.filter_support:Stamp"],
                    "cache": None, "rate_limited": 2},
                   {"name": "test/1", "host": None, "path_prefix": "/", "pool": "main",
                    "filters": [], "cache": None, "rate_limited": 0}],
    }]  # fmt: skip


async def test_api_trends_has_a_point_per_pool_each_second(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    routes = [{"match": {"path_prefix": "/"}, "pool": "main"},
              {"match": {"path_prefix": "/other/"}, "pool": "other"}]  # fmt: skip
    up = await recorders("a")
    other = {"other": {"upstreams": [{"url": up.url}]}}
    server = await proxy(make_config([up.url], routes=routes, pools=other))

    async def trends() -> dict[str, Any]:
        return (await get_json(server, "/api/trends"))[1]

    async with aiohttp.ClientSession() as session:

        async def two_points() -> bool:  # traffic keeps flowing while the sampler ticks
            for _ in range(5):
                assert (await send(session, "GET", proxy_url(server, "/x")))[0] == 200
            return len((await trends())["pools"].get("main", {}).get("t", [])) >= 2

        await wait_for(two_points, 10.0)
    body = await trends()
    main, other = body["pools"]["main"], body["pools"]["other"]
    assert body["points"] == 300 and set(main) == {"t", "rate", "error_rate", "p99_ms"}
    assert len(main["t"]) == len(main["rate"]) == len(main["p99_ms"]) >= 2
    assert main["t"] == sorted(main["t"]) and 0.5 < main["t"][-1] - main["t"][-2] < 3
    assert max(main["rate"]) > 0 and any(p is not None for p in main["p99_ms"])
    assert set(other["rate"]) == {0.0} and set(other["p99_ms"]) == {None}  # no traffic


async def test_drain_stops_new_requests_and_enable_restores(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="a-slow")

    a, b = await recorders("a", {"/slow": slow}), await recorders("b")
    server = await proxy(make_config([a.url, b.url]))
    path = f"/api/pools/main/upstreams/{address(a)}"
    async with aiohttp.ClientSession() as session:
        in_flight = asyncio.create_task(_slow_on(session, server, a))
        await wait_for(lambda: any(s.path == "/slow" for s in a.seen))
        status, body, _ = await get_json(server, f"{path}/drain", "POST")
        assert status == 200
        assert (body["pool"], body["address"], body["enabled"], body["drained"]) == (
            "main", address(a), False, True)  # fmt: skip
        assert body["active"] == 1  # the slow request is still running on it
        before = len(a.seen)
        answers = [await send(session, "GET", proxy_url(server, "/x")) for _ in range(6)]
        assert answers == [(200, "b")] * 6 and len(a.seen) == before
        text = await scrape(server)
        up = samples(text, "aiolb_upstream_up")
        assert up[(("pool", "main"), ("upstream", address(a)))] == 0
        release.set()
        assert await in_flight == (200, "a-slow")  # the drained upstream finished it
        status, body, _ = await get_json(server, f"{path}/enable", "POST")
        assert (status, body["enabled"], body["drained"]) == (200, True, False)
        answers = [await send(session, "GET", proxy_url(server, "/x")) for _ in range(4)]
        assert sorted(text for _, text in answers) == ["a", "a", "b", "b"]


async def _slow_on(
    session: aiohttp.ClientSession, server: ProxyServer, a: Recorder
) -> tuple[int, str]:
    """GET /slow until ``a`` (round robin) takes it; answer that response."""
    while True:
        status, text = await send(session, "GET", proxy_url(server, "/slow"))
        if text != "b":
            return status, text


async def test_drain_errors_are_json(recorders: MakeRecorder, proxy: MakeProxy) -> None:
    a = await recorders("a")
    server = await proxy(make_config([a.url]))
    status, body, _ = await get_json(server, "/api/pools/nope/upstreams/x:1/drain", "POST")
    assert status == 404 and "nope" in body["error"]
    status, body, _ = await get_json(server, "/api/pools/main/upstreams/10.9.9.9:1/drain", "POST")
    assert status == 404 and "10.9.9.9:1" in body["error"]
    url = f"/api/pools/main/upstreams/{address(a)}/drain"
    for data, word in ((b"{not json", "invalid JSON"), (b"[1]", "JSON object"),
                       (b'{"x": 1}', "unknown field")):  # fmt: skip
        status, body, _ = await get_json(server, url, "POST", data=data)
        assert status == 400 and word in body["error"], body
    assert server_rec(server).enabled  # nothing changed
    status, body, _ = await get_json(server, url, "POST", json={})
    assert status == 200 and body["drained"] is True


async def test_unknown_paths_and_wrong_methods_are_json(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    server = await proxy(make_config([(await recorders("a")).url]))
    status, body, _ = await get_json(server, "/nope")
    assert status == 404 and body == {"error": "not found: /nope"}
    status, body, headers = await get_json(server, "/api/reload")
    assert status == 405 and "POST" in headers["Allow"] and "GET" in body["error"]
    status, body, headers = await get_json(server, "/api/pools", "POST")
    assert status == 405 and "not allowed" in body["error"]
    status, body, _ = await get_json(server, "/api/reload", "POST", data=b"x" * 70_000)
    assert status == 413 and body["error"]


async def test_reload_without_a_config_file_is_409(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    server = await proxy(make_config([(await recorders("a")).url]))
    status, body, _ = await get_json(server, "/api/reload", "POST")
    assert status == 409 and body["applied"] is False and "config file" in body["errors"][0]


# --- security -----------------------------------------------------------------------------


def with_admin(config: Config, **fields: Any) -> Config:
    return config.model_copy(update={"admin": AdminSpec(bind=f"{HOST}:0", **fields)})


async def test_token_guards_everything_but_the_probes(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    server = await proxy(with_admin(make_config([(await recorders("a")).url]), token="s3cret"))
    good = {"Authorization": "Bearer s3cret"}
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/"):
            async with session.get(admin(server, path)) as resp:
                assert resp.status == 200, path
        for path, method in (("/api/pools", "GET"), ("/metrics", "GET"), ("/nope", "GET"),
                             ("/api/reload", "POST")):  # fmt: skip
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                async with session.request(method, admin(server, path), headers=headers) as r:
                    assert r.status == 401, (path, headers)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    assert "token" in (await r.json())["error"]
        async with session.get(admin(server, "/api/pools"), headers=good) as resp:
            assert resp.status == 200
        async with session.get(admin(server, "/nope"), headers=good) as resp:
            assert resp.status == 404
    assert "aiolb_requests_total" in await scrape(server, good)


async def test_token_from_the_environment(
    recorders: MakeRecorder, proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOLB_ADMIN_TOKEN", "from-env")
    server = await proxy(make_config([(await recorders("a")).url]))
    assert (await get_json(server, "/api/pools"))[0] == 401
    auth = {"Authorization": "Bearer from-env"}
    status, _, _ = await get_json(server, "/api/pools", headers=auth)
    assert status == 200


async def test_non_loopback_admin_without_token_is_refused(
    recorders: MakeRecorder, proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOLB_ADMIN_TOKEN", raising=False)
    server = await proxy(make_config([(await recorders("a")).url]))
    for bind in ("0.0.0.0:0", "[::]:0", "10.1.2.3:0", "example.com:0"):
        with pytest.raises(AdminError, match="not a loopback address"):
            await start_admin(server, AdminSpec(bind=bind))


def test_loopback_addresses() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com", ""]))


# --- browsers: DNS rebinding, cross-site and CORS-simple requests (issue #23) ------------


async def admin_call(
    server: ProxyServer, method: str, path: str, headers: dict[str, str], data: bytes = b""
) -> tuple[int, str]:
    """One request to the real admin listener with exactly these headers (``Host``
    included, when given): (status, the ``error`` of a JSON answer, else its text)."""
    async with aiohttp.ClientSession() as session:
        async with session.request(method, admin(server, path), headers=headers, data=data) as r:
            if r.content_type == "application/json":
                return r.status, str((await r.json()).get("error", ""))
            return r.status, await r.text()


async def test_a_cross_site_post_cannot_stop_the_proxy(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    # the audit's request: what any page the browser shows can send, with no preflight
    server = await proxy(make_config([(await recorders("a")).url]))
    attack = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    status, error = await admin_call(server, "POST", "/api/stop", attack, b"stop")
    assert status == 403 and "Origin 'http://evil.example'" in error
    async with aiohttp.ClientSession() as session:
        assert await send(session, "GET", proxy_url(server, "/x")) == (200, "a")
    assert server.ready and (await admin_call(server, "GET", "/readyz", {}))[0] == 200


@pytest.mark.parametrize(
    ("headers", "word"),
    [
        ({"Content-Type": "text/plain"}, "X-Aiolb-Admin"),
        ({}, "Content-Type: application/json"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, "X-Aiolb-Admin"),
        ({"Origin": "null", "X-Aiolb-Admin": "1"}, "Origin 'null'"),
        ({"Origin": "http://127.0.0.1:1", "Content-Type": "application/json"}, "Origin"),
        ({"Sec-Fetch-Site": "cross-site", "X-Aiolb-Admin": "1"}, "cross-site"),
        ({"Sec-Fetch-Site": "same-site", "X-Aiolb-Admin": "1"}, "same-site"),
    ],
)
async def test_a_post_a_page_could_send_is_refused(
    recorders: MakeRecorder, proxy: MakeProxy, headers: dict[str, str], word: str
) -> None:
    server = await proxy(make_config([(await recorders("a")).url]))
    assert server.admin is not None
    status, error = await admin_call(server, "POST", "/api/reload", headers)
    assert status == 403 and word in error, error
    up = f"/api/pools/main/upstreams/{server_rec(server).address}/drain"
    assert (await admin_call(server, "POST", up, headers))[0] == 403
    assert server_rec(server).enabled  # nothing drained


async def test_the_admins_own_pages_and_scripts_may_post(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    server = await proxy(make_config([(await recorders("a")).url]))
    assert server.admin is not None
    own = {"Origin": server.admin.url, "Sec-Fetch-Site": "same-origin"}
    for headers in ({"X-Aiolb-Admin": "1"}, {"Content-Type": "application/json; charset=utf-8"},
                    {**own, "X-Aiolb-Admin": "yes"}, {**own, "Content-Type": "application/json"},
                    {"Sec-Fetch-Site": "none", "X-Aiolb-Admin": "1"}):  # fmt: skip
        status, error = await admin_call(server, "POST", "/api/reload", headers)
        assert status == 409 and error == "", (headers, error)  # reached the handler
    # even the dashboard's own page marks its POSTs: a form on another site could not
    status, error = await admin_call(server, "POST", "/api/reload", own)
    assert status == 403 and "X-Aiolb-Admin" in error


async def test_a_rebound_host_name_cannot_read_the_api(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    # DNS rebinding: evil.example now resolves to 127.0.0.1, and its page reads the API
    server = await proxy(make_config([(await recorders("a")).url]))
    evil = {"Host": "evil.example:9901"}
    for path in ("/api/pools", "/metrics", "/", "/nope"):
        status, error = await admin_call(server, "GET", path, evil)
        assert status == 403 and "Host 'evil.example:9901' is not allowed" in error, path
    for path in ("/healthz", "/readyz"):  # probes name the pod's IP: any Host
        assert (await admin_call(server, "GET", path, evil))[0] == 200, path
    for host in ("localhost:9901", "LOCALHOST.", "127.8.0.1", "[::1]:9901", f"{HOST}:1"):
        assert (await admin_call(server, "GET", "/api/pools", {"Host": host}))[0] == 200, host
    for host in ("localhost.evil.example", "127.0.0.1.evil.example", "0.0.0.0:9901"):
        assert (await admin_call(server, "GET", "/api/pools", {"Host": host}))[0] == 403, host


async def test_allowed_hosts_name_more_hosts_or_any(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    config = make_config([(await recorders("a")).url])
    server = await proxy(with_admin(config, allowed_hosts=["aiolb.internal"]))
    for host, status in (("aiolb.internal:9901", 200), ("AIOLB.internal", 200),
                         ("localhost", 200), ("evil.example", 403)):  # fmt: skip
        assert (await admin_call(server, "GET", "/api/pools", {"Host": host}))[0] == status, host
    headers = {"Host": "aiolb.internal:9", "Origin": "http://aiolb.internal:9"}
    headers["Content-Type"] = "application/json"
    assert (await admin_call(server, "POST", "/api/reload", headers))[0] == 409
    anywhere = await proxy(with_admin(config, allowed_hosts=["*"]))
    assert (await admin_call(anywhere, "GET", "/api/pools", {"Host": "evil.example"}))[0] == 200


async def test_with_a_token_any_host_unless_allowed_hosts_says(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    config = make_config([(await recorders("a")).url])
    auth = {"Authorization": "Bearer s3cret"}
    server = await proxy(with_admin(config, token="s3cret"))
    # a remote admin is reached by names the proxy cannot know; the token guards the API
    status, _ = await admin_call(server, "GET", "/api/pools", {**auth, "Host": "lb-1.corp:9901"})
    assert status == 200
    # the bearer header is one no page can send cross-site without a preflight: enough
    assert (await admin_call(server, "POST", "/api/reload", auth))[0] == 409
    cross = {**auth, "Origin": "http://evil.example", "Content-Type": "application/json"}
    assert (await admin_call(server, "POST", "/api/reload", cross))[0] == 403
    listed = await proxy(with_admin(config, token="s3cret", allowed_hosts=["lb-1.corp"]))
    for host, status in (("lb-1.corp:9901", 200), ("evil.example", 403), ("127.0.0.1", 200)):
        got, _ = await admin_call(listed, "GET", "/api/pools", {**auth, "Host": host})
        assert got == status, host


def test_allowed_hosts_are_names_without_ports() -> None:
    admin_ = AdminSpec(allowed_hosts=["Aiolb.Internal.", "[::1]", "10.0.0.7", "*"])
    assert admin_.allowed_hosts == ("aiolb.internal", "::1", "10.0.0.7", "*")
    for bad, word in (("aiolb.internal", "list of host names"), (["a.b:9901"], "port"),
                      (["*.example.com"], "invalid host name"), ([""], "invalid"),
                      (["[::1]:9901"], "invalid"), (["http://a.b"], "invalid")):  # fmt: skip
        with pytest.raises(ValueError, match=word):
            AdminSpec(allowed_hosts=bad)
