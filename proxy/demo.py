"""``aiolb demo``: three demo upstreams on loopback and the proxy in front of them.

The upstreams are small aiohttp apps in the same event loop, each answering with its
own name, so round robin is visible with plain curl.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from aiohttp import web

from proxy.config import Config
from proxy.runtime.server import ProxyServer

log = logging.getLogger("aiolb")

DEMO_NAMES = ("demo-1", "demo-2", "demo-3")
DEMO_ADMIN_PORT = 9901  # the documented default; a free port if it is taken


def demo_app(name: str) -> web.Application:
    """An upstream that says who it is, echoes the path, and has /healthz."""

    async def hello(request: web.Request) -> web.Response:
        text = f"Hello from {name}: {request.method} {request.path_qs}\n"
        return web.Response(text=text, headers={"X-Upstream": name})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


async def start_upstream(
    name: str, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start one demo upstream; returns its runner and bound port."""
    runner = web.AppRunner(demo_app(name), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    sockets = getattr(server, "sockets", None) or []
    return runner, sockets[0].getsockname()[1]


def demo_config(proxy_port: int, upstream_ports: list[int], admin_port: int) -> Config:
    return Config.model_validate(
        {
            "listeners": [
                {
                    "name": "demo",
                    "bind": f"127.0.0.1:{proxy_port}",
                    "routes": [{"match": {"path_prefix": "/"}, "pool": "demo"}],
                }
            ],
            "pools": {
                "demo": {
                    "balancer": "round_robin",
                    "upstreams": [{"url": f"http://127.0.0.1:{p}"} for p in upstream_ports],
                }
            },
            "admin": {"bind": f"127.0.0.1:{admin_port}"},
        }
    )


async def run_demo(port: int = 8080, out: TextIO = sys.stdout) -> None:
    """Serve the demo until SIGINT/SIGTERM."""
    runners: list[web.AppRunner] = []
    ports: list[int] = []
    try:
        for name in DEMO_NAMES:
            runner, up_port = await start_upstream(name)
            runners.append(runner)
            ports.append(up_port)
        server = ProxyServer(demo_config(port, ports, DEMO_ADMIN_PORT))
        server.admin_fallback = True  # another aiolb on 9901 must not stop the demo
        await server.start()
        bound = server.listeners[0].port
        admin_url = server.admin.url if server.admin is not None else ""
        _print_banner(out, bound, ports, admin_url)
        server._install_signals()
        await server._stopped.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def _print_banner(out: TextIO, port: int, ports: list[int], admin_url: str) -> None:
    url = f"http://127.0.0.1:{port}"
    lines = [f"aiolb demo: proxy on {url} in front of {len(ports)} upstreams (round robin)"]
    lines += [f"  {name}  http://127.0.0.1:{p}" for name, p in zip(DEMO_NAMES, ports, strict=True)]
    lines += [
        "",
        "Try:",
        f"  curl -i {url}/",
        f"  for i in 1 2 3 4 5 6; do curl -s {url}/hello; done",
        "",
        f"Admin: dashboard {admin_url}/  metrics {admin_url}/metrics",
        f"  curl -s {admin_url}/api/pools",
        f"  curl -s -X POST {admin_url}/api/pools/demo/upstreams/127.0.0.1:{ports[0]}/drain",
        "",
        "Press Ctrl-C to stop.",
    ]
    print("\n".join(lines), file=out, flush=True)
