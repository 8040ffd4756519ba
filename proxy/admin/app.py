"""The admin application: routes, handlers, and starting and stopping it.

| endpoint | answer |
| --- | --- |
| ``GET /healthz`` | 200 ``ok`` while the process serves |
| ``GET /readyz`` | 200 ``ready`` once listeners are bound and the config loaded, else 503 |
| ``GET /metrics`` | Prometheus text format (OpenMetrics if the scraper asks for it) |
| ``GET /api/pools`` | pools and upstreams (shape: ``proxy.admin.views``) |
| ``GET /api/server`` | version, uptime, config file, listeners and their routes |
| ``GET /api/trends`` | per pool, requests/s, 5xx share and p99 over the last 5 minutes |
| ``POST /api/pools/{pool}/upstreams/{host:port}/drain`` | no new requests to it |
| ``POST /api/pools/{pool}/upstreams/{host:port}/enable`` | back in rotation |
| ``POST /api/reload`` | ``{"applied", "errors", "changes"}``: 200, 400, 409 without a file |
| ``POST /api/stop`` | 202 ``{"stopping": true, "shutdown_timeout_s": N}``, then as SIGTERM |
| ``GET /`` | the dashboard page (``dashboard.html`` next to this module) |

A POST must carry ``Content-Type: application/json`` or ``X-Aiolb-Admin: 1`` (or, with
a token, ``Authorization``), else 403: a page on another site cannot send those, and the
admin also checks ``Host``, ``Origin`` and ``Sec-Fetch-Site`` (``proxy.admin.security``).
POST bodies are optional; one that is sent must be a JSON object with no fields
(none are defined yet), else 400. Errors are ``{"error": "..."}`` (``proxy.admin.errors``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from proxy.admin.errors import ApiError, json_errors, json_response
from proxy.admin.recent import RecentStats
from proxy.admin.security import (
    admin_token,
    allowed_hosts,
    bearer_auth,
    browser_guard,
    check_exposure,
)
from proxy.admin.trends import Trends
from proxy.admin.views import caches_view, pools_view, server_view, upstream_view
from proxy.errors import BindError
from proxy.metrics.collector import build_registry

if TYPE_CHECKING:
    from proxy.admin.control import Server
    from proxy.config import AdminSpec
    from proxy.upstream.pool import Pool, Upstream

log = logging.getLogger("aiolb.admin")

DASHBOARD = Path(__file__).with_name("dashboard.html")
PLACEHOLDER = (
    "<!doctype html><meta charset=utf-8><title>aiolb</title>"
    "<h1>aiolb admin</h1><ul><li><a href=/api/pools>/api/pools</a>"
    "<li><a href=/metrics>/metrics</a><li><a href=/healthz>/healthz</a></ul>"
)
MAX_BODY = 64 * 1024
SHUTDOWN_TIMEOUT = 2.0  # seconds an admin request may still run when the proxy stops


class AdminApi:
    """The handlers over one ``ProxyServer`` (``control.Server``); ``app()`` wires them
    into aiohttp."""

    def __init__(
        self, server: Server, token: str | None, hosts: frozenset[str] | None
    ) -> None:
        self.server = server
        self.token = token
        #: host names a ``Host`` may carry besides loopback ones (None: any)
        self.hosts = hosts
        self.registry = build_registry(server)
        self.recent = RecentStats()
        self.trends = Trends()
        self.dashboard = DASHBOARD.read_text() if DASHBOARD.exists() else PLACEHOLDER

    def app(self) -> web.Application:
        # the token first: a request without it gets 401 (what to fix), whatever else
        auth = [bearer_auth(self.token)] if self.token else []
        middlewares = [json_errors, *auth, browser_guard(self.hosts, self.token is not None)]
        app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/healthz", self.healthz)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/pools", self.pools)
        r.add_get("/api/server", self.server_info)
        r.add_get("/api/trends", self.trends_info)
        r.add_post("/api/pools/{pool}/upstreams/{upstream}/drain", self.drain)
        r.add_post("/api/pools/{pool}/upstreams/{upstream}/enable", self.enable)
        r.add_get("/api/caches", self.caches)
        r.add_post("/api/caches/{cache}/purge", self.purge)
        r.add_post("/api/reload", self.reload)
        r.add_post("/api/stop", self.stop)
        app.cleanup_ctx.append(self._sampling)
        return app

    async def _sampling(self, app: web.Application) -> AsyncIterator[None]:
        """Run the once-a-second sampler of recent rates for the app's lifetime."""
        task = asyncio.create_task(
            self.recent.run(lambda: self.server.pools, self._refresh, self.trends.sample)
        )
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=self.dashboard, content_type="text/html")

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        if self.server.ready:
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _refresh(self) -> None:
        """With worker processes, fetch their counters first (``proxy.runtime.totals``)."""
        control = self.server.control
        if control is not None:
            await control.refresh()

    async def metrics(self, request: web.Request) -> web.Response:
        await self._refresh()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(self.registry), headers={"Content-Type": content_type})

    async def pools(self, request: web.Request) -> web.Response:
        await self._refresh()
        return json_response(pools_view(self.server, self.recent))

    async def server_info(self, request: web.Request) -> web.Response:
        await self._refresh()
        return json_response(server_view(self.server))

    async def trends_info(self, request: web.Request) -> web.Response:
        return json_response(self.trends.view())

    async def drain(self, request: web.Request) -> web.Response:
        return await self._set_enabled(request, False)

    async def enable(self, request: web.Request) -> web.Response:
        return await self._set_enabled(request, True)

    async def _set_enabled(self, request: web.Request, enabled: bool) -> web.Response:
        """Drain (``enabled`` False) or enable one upstream; answer its new state."""
        await read_options(request)
        pool, upstream = self._find(request.match_info["pool"], request.match_info["upstream"])
        if upstream.enabled != enabled:
            upstream.enabled = enabled
            pool.rebuild()
            if self.server.control is not None:
                self.server.control.enabled_changed(pool.name, upstream.address, enabled)
            action = "enabled" if enabled else "drained"
            log.info("upstream %s of pool %s %s by the admin API", upstream.address,
                     pool.name, action)  # fmt: skip
        view = upstream_view(pool.name, upstream, self.recent, self.server.loop.time())
        return json_response({"pool": pool.name, **view})

    def _find(self, pool_name: str, address: str) -> tuple[Pool, Upstream]:
        pool = self.server.pools.get(pool_name)
        if pool is None:
            raise ApiError(404, f"no pool named {pool_name!r}")
        upstream = pool.upstream(address.lower())
        if upstream is not None:
            return pool, upstream
        raise ApiError(404, f"pool {pool_name!r} has no upstream {address!r} (use host:port)")

    async def caches(self, request: web.Request) -> web.Response:
        await self._refresh()
        return json_response(caches_view(self.server))

    async def purge(self, request: web.Request) -> web.Response:
        """Drop stored responses: ``{"url": "http://host/path"}`` (that one, every
        variant) or ``{"prefix": "/static/"}`` (any host; ``http://host/static/``: that
        host). Answers how many went."""
        name = request.match_info["cache"]
        if name not in self.server.caches:
            raise ApiError(404, f"no cache named {name!r}")
        body = await read_body(request)
        unknown = set(body) - {"url", "prefix"}
        if unknown or len(body) != 1:
            raise ApiError(400, 'give one of "url" or "prefix"' + (
                f" (unknown: {', '.join(sorted(unknown))})" if unknown else ""))  # fmt: skip
        kind, value = next(iter(body.items()))
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"{kind} must be a non-empty string")
        host, target = split_purge_target(value)
        if kind == "url" and host is None:
            raise ApiError(400, "url must be absolute: http://host/path")
        purged = await self.server.purge_cache(name, host, target, exact=kind == "url")
        log.info("cache %s: %d entries purged by the admin API (%s %s)", name, purged, kind,
                 value[:200])  # fmt: skip
        return json_response({"cache": name, "purged": purged})

    async def reload(self, request: web.Request) -> web.Response:
        """Same as SIGHUP: 200 if the new config was applied, 400 with its problems."""
        await read_options(request)
        if self.server.config_path is None:
            problem = "no config file to reload (this server was not started with -c FILE)"
            return json_response({"applied": False, "errors": [problem], "changes": []}, 409)
        errors, changes = await self.server.reload_report()
        answer = {"applied": not errors, "errors": errors, "changes": changes}
        return json_response(answer, 400 if errors else 200)

    async def stop(self, request: web.Request) -> web.Response:
        """Same as SIGTERM: answer, then drain and exit (the admin API stops last)."""
        await read_options(request)
        log.info("stop requested through the admin API")
        self.server.loop.call_soon(self.server.request_exit)
        timeout = self.server.config.shutdown_timeout
        return json_response({"stopping": True, "shutdown_timeout_s": timeout}, 202)


