"""The idle connections of a pool with ``send_proxy_protocol`` (``Upstream.owned``):
kept by the PROXY header they sent, reused only for a request that would send the same
one, given way at ``max_connections``, trimmed by the idle sweep. Fed by hand."""

from __future__ import annotations

from typing import Any

from proxy.config import Config
from proxy.proxy_protocol import Addresses, v2
from proxy.upstream.acquire import OPENING, QUEUED, acquire
from proxy.upstream.pool import Pool, Upstream
from tests.unit.test_acquire import NOW, FakeConn, FakeLoop, FakeWaiter

A = Addresses("192.0.2.1", 1000, "198.51.100.1", 80)
B = Addresses("192.0.2.2", 2000, "198.51.100.1", 80)


class KeyedConn(FakeConn):
    def __init__(self, name: str, upstream: Upstream, client: Addresses) -> None:
        super().__init__(name)
        self.upstream = upstream
        self.proxy_key = v2(client)

    def close(self) -> None:
        super().close()
        self.upstream.forget(self)  # type: ignore[arg-type]  # as the real one does


class ClientWaiter(FakeWaiter):
    def __init__(self, client: Addresses) -> None:
        super().__init__()
        self.client = client

    def proxy_addresses(self) -> Addresses:
        return self.client


def make_upstream(max_connections: int = 4) -> Upstream:
    config = Config.model_validate({
        "listeners": [{"name": "l", "bind": "127.0.0.1:0", "routes": [{"pool": "p"}]}],
        "pools": {"p": {
            "upstreams": [{"url": "http://127.0.0.1:9000"}],
            "send_proxy_protocol": "v2",
            "circuit_breaker": {"max_connections": max_connections},
        }},
    })  # fmt: skip
    return Pool("p", config.pools["p"]).upstreams[0]


def ask(upstream: Upstream, waiter: FakeWaiter, loop: FakeLoop | None = None) -> Any:
    return acquire(upstream, waiter, loop or FakeLoop(), NOW)  # type: ignore[arg-type]


def test_an_idle_connection_serves_only_its_own_client() -> None:
    upstream = make_upstream()
    upstream.conns = 1
    conn = KeyedConn("a", upstream, A)
    upstream.put_idle(conn, 1.0)  # type: ignore[arg-type]
    assert not upstream.idle and upstream.owned == {v2(A): [conn]}
    assert upstream.take_idle() is None  # the fast path never sees it
    other, loop = ClientWaiter(B), FakeLoop()
    ticket = ask(upstream, other, loop)  # B: a connection of its own
    assert ticket is not None and ticket.state is OPENING and len(loop.tasks) == 1
    mine = ClientWaiter(A)
    assert ask(upstream, mine) is None and mine.answers == [("granted", conn)]
    assert upstream.owned == {}


def test_at_max_connections_another_client_s_idle_one_gives_way() -> None:
    upstream = make_upstream(max_connections=2)
    upstream.conns = 2
    old, recent = KeyedConn("old", upstream, A), KeyedConn("recent", upstream, B)
    upstream.put_idle(old, 1.0)  # type: ignore[arg-type]
    upstream.put_idle(recent, 2.0)  # type: ignore[arg-type]
    third = Addresses("192.0.2.3", 3000, "198.51.100.1", 80)
    ticket = ask(upstream, ClientWaiter(third))
    assert ticket is not None and ticket.state is QUEUED
    assert old.closed and not recent.closed  # the least recently used one
    assert upstream.owned == {v2(B): [recent]}


def test_a_freed_connection_is_closed_not_handed_to_a_waiting_client() -> None:
    upstream = make_upstream(max_connections=1)
    upstream.conns = 1
    waiting = ask(upstream, ClientWaiter(B))
    assert waiting is not None and waiting.state is QUEUED
    conn = KeyedConn("a", upstream, A)
    upstream.put_idle(conn, 1.0)  # type: ignore[arg-type]
    assert conn.closed and upstream.owned == {}  # its close lets the waiter open one


def test_the_idle_sweep_trims_them() -> None:
    upstream = make_upstream()
    old, new = KeyedConn("old", upstream, A), KeyedConn("new", upstream, B)
    upstream.put_idle(old, 1.0)  # type: ignore[arg-type]
    upstream.put_idle(new, 50.0)  # type: ignore[arg-type]
    upstream.pool.sweep(10.0 + upstream.pool.idle_timeout)
    assert old.closed and not new.closed and upstream.owned == {v2(B): [new]}
