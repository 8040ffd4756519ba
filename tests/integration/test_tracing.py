"""Tracing end to end: a real OTLP/HTTP receiver (aiohttp, decoding the protobuf with
opentelemetry-proto), the proxy, and recording upstreams on 127.0.0.1.

What the upstream receives (``traceparent``, ``tracestate``) and what the receiver
gets (spans, their parents, attributes) for a request with no parent, with a client's
sampled and unsampled parents, with an invalid one, and for retried requests.
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.config import Config
from proxy.config.models import TracingSpec
from proxy.runtime.server import ProxyServer
from tests.support import HOST, Aiolb, Recorder, make_config, proxy_url, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]

TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass
class Receiver:
    """An OTLP/HTTP receiver: every span it was sent, and each export's headers."""

    spans: list[Span] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def handle(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        self.headers.append(dict(request.headers))
        for rs in message.resource_spans:
            self.resources.append({kv.key: kv.value.string_value
                                   for kv in rs.resource.attributes})  # fmt: skip
            for ss in rs.scope_spans:
                assert ss.scope.name == "aiolb"
                self.spans.extend(ss.spans)
        return web.Response(content_type="application/x-protobuf", body=b"")

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", rec.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    rec.port = runner.addresses[0][1]
    yield rec
    await runner.cleanup()


def traced(config: Config, receiver: Receiver, **tracing: Any) -> Config:
    settings = {"endpoint": receiver.url, "sample_rate": 1.0, **tracing}
    return config.model_copy(update={"tracing": TracingSpec.model_validate(settings)})


def attrs(span: Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        out[kv.key] = getattr(kv.value, kv.value.WhichOneof("value"))
    return out


def sent(rec: Recorder, i: int = -1) -> tuple[str, str, str]:
    """The (trace id, parent id, flags) of the ``traceparent`` the upstream received."""
    m = TRACEPARENT.fullmatch(rec.seen[i].headers["traceparent"])
    assert m is not None, rec.seen[i].headers
    return m.group(1), m.group(2), m.group(3)


async def fetch(server: ProxyServer, headers: dict[str, str] | None = None,
                path: str = "/a?secret=1") -> int:  # fmt: skip
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(server, path), headers=headers or {}) as resp:
            await resp.read()
            return resp.status


async def test_a_request_without_a_parent_starts_a_sampled_trace(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    up = await recorders("up")
    server = await proxy(traced(make_config([up.url]), receiver, service_name="edge",
                                headers={"X-Api-Key": "k1"}))  # fmt: skip
    assert await fetch(server) == 200
    trace, parent, flags = sent(up)
    assert flags == "01"
    await wait_for(lambda: len(receiver.trace(trace)) == 2)
    client, srv = sorted(receiver.trace(trace), key=lambda s: s.kind, reverse=True)
    assert (srv.kind, client.kind) == (Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT)
    assert srv.parent_span_id == b""  # the root
    assert client.parent_span_id == srv.span_id
    assert client.span_id.hex() == parent  # the upstream's parent is the CLIENT span
    assert srv.start_time_unix_nano <= client.start_time_unix_nano
    assert client.end_time_unix_nano <= srv.end_time_unix_nano
    a = attrs(srv)
    assert a["http.request.method"] == "GET" and a["url.path"] == "/a"  # no query
    assert a["url.scheme"] == "http" and a["server.address"] == HOST
    assert a["server.port"] == server.listeners[0].port
    assert a["client.address"] == HOST and a["network.protocol.version"] == "1.1"
    assert a["http.response.status_code"] == 200 and "error.type" not in a
    assert (a["aiolb.route"], a["aiolb.pool"], a["aiolb.listener"]) == ("test/0", "main", "test")
    assert a["aiolb.upstream"] == f"{HOST}:{up.port}" and a["aiolb.attempts"] == 1
    c = attrs(client)
    assert c["server.address"] == HOST and c["server.port"] == up.port
    assert c["url.full"] == f"http://{HOST}:{up.port}/a" and c["http.response.status_code"] == 200
    assert srv.status.code == client.status.code == 0  # unset: no error
    assert receiver.resources[0] == {"service.name": "edge"}
    assert receiver.headers[0]["X-Api-Key"] == "k1"
    assert receiver.headers[0]["Content-Type"] == "application/x-protobuf"
    assert up.seen[0].headers["X-Request-ID"] == a["aiolb.request_id"]


async def test_a_clients_sampled_parent_is_continued(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    up = await recorders("up")
    server = await proxy(traced(make_config([up.url]), receiver, sample_rate=0.0))
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert await fetch(server, {"traceparent": tp, "tracestate": "vendor=x"}) == 200
    trace, parent, flags = sent(up)
    assert (trace, flags) == (CLIENT_TRACE, "01") and parent != CLIENT_SPAN
    assert up.seen[0].headers["tracestate"] == "vendor=x"
    assert [v for k, v in up.seen[0].raw_headers if k.lower() == b"traceparent"] == [
        f"00-{trace}-{parent}-01".encode()
    ]  # the client's was replaced, not added to
    await wait_for(lambda: len(receiver.trace(CLIENT_TRACE)) == 2)
    srv = next(s for s in receiver.trace(CLIENT_TRACE) if s.kind == Span.SPAN_KIND_SERVER)
    assert srv.parent_span_id.hex() == CLIENT_SPAN and srv.trace_state == "vendor=x"


async def test_a_clients_unsampled_parent_is_continued_unsampled(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    up = await recorders("up")
    server = await proxy(traced(make_config([up.url]), receiver, sample_rate=1.0))
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    for _ in range(3):
        assert await fetch(server, {"traceparent": tp}) == 200
    parents = set()
    for i in range(3):
        trace, parent, flags = sent(up, i)
        assert (trace, flags) == (CLIENT_TRACE, "00")
        parents.add(parent)
    assert CLIENT_SPAN not in parents and len(parents) == 3  # a child each time
    # a sampled request after them flushes: still none of the unsampled ones' spans
    assert await fetch(server) == 200
    await wait_for(lambda: len(receiver.spans) == 2)
    assert receiver.trace(CLIENT_TRACE) == []


async def test_unsampled_new_traces_still_send_a_traceparent(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    up = await recorders("up")
    server = await proxy(traced(make_config([up.url]), receiver, sample_rate=0.0))
    invalid = "00-" + "0" * 32 + f"-{CLIENT_SPAN}-01"  # an all-zero trace id is invalid
    assert await fetch(server) == 200
    assert await fetch(server, {"traceparent": invalid, "tracestate": "a=b"}) == 200
    first, second = sent(up, 0), sent(up, 1)
    assert first[2] == second[2] == "00" and first[0] != second[0] != "0" * 32
    assert "tracestate" not in up.seen[1].headers  # it belonged to the invalid parent
    assert server.tracer is not None and server.tracer.exporter.queue == []


async def test_without_tracing_trace_headers_pass_through_untouched(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("up")
    server = await proxy(make_config([up.url]))
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert await fetch(server, {"traceparent": tp, "tracestate": "v=1"}) == 200
    assert await fetch(server) == 200
    assert (up.seen[0].headers["traceparent"], up.seen[0].headers["tracestate"]) == (tp, "v=1")
    assert "traceparent" not in up.seen[1].headers


async def retrying(recorders: MakeRecorder) -> tuple[Recorder, Recorder, Config]:
    """An upstream answering 503, a backup answering 200, and a pool that retries 503s."""

    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    bad = await recorders("bad", {"/a": unavailable})
    good = await recorders("good")
    config = make_config([bad.url], pool={
        "upstreams": [{"url": bad.url}, {"url": good.url, "backup": True}],
        "health_check": {"passive": None}, "retries": {"retry_on": [503]}})  # fmt: skip
    return bad, good, config


async def test_an_unsampled_childs_retry_names_a_parent_of_its_own(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    bad, good, config = await retrying(recorders)
    server = await proxy(traced(config, receiver, sample_rate=1.0))
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-02"  # unsampled; the random-trace-id flag
    assert await fetch(server, {"traceparent": tp}) == 200
    (first, second) = sent(bad), sent(good)
    assert first[0] == second[0] == CLIENT_TRACE and first[2] == second[2] == "02"
    assert len({first[1], second[1], CLIENT_SPAN}) == 3  # a child each attempt
    for rec in (bad, good):
        assert [k for k, _ in rec.seen[-1].raw_headers if k.lower() == b"traceparent"] == [
            b"traceparent"]  # fmt: skip
    assert await fetch(server) == 200  # a sampled one flushes: still none of the child's
    await wait_for(lambda: len(receiver.spans) >= 2)
    assert receiver.trace(CLIENT_TRACE) == []


async def test_a_mirror_copy_carries_the_trace_unsampled(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    main, shadow = await recorders("main"), await recorders("shadow")
    routes = [{"match": {"path_prefix": "/"}, "pool": "main", "mirror": {"pool": "shadow"}}]
    config = make_config([main.url], routes=routes,
                         pools={"shadow": {"upstreams": [{"url": shadow.url}]}})  # fmt: skip
    for rate, flags in ((0.0, "00"), (1.0, "01")):
        server = await proxy(traced(config, receiver, sample_rate=rate))
        assert await fetch(server) == 200
        await wait_for(lambda: len(shadow.seen) == len(main.seen))
        trace, parent, sent_flags = sent(main)
        assert sent_flags == flags and sent(shadow)[0] == trace  # the same trace
        assert sent(shadow)[2] == "00"  # not sampled: no span says where it went
        assert parent != sent(shadow)[1] or flags == "00"


async def test_http2_clients_get_the_traceparent_too(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    up = await recorders("up")
    config = make_config([up.url], listener={"protocols": ["http/1.1", "h2c"]})
    server = await proxy(traced(config, receiver, sample_rate=0.0))
    async with httpx.AsyncClient(http1=False, http2=True) as client:
        for _ in range(2):
            resp = await client.get(proxy_url(server, "/a"))
            assert (resp.status_code, resp.http_version) == (200, "HTTP/2")
    (t1, p1, f1), (t2, p2, f2) = sent(up, 0), sent(up, 1)
    assert server.tracer is not None
    assert t1 != t2 and f1 == f2 == "00" and p1 == p2 == server.tracer.parent.decode()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


async def test_a_retried_request_has_a_client_span_per_attempt(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    bad, good, config = await retrying(recorders)
    server = await proxy(traced(config, receiver))
    tp = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    assert await fetch(server, {"traceparent": tp}) == 200
    first, second = sent(bad), sent(good)
    assert first[0] == second[0] == CLIENT_TRACE and first[1] != second[1]
    await wait_for(lambda: len(receiver.trace(CLIENT_TRACE)) == 3)
    spans = receiver.trace(CLIENT_TRACE)
    srv = next(s for s in spans if s.kind == Span.SPAN_KIND_SERVER)
    clients = sorted((s for s in spans if s.kind == Span.SPAN_KIND_CLIENT),
                     key=lambda s: s.start_time_unix_nano)  # fmt: skip
    assert [c.parent_span_id for c in clients] == [srv.span_id] * 2
    assert [c.span_id.hex() for c in clients] == [first[1], second[1]]
    a, b = attrs(clients[0]), attrs(clients[1])
    assert (a["http.response.status_code"], a["error.type"]) == (503, "503")
    assert clients[0].status.code == 2  # ERROR
    assert b["http.response.status_code"] == 200 and b["http.request.resend_count"] == 1
    assert (a["aiolb.upstream"], b["aiolb.upstream"]) == (
        f"{HOST}:{bad.port}",
        f"{HOST}:{good.port}",
    )
    assert clients[0].end_time_unix_nano <= clients[1].start_time_unix_nano
    s = attrs(srv)
    assert s["aiolb.attempts"] == 2 and s["http.response.status_code"] == 200


async def test_a_connect_failure_is_a_failed_client_span(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    dead = f"http://{HOST}:{closed_port()}"
    good = await recorders("good")
    config = make_config([dead], pool={
        "upstreams": [{"url": dead}, {"url": good.url, "backup": True}],
        "health_check": {"passive": None}})  # fmt: skip
    server = await proxy(traced(config, receiver))
    assert await fetch(server) == 200
    trace = sent(good)[0]
    await wait_for(lambda: len(receiver.trace(trace)) == 3)
    clients = sorted((s for s in receiver.trace(trace) if s.kind == Span.SPAN_KIND_CLIENT),
                     key=lambda s: s.start_time_unix_nano)  # fmt: skip
    failed = attrs(clients[0])
    assert failed["error.type"] == "connect_failure" and "http.response.status_code" not in failed
    assert attrs(clients[1])["http.response.status_code"] == 200


async def test_no_upstream_and_the_cache_show_in_the_server_span(
    proxy: MakeProxy, recorders: MakeRecorder, receiver: Receiver
) -> None:
    async def cacheable(request: web.Request) -> web.Response:
        return web.Response(text="c", headers={"Cache-Control": "max-age=60"})

    up = await recorders("up", {"/c": cacheable})
    config = make_config(
        [up.url],
        caches={"c": {}},
        routes=[{"match": {"path_prefix": "/"}, "pool": "main", "cache": "c"}],
    )
    server = await proxy(traced(config, receiver))
    assert await fetch(server, path="/c") == 200
    assert await fetch(server, path="/c") == 200  # a hit
    assert len(up.seen) == 1
    await wait_for(lambda: len(receiver.spans) == 3)
    servers = [s for s in receiver.spans if s.kind == Span.SPAN_KIND_SERVER]
    results = sorted(attrs(s)["aiolb.cache.result"] for s in servers)
    assert results == ["hit", "miss"]
    assert all(attrs(s)["aiolb.cache"] == "c" for s in servers)


async def test_an_unreachable_collector_drops_spans_and_counts_them(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    up = await recorders("up")
    config = make_config([up.url]).model_copy(update={"tracing": TracingSpec.model_validate(
        {"endpoint": f"http://{HOST}:{closed_port()}", "sample_rate": 1.0})})  # fmt: skip
    server = await proxy(config)
    assert await fetch(server) == 200
    tracer = server.tracer
    assert tracer is not None
    await wait_for(lambda: tracer.exporter.dropped == 2, timeout=5)
    async with aiohttp.ClientSession() as session:
        admin = f"http://{HOST}:{server.admin.port}/metrics"  # type: ignore[union-attr]
        async with session.get(admin) as resp:
            text = await resp.text()
    assert "aiolb_trace_spans_dropped_total 2.0" in text
    assert "aiolb_trace_spans_exported_total 0.0" in text


async def test_workers_export_their_spans_and_the_supervisor_sums_the_counts(
    recorders: MakeRecorder, receiver: Receiver, tmp_path: Path
) -> None:
    up = await recorders("up")
    path = tmp_path / "aiolb.yaml"
    path.write_text(
        f"listeners: [{{name: w, bind: '{HOST}:0', routes: [{{pool: p}}]}}]\n"
        f"pools: {{p: {{upstreams: [{{url: '{up.url}'}}]}}}}\n"
        f"admin: {{bind: '{HOST}:0'}}\nworkers: 2\n"
        f"tracing: {{endpoint: '{receiver.url}', sample_rate: 1.0}}\n"
    )
    aiolb = await Aiolb(path).start(workers=2)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(6):  # new connections: the kernel spreads them over the workers
                async with session.get(aiolb.url, headers={"Connection": "close"}) as resp:
                    assert resp.status == 200
        await wait_for(lambda: len(receiver.spans) == 12, timeout=10)
        assert len({s.trace_id for s in receiver.spans}) == 6
        assert "aiolb_trace_spans_exported_total 12.0" in await aiolb.metrics()
    finally:
        assert await aiolb.stop() == 0