async def read_body(request: web.Request) -> dict[str, object]:
    """A POST body: nothing (an empty object), or a JSON object."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def read_options(request: web.Request) -> None:
    """Check an optional POST body: nothing, or a JSON object with no fields."""
    body = await read_body(request)
    if body:
        raise ApiError(400, f"unknown field(s): {', '.join(sorted(map(str, body)))}")


def split_purge_target(value: str) -> tuple[bytes | None, bytes]:
    """``http://Host:80/a?b`` -> (``host``, ``/a?b``); ``/a`` -> (None, ``/a``)."""
    raw = value.encode("latin-1", errors="replace")
    for scheme in (b"http://", b"https://"):
        if raw.lower().startswith(scheme):
            authority, slash, rest = raw[len(scheme) :].partition(b"/")
            return authority.lower().split(b":", 1)[0], slash + rest if slash else b"/"
    return None, raw


class AdminHandle:
    """A running admin server: where it listens, and ``stop()``."""

    def __init__(
        self, runner: web.AppRunner, host: str, port: int, token: str | None = None
    ) -> None:
        self.runner = runner
        self.host = host
        self.port = port
        #: the bearer token the API asks for (None: open)
        self.token = token

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening and end the sampler (idempotent)."""
        await self.runner.cleanup()

    def __repr__(self) -> str:
        return f"<AdminHandle {self.url}>"


async def start_admin(
    server: Server, admin: AdminSpec, *, fallback_to_any_port: bool = False
) -> AdminHandle:
    """Serve the admin API for ``server`` on ``admin.bind`` (port 0: any free port).

    Raises ``AdminError`` before binding anything when the address is not loopback and
    no token is set, and ``BindError`` naming ``admin.bind`` when the bind fails, unless
    ``fallback_to_any_port`` (the demo) lets it take a free port instead.
    """
    token = admin_token(admin)
    check_exposure(admin, token)
    app = AdminApi(server, token, allowed_hosts(admin, token)).app()
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        port = await _bind(runner, admin.host, admin.port)
    except OSError as exc:
        if not fallback_to_any_port:
            await runner.cleanup()
            raise BindError(("admin", "bind"), admin.bind, exc) from None
        log.warning("admin port %s is busy; using a free port", admin.port)
        port = await _bind(runner, admin.host, 0)
    return AdminHandle(runner, admin.host, port, token)


async def _bind(runner: web.AppRunner, host: str, port: int) -> int:
    """Start a TCP site; the bound port (useful with port 0)."""
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError:
        await site.stop()  # unregister it from the runner
        raise
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound: int = sockets[0].getsockname()[1] if sockets else port
    return bound
