"""Python cost of one proxied request, without sockets (a benchmark, not a test).

Feeds a request into a real ``ClientConnection`` and the upstream's response into a
real ``UpstreamConnection``, both on fake transports, and reports microseconds of
Python per request. Syscalls and the event loop are excluded, so the figure is stable
on a busy machine and shows what the hot path itself costs.

    python loadtests/hotpath_bench.py [--requests 200000]
    python loadtests/hotpath_bench.py --balancers round_robin,peak_ewma
    python loadtests/hotpath_bench.py --filters        # each filter's cost per request
    python loadtests/hotpath_bench.py --tracing 0.01   # tracing on, this sample_rate
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.config import Config
from proxy.runtime.server import ProxyServer
from proxy.server.protocol import ClientConnection
from proxy.upstream.connection import UpstreamConnection

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 02:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 20\r\n"
    b"Connection: keep-alive\r\n\r\n01234567890123456789"
)


class FakeTransport:
    """Accepts writes and flow-control calls; counts bytes written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, data: list[bytes]) -> None:
        for d in data:
            self.written += len(d)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None: ...
    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...


#: One route's filters per variant of ``--filters`` (``none``: the route has none). Every
#: request passes: the limit is far above the rate, the address is allowed.
FILTERS: dict[str, list[Any]] = {
    "none": [],
    "rate_limit": [{"rate_limit": {"rate": "100000000/s", "key": "client_ip"}}],
    "headers": [{"headers": {"request": {"set": {"X-Client": "${client_ip}"}},
                             "response": {"set": {"X-Served-By": "aiolb"}}}}],
    "headers_request": [{"headers": {"request": {"set": {"X-Client": "${client_ip}"}}}}],
    "rewrite": [{"rewrite": {"strip_prefix": "/index"}}],
    "redirect": [{"redirect": {"scheme": "https"}}],
    "sticky": ["sticky"],
    "access": [{"access": {"allow": ["127.0.0.0/8"]}}],
    "python": [{"python": "loadtests.bench_filter:PassThrough"}],
}  # fmt: skip


def build(
    loop: asyncio.AbstractEventLoop,
    metrics: bool = True,
    access_log: str | None = None,
    balancer: str = "round_robin",
    upstreams: int = 1,
    filters: list[Any] | None = None,
    tracing: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
) -> tuple[ClientConnection, list[UpstreamConnection]]:
    """A server with one listener and pool ``p`` on fake transports. ``tracing``: the
    config's ``tracing`` section (spans queue up; nothing is exported); ``cache``: a
    memory cache's section, on the route (every request after the first is a hit)."""
    balancer_config: Any = (
        {"name": balancer, "key": "header:User-Agent"}
        if (balancer == "consistent_hash")
        else balancer
    )
    config = Config.model_validate(
        {
            "listeners": [
                {
                    "name": "b",
                    "bind": "127.0.0.1:0",
                    "routes": [
                        {"pool": "p", "filters": filters or [], "cache": "c" if cache else None}
                    ],
                    # one client connection carries every request
                    "limits": {"max_requests_per_connection": None},
                }
            ],
            "pools": {
                "p": {
                    "balancer": balancer_config,
                    "upstreams": [{"url": f"http://127.0.0.1:{9 + i}"} for i in range(upstreams)],
                }
            },
            "metrics": {"enabled": metrics},
            "access_log": {"path": access_log} if access_log else None,
            "tracing": tracing,
            "caches": {"c": cache} if cache else {},
        }
    )
    server = ProxyServer(config, loop)
    client = ClientConnection(server.listeners[0])
    client.connection_made(FakeTransport())  # type: ignore[arg-type]
    conns = []
    for upstream in server.pools["p"].upstreams:
        conn = UpstreamConnection(upstream)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        conn.uses = 1
        upstream.put_idle(conn, 0.0)
        conns.append(conn)
    return client, conns


#: A 64 KiB response, as one read from the upstream (``h2_feeder(big=True)``).
RESPONSE_64K = RESPONSE.replace(b"Content-Length: 20", b"Content-Length: 65536").replace(
    b"01234567890123456789", b"x" * 65536
)


