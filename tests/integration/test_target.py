"""The normalised request target through real sockets (issue #23, finding 3): routes,
filters, the cache, the access log and the upstream all see it; what cannot be made
safe gets 400 and a closed connection.

Requests are written by hand: an HTTP client would normalise the paths itself. nginx
1.22's answers (``location /admin { deny all; }`` before ``location / { proxy_pass
...; }``) are noted beside the cases.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config.models import AccessLogSpec
from proxy.runtime.server import ProxyServer
from tests.support import RawUpstream, make_config, raw_exchange, wait_for

Proxy = Callable[..., Awaitable[ProxyServer]]
RawUpstreams = Callable[..., Awaitable[RawUpstream]]

DENY_ADMIN: list[dict[str, Any]] = [
    {"match": {"path_prefix": "/admin"}, "pool": "main",
     "filters": [{"access": {"deny": ["0.0.0.0/0", "::/0"]}}]},
    {"match": {"path_prefix": "/"}, "pool": "main"},
]  # fmt: skip


async def ask(server: ProxyServer, target: bytes, host: bytes = b"x") -> bytes:
    """One request for ``target`` on its own connection: the whole answer."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    return await raw_exchange(server.listeners[0].port, request)


def targets(raw: RawUpstream) -> list[bytes]:
    """The request targets the upstream received."""
    return [head.split(b" ", 2)[1] for head in raw.heads]


@pytest.mark.parametrize(
    "target",  # nginx: 403 for each; /ADMIN passes (paths are case-sensitive)
    [b"/%61dmin", b"//admin", b"/./admin", b"/x/../admin", b"/a/%2e%2e/admin",
     b"/x//..//admin?q=1"],
)  # fmt: skip
async def test_encoded_and_dotted_paths_meet_the_deny_route(
    proxy: Proxy, raw_upstreams: RawUpstreams, target: bytes
) -> None:
    raw = await raw_upstreams({})
    server = await proxy(make_config([raw.url], routes=DENY_ADMIN))
    assert (await ask(server, target)).startswith(b"HTTP/1.1 403 ")
    assert (await ask(server, b"/ADMIN")).startswith(b"HTTP/1.1 200 ")
    assert targets(raw) == [b"/ADMIN"]


async def test_the_upstream_gets_the_normalised_path_and_the_query_as_sent(
    proxy: Proxy, raw_upstreams: RawUpstreams
) -> None:
    raw = await raw_upstreams({})
    server = await proxy(make_config([raw.url], routes=DENY_ADMIN))
    answer = await ask(server, b"//a/./b/%7e%78/../c%2fd?x=/../y&z=%61//")
    assert answer.startswith(b"HTTP/1.1 200 ")
    # nginx (proxy_pass with a URI): /a/b/c/d?x=/../y&z=%61// (it decodes %2F)
    assert targets(raw) == [b"/a/b/c%2Fd?x=/../y&z=%61//"]


@pytest.mark.parametrize(
    "target",
    [b"/../admin", b"/x/../../admin", b"/%2e%2E/admin", b"/a%zz", b"/a%4", b"/a%00b",  # nginx: 400
     b"/x\\..\\admin",  # nginx: 200, passed on as it came
     b"/x/..%2Fadmin"],  # nginx: 403 (decodes %2F)
)  # fmt: skip
async def test_what_cannot_be_made_safe_gets_400_and_the_connection_closes(
    proxy: Proxy, raw_upstreams: RawUpstreams, target: bytes
) -> None:
    raw = await raw_upstreams({})
    server = await proxy(make_config([raw.url], routes=DENY_ADMIN))
    # keep-alive, and a second request pipelined behind: neither is served
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = await raw_exchange(server.listeners[0].port, request)
    assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1 ") == 1
    assert b"\r\nconnection: close\r\n" in answer.lower()
    assert raw.heads == []


async def test_an_absolute_form_target_is_normalised_too(
    proxy: Proxy, raw_upstreams: RawUpstreams
) -> None:
    raw = await raw_upstreams({})
    routes = [{**r, "match": {**r["match"], "host": "a.test"}} for r in DENY_ADMIN]
    server = await proxy(make_config([raw.url], routes=routes))
    answer = await ask(server, b"http://a.test/x/../admin", host=b"a.test")
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert (await ask(server, b"http://a.test/x/..//y", host=b"a.test")).startswith(b"HTTP/1.1 200")
    assert targets(raw) == [b"/y"]


async def test_filters_the_cache_and_the_access_log_see_the_normalised_target(
    proxy: Proxy, raw_upstreams: RawUpstreams, tmp_path: Path
) -> None:
    stored = b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\n\r\nhi"
    raw = await raw_upstreams({b"/c": stored})
    log = tmp_path / "access.log"
    config = make_config([raw.url], caches={"main": {}}, routes=[
        {"match": {"path_prefix": "/api"}, "pool": "main",
         "filters": [{"rewrite": {"strip_prefix": "/api"}}]},
        {"match": {"path_prefix": "/"}, "pool": "main", "cache": "main"},
    ])  # fmt: skip
    server = await proxy(config.model_copy(update={"access_log": AccessLogSpec(path=str(log))}))
    # the rewrite filter strips the prefix it sees in the normalised path
    assert (await ask(server, b"//api/./v1")).startswith(b"HTTP/1.1 200 ")
    assert targets(raw) == [b"/v1"]
    # one cache entry for every spelling of /c
    for target in (b"/c", b"/%63", b"//c", b"/x/../c"):
        assert (await ask(server, target)).endswith(b"\r\n\r\nhi")
    assert targets(raw) == [b"/v1", b"/c"]
    # the access log has the target as routed and forwarded
    await wait_for(lambda: log.exists() and log.read_text().count('"/c"') == 4)
    assert '"/api/v1"' in log.read_text()
