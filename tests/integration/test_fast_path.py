"""Property test: the fast path and the general path give the same bytes.

A response whose head the parser accepted before and which arrives whole in one read is
relayed and completed in one step (``Exchange.relay_whole``); everything else, and
every response when ``Pool.fast_path`` is off, takes the general path
(``on_response_head``, ``on_response_body``, ``on_response_complete``). Two proxies
run side by side in front of one upstream, one with the fast path and one without.
Each example is a random request (method, version, ``Connection``, headers, a body
with ``Content-Length`` or chunked, sent one at a time or pipelined) and a random
response (status, headers,
``Content-Length``, chunked or close-delimited, ``Connection``, body size, the points
where the upstream splits it into separate reads), sent three times through each
proxy: the first time the head is new, then it is known. The client must get the same
bytes from both proxies, the upstream must get the same requests from both (the
proxy-made ``X-Request-ID`` aside), and both must count the same responses and log
the same access log lines (time and duration aside). Examples of the common shape must
have taken the fast path.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
import uvloop
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.config.models import AccessLogSpec
from proxy.forwarding.exchange import Exchange
from proxy.metrics.access_log import AccessLog
from proxy.runtime.server import ProxyServer
from proxy.upstream.connection import UpstreamConnection
from tests.support import HOST, make_config, start_proxy, wait_for

FAST_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SERIAL = itertools.count()
REPEATS = 3
_PROXY_REQUEST_ID = re.compile(rb"\r\nX-Request-ID: [0-9a-f]{16}-[0-9a-f]+\r\n")
_LOG_VARIES = re.compile(r'"(time|duration_ms|request_id)":("[^"]*"|[0-9.]+)')


def one_chunk(response: bytes) -> bytes:
    """``response`` with a chunked body re-chunked as one chunk. The proxy frames each
    upstream read of a chunked or close-delimited body as one chunk, so chunk sizes
    follow the kernel's read boundaries, which differ between two runs under load; the
    bytes of the head and of the body do not, and those are compared."""
    end = response.find(b"\r\n\r\n") + 4
    head, rest = response[:end], response[end:]
    if b"\r\ntransfer-encoding: chunked\r\n" not in head.lower():
        return response
    body = b""
    while True:
        line, _, rest = rest.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if not size:
            return head + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n" + rest
        body, rest = body + rest[:size], rest[size + 2 :]


@dataclass
class Example:
    """What the upstream answers now, and what it saw."""

    response: bytes = b""
    splits: list[int] = field(default_factory=list)
    close: bool = False  # the upstream closes the connection after each response
    requests: list[bytes] = field(default_factory=list)


class Upstream:
    """Reads each request whole (head and body, by its framing) and answers with the
    example's response, written in pieces at ``splits``, each piece only after the
    proxy has read the ones before (``count_read``), so that each is a read of its own."""

    def __init__(self) -> None:
        self.example = Example()
        self.server: asyncio.Server | None = None
        self.written = 0
        self.read = 0
        self.progress = asyncio.Event()

    def count_read(self, data: bytes) -> None:
        self.read += len(data)
        self.progress.set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        return f"http://{HOST}:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_request(reader)  # then the list of the example now
                self.example.requests.append(request)
                await self._answer(writer)
                if self.example.close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        response, start = self.example.response, 0
        for end in self.example.splits:
            writer.write(response[start:end])
            self.written += end - start
            async with asyncio.timeout(5):
                while self.read < self.written:
                    self.progress.clear()
                    await self.progress.wait()
            start = end
        writer.write(response[start:])
        self.written += len(response) - start
        await writer.drain()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request as the upstream received it: head and body, framing included."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"\r\ntransfer-encoding: chunked\r\n" in lower:
        body = b""
        while True:
            line = await reader.readline()
            size = int(line.split(b";")[0], 16)
            body += line + await reader.readexactly(size + 2)
            if size == 0:
                return head + body
    match = re.search(rb"\r\ncontent-length: *(\d+)", lower)
    return head + (await reader.readexactly(int(match.group(1))) if match else b"")


class Background:
    """The upstream and two proxies in front of it (fast path on and off) on a uvloop
    loop in a thread."""

    def __init__(self, logs: str) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.upstream = Upstream()
        self.proxies: dict[str, ProxyServer] = {}
        self.logs = logs

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10.0)

    def start(self) -> None:
        self.thread.start()
        url = self.call(self.upstream.start())
        for name in ("fast", "general"):
            log = AccessLogSpec(path=f"{self.logs}/{name}.log")
            config = make_config([url]).model_copy(update={"access_log": log})
            self.proxies[name] = self.call(start_proxy(config))
        self.proxies["general"].pools["main"].fast_path = False

    def port(self, name: str) -> int:
        return self.proxies[name].listeners[0].port

    def stop(self) -> None:
        for server in self.proxies.values():
            self.call(server.shutdown(timeout=1.0))
        if self.upstream.server is not None:
            self.upstream.server.close()
            self.call(self.upstream.server.wait_closed())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


RELAYED = {"fast": 0, "general": 0}  # relay_whole calls that took the response, by proxy
WHOLE = {"fast": 0, "general": 0}  # responses that reached the proxy in one read, by proxy
LINES: dict[str, list[str]] = {"fast": [], "general": []}  # access log lines, by proxy


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Background]:
    background = Background(str(tmp_path_factory.mktemp("logs")))
    receive, relay = UpstreamConnection.data_received, Exchange.relay_whole
    write = AccessLog.write

    def keeping_write(access_log: AccessLog, line: str) -> None:
        LINES["fast" if access_log.path.endswith("fast.log") else "general"].append(line)
        write(access_log, line)

    def proxy_of(ex: Exchange) -> str:
        return "fast" if ex.client.listener.port == background.port("fast") else "general"

    def counting_receive(conn: UpstreamConnection, data: bytes) -> None:
        background.upstream.count_read(data)
        if conn.exchange is not None and data == background.upstream.example.response:
            WHOLE[proxy_of(conn.exchange)] += 1
        receive(conn, data)

    def counting_relay(ex: Exchange, *args: Any) -> bool:
        took = relay(ex, *args)
        if took:
            RELAYED[proxy_of(ex)] += 1
        return took

    UpstreamConnection.data_received = counting_receive  # type: ignore[method-assign]
    Exchange.relay_whole = counting_relay  # type: ignore[method-assign]
    AccessLog.write = keeping_write  # type: ignore[method-assign]
    try:
        background.start()
        yield background
    finally:
        background.stop()
        UpstreamConnection.data_received = receive  # type: ignore[method-assign]
        Exchange.relay_whole = relay  # type: ignore[method-assign]
        AccessLog.write = write  # type: ignore[method-assign]


class ResponseReader:
    """Reads one response from a socket, framed by httptools (the head alone for HEAD;
    a close-delimited body ends with the connection)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True

    def read(self, head_request: bool) -> tuple[bytes, bool]:
        """(the response's bytes, whether the connection closed)."""
        parser = httptools.HttpResponseParser(self)
        data, self.done = b"", False
        while not self.done:
            chunk = self.sock.recv(262144)
            if not chunk:
                return data, True
            data += chunk
            if head_request:
                self.done = b"\r\n\r\n" in data
            else:
                parser.feed_data(chunk)
        return data, False