def h2_feeder(loop: asyncio.AbstractEventLoop, big: bool = False) -> Callable[[int], float]:
    """``feed(n)``: proxy n requests from an HTTP/2 client (one h2c connection, one
    stream each, the same header block each time, as h2load sends) to an HTTP/1.1
    upstream (a 20-byte response; ``big``: 64 KiB); the process time it took. The
    event loop does not run: the writes it would make at the end of each iteration
    are made here."""
    import hpack

    from proxy.server.h2 import H2Server

    client, conns = build(loop)
    listener = client.listener
    conn = H2Server(listener)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    encoder = hpack.Encoder()
    fields = [
        (b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1:8080"),
        (b":path", b"/index.html"), (b"user-agent", b"h2load nghttp2/1.52.0"),
    ]  # fmt: skip
    first = encoder.encode(fields)
    again = encoder.encode(fields)  # every field indexed now: the same bytes from here on
    # the preface, SETTINGS with h2load's stream window, a connection window as large
    conn.data_received(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + b"\0\0\x06\x04\0\0\0\0\0\0\x04" + (2**30 - 1).to_bytes(4, "big")
        + b"\0\0\x04\x08\0\0\0\0\0" + (2**30 - 65535).to_bytes(4, "big")
    )  # fmt: skip
    conn.data_received(b"\0\0\0\x04\x01\0\0\0\0")  # SETTINGS ACK
    conn.data_received(len(first).to_bytes(3, "big") + b"\x01\x05\0\0\0\x01" + first)
    conns[0].data_received(RESPONSE)
    conn.write_now()
    head = len(again).to_bytes(3, "big") + b"\x01\x05"
    sid = [3]
    response = RESPONSE_64K if big else RESPONSE

    def feed(n: int) -> float:
        start = time.process_time()
        for _ in range(n):
            stream = sid[0]
            sid[0] += 2
            conn.data_received(head + stream.to_bytes(4, "big") + again)
            ex = conn.streams[stream].ex
            ex.conn.data_received(response)  # type: ignore[union-attr]
            conn.write_now()
        return time.process_time() - start

    return feed


def run(
    requests: int,
    metrics: bool = True,
    access_log: str | None = None,
    balancer: str = "round_robin",
    upstreams: int = 1,
    tracing: float | None = None,
) -> float:
    loop = asyncio.new_event_loop()
    tracing_config = None
    if tracing is not None:  # spans are encoded and queued; a full queue drops them
        tracing_config = {"endpoint": "http://127.0.0.1:9/v1/traces", "sample_rate": tracing}
    try:
        client, conns = build(
            loop, metrics, access_log, balancer, upstreams, tracing=tracing_config
        )
        feed = feeder(client, conns)
        feed(1000)  # warm up
        return feed(requests) / requests * 1e6
    finally:
        loop.close()


def feeder(
    client: ClientConnection, conns: list[UpstreamConnection], request: bytes = REQUEST
) -> Callable[[int], float]:
    """``feed(n)``: proxy n requests through ``client``; the process time it took. A
    request the proxy answers itself (a redirect) has no upstream response to feed."""
    feed_client = client.data_received

    def feed(n: int) -> float:  # each response to the connection the balancer picked
        start = time.process_time()
        for _ in range(n):
            feed_client(request)
            ex = client.exchange
            if ex is not None:
                ex.conn.data_received(RESPONSE)  # type: ignore[union-attr]
        elapsed = time.process_time() - start
        local = client.exchange is None and not any(c.uses > 1 for c in conns)
        assert local or sum(c.uses for c in conns) >= n, "upstream connections were not reused"
        return elapsed

    return feed


def take_turns(
    feeds: dict[str, Callable[[int], float]], requests: int, slice_: int, title: str
) -> None:
    """Run every feed, taking turns ``slice_`` requests at a time, so that the machine's
    drift (tens of percent on a shared VM) falls on all of them alike; print µs per
    request and the extra over the first."""
    names = list(feeds)
    spent = dict.fromkeys(names, 0.0)
    for feed in feeds.values():
        feed(1000)  # warm up
    for _ in range(max(1, requests // slice_)):
        for name, feed in feeds.items():
            spent[name] += feed(slice_)
    done = max(1, requests // slice_) * slice_
    cost = {name: spent[name] / done * 1e6 for name in names}
    ref = cost[names[0]]
    print(f"| {title} | µs of Python per request | extra vs {names[0]} |")
    print("| --- | ---: | ---: |")
    for name in names:
        print(f"| {name} | {cost[name]:.2f} | {cost[name] - ref:+.2f} |")


def compare(names: list[str], requests: int, upstreams: int, slice_: int = 2000) -> None:
    """Every balancer in one process (``take_turns``)."""
    loop = asyncio.new_event_loop()
    try:
        feeds = {name: feeder(*build(loop, True, None, name, upstreams)) for name in names}
        take_turns(feeds, requests, slice_, f"balancer ({upstreams} upstreams)")
    finally:
        loop.close()


def compare_filters(names: list[str], requests: int, slice_: int = 2000) -> None:
    """Each filter variant in one process (``take_turns``): µs per request, and the extra
    over the route without filters."""
    loop = asyncio.new_event_loop()
    sticky = REQUEST.replace(b"\r\n\r\n", b"\r\nCookie: aiolb_sticky=%s\r\n\r\n")
    try:
        feeds = {}
        for name in names:
            client, conns = build(loop, filters=FILTERS[name])
            request = REQUEST
            if name == "sticky":  # a returning client: its cookie names its upstream
                chain = client.listener.router.route(None, b"/").chain  # type: ignore[union-attr]
                ident = chain.filters[0][1].ident(conns[0].upstream.address)  # type: ignore[union-attr,attr-defined]
                request = sticky % ident.encode()
            feeds[name] = feeder(client, conns, request)
        take_turns(feeds, requests, slice_, "route filters")
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-metrics", action="store_true", help="metrics: {enabled: false}")
    parser.add_argument("--access-log", help="also write a JSON access log to this file")
    parser.add_argument(
        "--balancers",
        help="comma-separated algorithms to compare (the first is the reference), each over "
        "--upstreams upstreams, taking turns 2,000 requests at a time",
    )
    parser.add_argument("--upstreams", type=int, default=2, help="with --balancers")
    parser.add_argument("--tracing", type=float, metavar="RATE",
                        help="a tracing section with this sample_rate (nothing exported)")
    parser.add_argument(
        "--filters",
        nargs="?",
        const=",".join(FILTERS),
        help="comma-separated route filter variants to compare (default: all of "
        f"{', '.join(FILTERS)}; the first is the reference), taking turns",
    )
    args = parser.parse_args()
    if args.filters:
        names = args.filters.split(",")
        compare_filters(names if names[0] == "none" else ["none", *names], args.requests)
        return
    if args.balancers:
        compare(args.balancers.split(","), args.requests, args.upstreams)
        return
    best = min(
        run(args.requests, not args.no_metrics, args.access_log, tracing=args.tracing)
        for _ in range(args.repeat)
    )
    print(f"hot path: {best:.2f} µs of Python per proxied request (best of {args.repeat})")


if __name__ == "__main__":
    main()
