"""DNS service discovery against a real DNS server on 127.0.0.1 (dnslib's), whose
records the test changes: the pool's upstreams follow them, keeping the state of
addresses that stay, and a failing resolver keeps the last good set."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSServer

from proxy.config import Config, load_config
from proxy.runtime.server import ProxyServer
from proxy.upstream.discovery import ResolveError, build_query, parse_answer
from tests.support import make_config, proxy_url, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]


class Records(BaseResolver):  # type: ignore[misc]
    """Answers A/AAAA queries from ``addresses`` (name -> list), with ``ttl``."""

    def __init__(self) -> None:
        self.addresses: dict[str, list[str]] = {}
        self.ttl = 1
        self.fail = False
        self.queries = 0

    def resolve(self, request: Any, handler: Any) -> Any:
        self.queries += 1
        reply = request.reply()
        if self.fail:
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        name = str(request.q.qname).rstrip(".")
        if name not in self.addresses:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for address in self.addresses[name]:
            v6 = ":" in address
            if request.q.qtype == (QTYPE.AAAA if v6 else QTYPE.A):
                rdata = AAAA(address) if v6 else A(address)
                reply.add_answer(RR(request.q.qname, request.q.qtype, rdata=rdata, ttl=self.ttl))
        return reply


@pytest.fixture
def dns() -> Iterator[tuple[Records, int]]:
    records = Records()
    server = DNSServer(records, port=0, address="127.0.0.1")
    server.start_thread()
    try:
        yield records, server.server.server_address[1]
    finally:
        server.stop()
        server.server.server_close()


@pytest.fixture
async def named_upstreams() -> AsyncIterator[Callable[[list[str]], Awaitable[int]]]:
    """Upstreams on several loopback addresses sharing one port, each answering with
    its address."""
    runners: list[web.AppRunner] = []

    async def start(hosts: list[str]) -> int:
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        for host in hosts:
            async def hello(request: web.Request, host: str = host) -> web.Response:
                return web.Response(text=host)

            app = web.Application()
            app.router.add_get("/{tail:.*}", hello)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, port).start()
            runners.append(runner)
        return port

    yield start
    for runner in runners:
        await runner.cleanup()


def addresses(server: ProxyServer) -> list[str]:
    return sorted(u.address for u in server.pools["main"].upstreams)


async def answers(server: ProxyServer, n: int) -> set[str]:
    async with aiohttp.ClientSession() as session:
        seen = set()
        for _ in range(n):
            async with session.get(proxy_url(server)) as resp:
                assert resp.status == 200
                seen.add(await resp.text())
        return seen


async def test_upstreams_follow_the_records(
    proxy: MakeProxy, dns: tuple[Records, int], named_upstreams: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "aiolb")
    records, dns_port = dns
    port = await named_upstreams(["127.0.0.1", "127.0.0.2", "127.0.0.3"])
    records.addresses["web.test"] = ["127.0.0.1", "127.0.0.2"]
    config = make_config([f"dns://web.test:{port}"], pool={
        "dns_refresh": "100ms", "dns_resolver": f"127.0.0.1:{dns_port}",
        "health_check": {"active": {"interval": "100ms", "path": "/"}}})  # fmt: skip
    server = await proxy(config)
    assert addresses(server) == [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]  # before serving
    assert await answers(server, 6) == {"127.0.0.1", "127.0.0.2"}

    kept = server.pools["main"].upstream(f"127.0.0.1:{port}")
    assert kept is not None
    kept.enabled = False  # drained by the operator: that must survive a DNS change
    server.pools["main"].rebuild()
    records.addresses["web.test"] = ["127.0.0.1", "127.0.0.3"]
    await wait_for(lambda: addresses(server) == [f"127.0.0.1:{port}", f"127.0.0.3:{port}"])
    assert server.pools["main"].upstream(f"127.0.0.1:{port}") is kept and not kept.enabled
    assert await answers(server, 6) == {"127.0.0.3"}
    assert server.checker.healthy("main", f"127.0.0.3:{port}") is True  # probed too
    assert server.checker.healthy("main", f"127.0.0.2:{port}") is None  # no longer

    # the resolver fails: the last good set stays, and the failure is logged
    records.fail = True
    before = records.queries
    await wait_for(lambda: records.queries >= before + 4)
    assert addresses(server) == [f"127.0.0.1:{port}", f"127.0.0.3:{port}"]
    assert any("cannot resolve web.test" in r.getMessage() and "keeping the last 2" in
               r.getMessage() for r in caplog.records)  # fmt: skip
    records.fail = False
    records.addresses["web.test"] = ["127.0.0.2"]
    await wait_for(lambda: addresses(server) == [f"127.0.0.2:{port}"])
    assert await answers(server, 3) == {"127.0.0.2"}


async def test_system_resolver_and_a_reload_keep_the_set(
    proxy: MakeProxy, named_upstreams: Any, tmp_path: Any
) -> None:
    port = await named_upstreams(["127.0.0.1"])
    path = tmp_path / "aiolb.yaml"
    text = f"""\
listeners:
  - name: test
    bind: "127.0.0.1:0"
    routes: [{{pool: main}}]
pools:
  main:
    upstreams: [{{url: "dns://localhost:{port}"}}]
admin: {{bind: "127.0.0.1:0"}}
"""
    path.write_text(text)
    server = await proxy(load_config(str(path)))
    server.config_path = str(path)
    assert f"127.0.0.1:{port}" in addresses(server)  # from /etc/hosts via getaddrinfo
    upstream = server.pools["main"].upstream(f"127.0.0.1:{port}")
    path.write_text(text.replace("upstreams:", "max_idle_connections: 8\n    upstreams:"))
    assert await server.reload() == []
    assert server.pools["main"].upstream(f"127.0.0.1:{port}") is upstream  # same state


def test_dns_answers_are_parsed_with_their_smallest_ttl() -> None:
    query = DNSRecord.parse(build_query("web.test", 1, 4242))
    assert (str(query.q.qname), query.q.qtype, query.header.id) == ("web.test.", QTYPE.A, 4242)
    reply = query.reply()
    reply.add_answer(RR("web.test", QTYPE.CNAME, rdata=CNAME("real.test"), ttl=60))
    reply.add_answer(RR("real.test", QTYPE.A, rdata=A("10.0.0.1"), ttl=30))
    reply.add_answer(RR("real.test", QTYPE.A, rdata=A("10.0.0.2"), ttl=7))
    reply.add_answer(RR("real.test", QTYPE.AAAA, rdata=AAAA("fd00::1"), ttl=20))
    assert parse_answer(reply.pack(), 4242) == (["10.0.0.1", "10.0.0.2", "fd00::1"], 7)
    reply = query.reply()
    reply.header.rcode = RCODE.NXDOMAIN
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        parse_answer(reply.pack(), 4242)
    with pytest.raises(ResolveError, match="another query"):
        parse_answer(query.reply().pack(), 1)