def exchange(port: int, requests: list[tuple[bytes, bool]]) -> list[bytes]:
    """Send each ``(request, is HEAD)`` and read its answer; reconnect after a close."""
    answers: list[bytes] = []
    sock = socket.create_connection((HOST, port), timeout=5)
    try:
        for request, head_request in requests:
            sock.sendall(request)
            answer, closed = ResponseReader(sock).read(head_request)
            answers.append(answer)
            if closed or b"\r\nConnection: close\r\n" in answer.split(b"\r\n\r\n")[0] + b"\r\n":
                sock.close()
                sock = socket.create_connection((HOST, port), timeout=5)
    finally:
        sock.close()
    return answers


class MessageCounter:
    def __init__(self) -> None:
        self.complete = 0

    def on_message_complete(self) -> None:
        self.complete += 1


def pipelined(port: int, request: bytes, n: int) -> list[bytes]:
    """Send ``n`` copies of ``request`` in one write; everything the proxy answers until
    ``n`` responses are complete or it closes (not for HEAD: the responses are framed
    by one parser)."""
    counter = MessageCounter()
    parser = httptools.HttpResponseParser(counter)
    data = b""
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(request * n)
        while counter.complete < n:
            chunk = sock.recv(262144)
            if not chunk:
                break
            data += chunk
            parser.feed_data(chunk)
    return [data]


