"""gRPC through aiolb, as its users run it: grpcio clients (``grpc.aio``) to real
grpcio servers behind a pool with ``http_version: "2"``, on an h2c listener. Per-call
balancing, the four call kinds streaming both ways, 8 MiB messages, errors with their
details and trailing metadata, deadlines (the client's and the proxy's reading of
``grpc-timeout``), every upstream gone, and the proxy's own answers as gRPC statuses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from tests.grpc_support import OPTIONS, SERVICE, GrpcServer, raw_call
from tests.support import HOST, make_config, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]


def grpc_config(urls: list[str], **pool: Any) -> Config:
    return make_config(
        urls, pool={"http_version": "2", **pool},
        listener={"protocols": ["http/1.1", "h2c"]},
    )  # fmt: skip


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


async def test_calls_on_one_channel_are_balanced_per_call(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a, b = servers("a"), servers("b")
    server = await proxy(grpc_config([a.url, b.url]))
    unary = channel(server).unary_unary(method("Unary"))
    answers = [await unary(b"x", timeout=5) for _ in range(8)]
    # one client connection, yet each call went to the next upstream (round robin)
    assert sorted(answers) == [b"a:x"] * 4 + [b"b:x"] * 4
    assert answers[0] != answers[1]
    assert (a.calls, b.calls) == (4, 4)
    # and the proxy holds one multiplexed connection per upstream, not one per call
    assert all(len(u.h2 or ()) == 1 for u in server.pools["main"].upstreams)


async def test_the_four_call_kinds_stream_both_ways(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a = servers("a")
    server = await proxy(grpc_config([a.url]))
    ch = channel(server)
    assert await ch.unary_unary(method("Unary"))(b"hi", timeout=5) == b"a:hi"
    replies = [m async for m in ch.unary_stream(method("ServerStream"))(b"300", timeout=5)]
    assert replies == [b"%d" % i for i in range(300)]

    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            yield b"%d," % i

    joined = await ch.stream_unary(method("ClientStream"))(parts(), timeout=5)
    assert joined == b"".join(b"%d," % i for i in range(50))
    # bidi in lock step: each reply must come back before the next message is sent, so
    # nothing on the way may wait for the whole stream
    call = ch.stream_stream(method("Bidi"))(timeout=5)
    for i in range(20):
        await call.write(b"m%d" % i)
        assert await call.read() == b"a:m%d" % i
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_eight_mib_messages_pass_both_ways(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a = servers("a")
    server = await proxy(grpc_config([a.url]))
    message = bytes(range(256)) * (32 * 1024)  # 8 MiB
    answer = await channel(server).unary_unary(method("Big"))(message, timeout=20)
    assert answer == message + message[:1]


async def test_an_error_keeps_its_status_details_and_trailing_metadata(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a = servers("a")
    server = await proxy(grpc_config([a.url]))
    call = channel(server).unary_unary(method("Fail"))(b"no such thing", timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "bad request: no such thing"
    assert ("x-detail", "why") in tuple(caught.value.trailing_metadata() or ())
    assert a.calls == 1  # an application error is not retried


async def test_the_client_deadline_cancels_the_upstream_call(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a = servers("a")
    server = await proxy(grpc_config([a.url]))
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel(server).unary_unary(method("Slow"))(b"3", timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5
    # the client's reset reached the upstream side: no stream stays open there
    upstream = server.pools["main"].upstreams[0]
    await wait_for(lambda: all(not c.streams for c in upstream.h2 or ()))


async def test_the_proxy_ends_a_call_at_its_grpc_timeout(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer]
) -> None:
    """A client that sends ``grpc-timeout`` but enforces nothing itself gets
    DEADLINE_EXCEEDED from the proxy when the deadline passes."""
    a = servers("a")
    server = await proxy(grpc_config([a.url]))
    started = time.monotonic()
    head, body, trailers = await raw_call(
        server.listeners[0].port, "Slow", b"3", [(b"grpc-timeout", b"300m")]
    )
    took = time.monotonic() - started
    assert 0.3 <= took < 2.0
    status = dict(head)
    assert status[b":status"] == b"200" and status[b"content-type"] == b"application/grpc"
    assert status[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED, trailers-only
    assert body == b"" and trailers == []


async def test_every_upstream_gone_is_unavailable(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a = servers("a")
    server = await proxy(grpc_config([a.url]))
    unary = channel(server).unary_unary(method("Unary"))
    assert await unary(b"1", timeout=5) == b"a:1"
    a.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(b"2", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no connection to the upstream" in (caught.value.details() or "")


async def test_a_refused_connect_is_retried_on_another_upstream(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a, b = servers("a"), servers("b")
    server = await proxy(grpc_config([a.url, b.url]))
    b.stop()  # nothing reached b: the call goes to a
    unary = channel(server).unary_unary(method("Unary"))
    assert [await unary(b"x", timeout=5) for _ in range(4)] == [b"a:x"] * 4


async def test_the_proxys_own_answers_are_grpc_statuses(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer]
) -> None:
    """A rate limit's 429 is RESOURCE_EXHAUSTED: a trailers-only answer with
    ``content-type: application/grpc``, never UNKNOWN."""
    a = servers("a")
    config = make_config(
        [a.url], pool={"http_version": "2"},
        listener={"protocols": ["http/1.1", "h2c"]},
        routes=[
            {"match": {"path_prefix": "/t.Echo/"}, "pool": "main",
             "filters": [{"rate_limit": {"rate": "1/m", "burst": 1}}]},
        ],
    )  # fmt: skip
    server = await proxy(config)
    port = server.listeners[0].port
    head, _, _ = await raw_call(port, "Unary", b"first")
    assert dict(head)[b":status"] == b"200"
    limited, body, _ = await raw_call(port, "Unary", b"second")
    assert dict(limited)[b"grpc-status"] == b"8"  # RESOURCE_EXHAUSTED
    assert dict(limited)[b"content-type"] == b"application/grpc" and body == b""


async def test_no_route_is_unimplemented(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer], channel: Any
) -> None:
    a = servers("a")
    config = make_config(
        [a.url], pool={"http_version": "2"}, listener={"protocols": ["http/1.1", "h2c"]},
        routes=[{"match": {"path_prefix": "/other.Service/"}, "pool": "main"}],
    )  # fmt: skip
    server = await proxy(config)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel(server).unary_unary(method("Unary"))(b"x", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert a.calls == 0


async def test_many_concurrent_calls_share_few_upstream_connections(
    proxy: MakeProxy, servers: Callable[[str], GrpcServer]
) -> None:
    a = servers("a")
    server = await proxy(grpc_config([a.url]))

    def many() -> list[bytes]:
        # grpcio's blocking client, its calls in its own threads: grpc.aio's poller,
        # bound to an event loop, now and then never woke this test's (a new loop per
        # test): the 200 calls, READY, went unsent and hit their deadline
        with grpc.insecure_channel(f"{HOST}:{server.listeners[0].port}", options=OPTIONS) as ch:
            unary = ch.unary_unary(method("Unary"))
            calls = [unary.future(b"%d" % i, timeout=10) for i in range(200)]
            return [call.result() for call in calls]

    answers = await asyncio.get_running_loop().run_in_executor(None, many)
    assert sorted(answers) == sorted(b"a:%d" % i for i in range(200))
    upstream = server.pools["main"].upstreams[0]
    # 200 calls at once over streams of at most 100 per connection: a few connections
    assert upstream.stats.connections_opened <= 4
