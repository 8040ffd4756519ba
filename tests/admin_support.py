"""Helpers for tests of the admin listener: its URLs, JSON calls, parsed ``/metrics``."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin.security import ADMIN_HEADER
from proxy.runtime.server import ProxyServer


def admin(server: ProxyServer, path: str) -> str:
    assert server.admin is not None
    return f"{server.admin.url}{path}"


async def scrape(server: ProxyServer, headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(admin(server, "/metrics"), headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return await resp.text()


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Sample name -> {sorted labels: value} of one exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def request_counts(text: str) -> dict[tuple[str, str, str, str, str], int]:
    """``aiolb_requests_total`` as (listener, pool, upstream, method, code) -> count."""
    out = {}
    for labels, value in samples(text, "aiolb_requests_total").items():
        d = dict(labels)
        key = (d["listener"], d["pool"], d["upstream"], d["method"], d["code"])
        out[key] = int(value)
    return out


async def get_json(
    server: ProxyServer, path: str, method: str = "GET", **kw: Any
) -> tuple[int, Any, dict[str, str]]:
    """One admin call; a POST carries ``X-Aiolb-Admin`` as ``aiolb reload`` and the
    dashboard do (the admin refuses a POST that a web page could send)."""
    if method not in ("GET", "HEAD"):
        kw["headers"] = {ADMIN_HEADER: "1", **(kw.get("headers") or {})}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, admin(server, path), **kw) as resp:
            return resp.status, await resp.json(), dict(resp.headers)


async def send(session: aiohttp.ClientSession, method: str, url: str) -> tuple[int, str]:
    async with session.request(method, url) as resp:
        return resp.status, await resp.text()