names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=10).map(str.encode)
values = st.text("abcdefghijklmnopqrstuvwxyz0123456789 ;=/,", max_size=30).map(
    lambda v: v.strip().encode()
)
extra_headers = st.lists(st.tuples(names, values), max_size=4)

requests = st.fixed_dictionaries({
    "method": st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"PUT", b"DELETE"]),
    "version": st.sampled_from([b"1.1", b"1.1", b"1.0"]),
    "connection": st.sampled_from([None, None, b"keep-alive", b"close"]),
    "headers": extra_headers,
    "body": st.integers(0, 20_000),
    "chunked": st.booleans(),
    "request_id": st.booleans(),
    "pipelined": st.booleans(),
})  # fmt: skip

responses = st.fixed_dictionaries({
    "status": st.sampled_from([b"200 OK", b"200 OK", b"201 Created", b"204 No Content",
                               b"304 Not Modified", b"404 Not Found", b"500 Oops",
                               b"503 Unavailable"]),
    "headers": extra_headers,
    "framing": st.sampled_from(["length", "length", "chunked", "close"]),
    "connection": st.sampled_from([None, None, b"keep-alive", b"close"]),
    "length": st.integers(0, 150_000),
    "cuts": st.lists(st.floats(0, 1), max_size=3),
})  # fmt: skip


def build_request(spec: dict[str, Any], serial: int) -> bytes:
    method, version = spec["method"], spec["version"]
    head = b"%s /item/%d?q=1 HTTP/%s\r\nHost: shop.test\r\n" % (method, serial, version)
    for name, value in spec["headers"]:
        head += b"X-C-" + name + b": " + value + b"\r\n"
    if spec["connection"] is not None:
        head += b"Connection: " + spec["connection"] + b"\r\n"
    if spec["request_id"]:
        head += b"X-Request-ID: client-%d\r\n" % serial
    if method not in (b"POST", b"PUT"):
        return head + b"\r\n"
    body = bytes(i % 253 for i in range(spec["body"]))
    if spec["chunked"] and version == b"1.1":
        chunks = [body[i : i + 4096] for i in range(0, len(body), 4096)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + framed
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def build_response(spec: dict[str, Any], serial: int, head_request: bool) -> tuple[bytes, bool]:
    """The upstream's answer and whether it closes the connection after it."""
    status, framing = spec["status"], spec["framing"]
    no_body = status[:3] in (b"204", b"304")
    body = b"" if no_body else bytes((i * 7) % 251 for i in range(spec["length"]))
    head = b"HTTP/1.1 %s\r\nX-Fast-Serial: %d\r\n" % (status, serial)
    for name, value in spec["headers"]:
        head += b"X-U-" + name + b": " + value + b"\r\n"
    close = spec["connection"] == b"close" or (framing == "close" and not no_body)
    if spec["connection"] is not None:
        head += b"Connection: " + spec["connection"] + b"\r\n"
    if no_body:
        payload = b""
    elif framing == "length":
        head += b"Content-Length: %d\r\n" % len(body)
        payload = body
    elif framing == "chunked":
        head += b"Transfer-Encoding: chunked\r\n"
        chunks = [body[i : i + 7000] for i in range(0, len(body), 7000)]
        payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:  # close-delimited
        payload = body
    return head + b"\r\n" + (b"" if head_request else payload), close


def fast_shape(request: dict[str, Any], response: dict[str, Any]) -> bool:
    """Does this example have the shape the fast path takes, once its head is known and
    when it arrives in one read?"""
    return (
        request["method"] != b"HEAD"
        and response["framing"] == "length"
        and response["status"][:3] not in (b"204", b"304")
    )


def counts(server: ProxyServer) -> dict[Any, int]:
    upstream = server.pools["main"].upstreams[0]
    pool = server.pools["main"]
    return {**{("upstream", *k): n for k, n in upstream.stats.requests.items()},
            **{("pool", *k): n for k, n in pool.stats.requests.items()}}  # fmt: skip


@given(request=requests, response=responses)
@FAST_SETTINGS
def test_the_fast_path_and_the_general_path_give_the_same_bytes(
    both: Background, request: dict[str, Any], response: dict[str, Any]
) -> None:
    serial = next(SERIAL)
    head_request = request["method"] == b"HEAD"
    raw = build_request(request, serial)
    answer, close = build_response(response, serial, head_request)
    example = both.upstream.example
    example.response, example.close = answer, close
    example.splits = sorted({int(c * len(answer)) for c in response["cuts"]} - {0})
    got: dict[str, tuple[list[bytes], list[bytes], dict[Any, int], list[str]]] = {}
    for name in ("general", "fast"):  # the general proxy first: it leaves the head known
        server = both.proxies[name]
        before = counts(server)
        relayed, whole = RELAYED["fast"], WHOLE["fast"]
        example.requests, LINES[name] = [], []
        if request["pipelined"] and not head_request:
            answers = pipelined(both.port(name), raw, REPEATS)
        else:
            answers = exchange(both.port(name), [(raw, head_request)] * REPEATS)
        both.call(wait_for(lambda name=name: len(LINES[name]) == len(example.requests)))
        after = counts(server)
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        seen = [_PROXY_REQUEST_ID.sub(b"\r\nX-Request-ID: -\r\n", r) for r in example.requests]
        logged = [_LOG_VARIES.sub(r'"\1":-', line) for line in LINES[name]]
        got[name] = ([one_chunk(a) for a in answers], seen, delta, logged)
        if name == "fast" and fast_shape(request, response):  # known: the general ran first
            assert RELAYED["fast"] - relayed == WHOLE["fast"] - whole  # each one read whole
    assert RELAYED["general"] == 0
    fast, general = got["fast"], got["general"]
    assert fast[0] == general[0]  # what the client got, byte for byte (chunks joined)
    assert fast[1] == general[1]  # what the upstream got
    assert fast[2] == general[2]  # what the metrics counted
    assert fast[3] == general[3]  # what the access log says
    assert fast[0] and all(a.startswith(b"HTTP/1.") for a in fast[0])


def test_a_small_common_response_takes_the_fast_path_once_its_head_is_known(
    both: Background,
) -> None:
    serial = next(SERIAL)
    example = both.upstream.example
    answer = b"HTTP/1.1 200 OK\r\nX-Fast-Serial: %d\r\nContent-Length: 5\r\n\r\nhello" % serial
    example.response = answer
    example.splits, example.close = [], False
    relayed = RELAYED["fast"]
    request = (b"GET /small HTTP/1.1\r\nHost: shop.test\r\n\r\n", False)
    answers = exchange(both.port("fast"), [request] * 4)
    assert answers == [answer] * 4
    assert RELAYED["fast"] - relayed == 3  # the first one taught the cache its head
    upstream = both.proxies["fast"].pools["main"].upstreams[0]
    assert len(upstream.idle) == 1 and upstream.active == 0  # released, kept for the next
