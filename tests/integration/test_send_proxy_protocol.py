"""The PROXY protocol sent to upstreams (``pools.NAME.send_proxy_protocol``), through
real sockets: the header is the first bytes of each upstream connection (before TLS for
``https://``), carries the client's addresses (a received header's, when there was
one), and a connection carries one client: none is reused for another request, over
HTTP/1.1 and HTTP/2. Health probes send ``LOCAL`` / ``UNKNOWN``. And HAProxy on both
sides: ``send-proxy-v2`` in front of aiolb, ``accept-proxy`` behind it."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Config
from proxy.proxy_protocol import V2_SIGNATURE, Addresses, Header, parse, v1
from proxy.runtime.server import ProxyServer
from tests.support import HOST, CertAuthority, Recorder, make_config, read_response, wait_for

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]
CLIENT = Addresses("203.0.113.7", 51000, "198.51.100.1", 443)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(sock, n - len(data))
        if not chunk:
            raise ConnectionError("closed inside the header")
        data += chunk
    return data


async def read_header(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """Exactly the PROXY header's bytes (never a byte of what follows)."""
    first = await _recv_exactly(loop, sock, 1)
    if first == b"\r":
        fixed = first + await _recv_exactly(loop, sock, 15)
        return fixed + await _recv_exactly(loop, sock, int.from_bytes(fixed[14:16], "big"))
    while not first.endswith(b"\r\n") and len(first) < 107:
        first += await _recv_exactly(loop, sock, 1)
    return first


class ProxiedUpstream:
    """An upstream that reads a PROXY header on each connection, then speaks HTTP/1.1
    (over TLS with ``context``): answers ``ok``, recording each connection's header and
    each request's connection, path and ``X-Forwarded-For``."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.headers: list[Header | None] = []
        self.raw: list[bytes] = []
        self.requests: list[tuple[int, str, str]] = []  # (connection, path, XFF)
        self.sock = socket.socket()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        scheme = "https" if self.context is not None else "http"
        return f"{scheme}://{HOST}:{self.sock.getsockname()[1]}"

    def start(self) -> None:
        self.sock.bind((HOST, 0))
        self.sock.listen(100)
        self.sock.setblocking(False)
        self._spawn(self._accept())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        try:
            raw = await read_header(loop, conn)
        except ConnectionError:
            conn.close()
            return
        index = len(self.raw)
        self.raw.append(raw)
        self.headers.append(parse(raw))
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn, ssl=self.context)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                self.requests.append(
                    (index, lines[0].split(" ")[1], fields.get("X-Forwarded-For", ""))
                )
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        for task in tuple(self.tasks):
            task.cancel()
        self.sock.close()


@pytest.fixture
def upstreams() -> Iterator[Callable[..., ProxiedUpstream]]:
    started: list[ProxiedUpstream] = []

    def make(context: ssl.SSLContext | None = None) -> ProxiedUpstream:
        up = ProxiedUpstream(context)
        up.start()
        started.append(up)
        return up

    yield make
    for up in started:
        up.stop()


async def get(port: int, path: str, *, header: bytes = b"", source: str = HOST) -> bytes:
    """One request on its own connection from ``source``: the status line."""
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        writer.write(header + f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        status, _, body = await asyncio.wait_for(read_response(reader), 5)
        return status + b" " + body
    finally:
        writer.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_header_carries_the_client_s_addresses(
    proxy: MakeProxy, upstreams: Callable[..., ProxiedUpstream], version: str
) -> None:
    up = upstreams()
    config = make_config(
        [up.url], pool={"send_proxy_protocol": version},
        listener={"proxy_protocol": {"trusted": ["127.0.0.1/32"]}},
    )  # fmt: skip
    server = await proxy(config)
    port = server.listeners[0].port
    assert (await get(port, "/via", header=v1(CLIENT))).endswith(b"200 OK ok")
    assert up.headers == [Header(CLIENT, len(up.raw[0]), int(version[1]))]
    assert up.requests == [(0, "/via", CLIENT.src)]


async def test_a_direct_client_s_own_addresses_and_reuse_for_it_only(
    proxy: MakeProxy, upstreams: Callable[..., ProxiedUpstream]
) -> None:
    up = upstreams()
    server = await proxy(make_config([up.url], pool={"send_proxy_protocol": "v2"}))
    port = server.listeners[0].port
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=("127.0.0.2", 0))
    client_port = writer.get_extra_info("sockname")[1]
    try:
        for i in range(3):  # one keep-alive client connection, three requests
            writer.write(f"GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            status, _, _ = await asyncio.wait_for(read_response(reader), 5)
            assert status.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    mine = Addresses("127.0.0.2", client_port, HOST, port)
    assert [h.addresses if h else None for h in up.headers] == [mine]
    assert [(c, p) for c, p, _ in up.requests] == [(0, "/0"), (0, "/1"), (0, "/2")]
    upstream = server.pools["main"].upstreams[0]
    assert not upstream.idle and list(upstream.owned) == [up.raw[0]]
    # another client connection (another source port): another upstream connection
    assert (await get(port, "/other", source="127.0.0.2")).endswith(b"200 OK ok")
    assert len(up.headers) == 2 and up.requests[-1][:2] == (1, "/other")
    assert len(upstream.owned) == 2


async def test_an_idle_connection_of_another_client_gives_way_at_max_connections(
    proxy: MakeProxy, upstreams: Callable[..., ProxiedUpstream]
) -> None:
    up = upstreams()
    pool = {"send_proxy_protocol": "v1", "circuit_breaker": {"max_connections": 1}}
    server = await proxy(make_config([up.url], pool=pool))
    port = server.listeners[0].port
    reader, writer = await asyncio.open_connection(HOST, port)  # A keeps its connection
    try:
        writer.write(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5))[0].endswith(b"200 OK")
        upstream = server.pools["main"].upstreams[0]
        assert len(upstream.owned) == 1 and upstream.conns == 1
        assert (await get(port, "/b", source="127.0.0.2")).endswith(b"200 OK ok")  # B
        writer.write(b"GET /a2 HTTP/1.1\r\nHost: a\r\n\r\n")  # A again: a new one
        assert (await asyncio.wait_for(read_response(reader), 5))[0].endswith(b"200 OK")
    finally:
        writer.close()
    assert [(c, p) for c, p, _ in up.requests] == [(0, "/a"), (1, "/b"), (2, "/a2")]
    assert [h.addresses.src for h in up.headers if h and h.addresses] == [HOST, "127.0.0.2", HOST]


async def test_concurrent_clients_never_share_a_connection(
    proxy: MakeProxy, upstreams: Callable[..., ProxiedUpstream]
) -> None:
    up = upstreams()
    config = make_config(
        [up.url], pool={"send_proxy_protocol": "v1"},
        listener={"proxy_protocol": {"trusted": ["127.0.0.1/32"]}},
    )  # fmt: skip
    server = await proxy(config)
    port = server.listeners[0].port
    clients = [CLIENT._replace(src=f"192.0.2.{i}", src_port=1000 + i) for i in range(1, 21)]
    answers = await asyncio.gather(
        *(get(port, f"/{c.src}", header=v1(c)) for c in clients for _ in range(2))
    )
    assert all(a.endswith(b"200 OK ok") for a in answers)
    assert len(up.requests) == 40 and 20 <= len(up.headers) <= 40
    for conn, path, xff in up.requests:  # each connection's header names its request's client
        header = up.headers[conn]
        assert header is not None and header.addresses is not None
        assert path == f"/{header.addresses.src}" == f"/{xff}"


async def test_before_tls_to_an_https_upstream(
    proxy: MakeProxy, upstreams: Callable[..., ProxiedUpstream], ca: CertAuthority
) -> None:
    up = upstreams(ca.server_context("localhost", HOST))
    pool = {"send_proxy_protocol": "v2", "tls": {"ca": ca.cert_file}}
    config = make_config(
        [up.url], pool=pool, listener={"proxy_protocol": {"trusted": ["127.0.0.1/32"]}}
    )
    server = await proxy(config)
    assert (await get(server.listeners[0].port, "/tls", header=v1(CLIENT))).endswith(b"ok")
    assert up.headers[0] is not None and up.headers[0].addresses == CLIENT
    assert up.requests == [(0, "/tls", CLIENT.src)]


@pytest.mark.parametrize(("version", "check", "sent"), [
    ("v2", "http", V2_SIGNATURE + b"\x20\x00\x00\x00"),
    ("v1", "http", b"PROXY UNKNOWN\r\n"),
    ("v2", "tcp", V2_SIGNATURE + b"\x20\x00\x00\x00"),
])  # fmt: skip
async def test_health_probes_send_local_or_unknown(
    proxy: MakeProxy, upstreams: Callable[..., ProxiedUpstream],
    version: str, check: str, sent: bytes,
) -> None:  # fmt: skip
    up = upstreams()
    active = {"type": check, "interval": "100ms", "timeout": "1s"}
    if check == "http":
        active["path"] = "/healthz"
    pool = {"send_proxy_protocol": version, "health_check": {"active": active}}
    server = await proxy(make_config([up.url], pool=pool))
    await wait_for(lambda: len(up.raw) >= 2 and (check == "tcp" or len(up.requests) >= 2))
    assert set(up.raw) == {sent}
    assert all(path == "/healthz" for _, path, _ in up.requests)
    assert server.pools["main"].upstreams[0].healthy


async def test_http2_upstream_connections_carry_one_client_each(
    proxy: MakeProxy, recorders: MakeRecorder
) -> None:
    """aiolb -> aiolb: the front one speaks HTTP/2 (h2c) to the back one, sending v2;
    the back one accepts it. Each client's request gets its own connection."""
    rec = await recorders("r")
    back = await proxy(make_config(
        [rec.url], listener={"protocols": ["h2c"], "proxy_protocol": {"trusted": [HOST]}},
    ))  # fmt: skip
    back_url = f"http://{HOST}:{back.listeners[0].port}"
    front = await proxy(make_config(
        [back_url], pool={"http_version": "2", "send_proxy_protocol": "v2"},
        listener={"proxy_protocol": {"trusted": [HOST]}},
    ))  # fmt: skip
    port = front.listeners[0].port
    clients = [CLIENT._replace(src=f"192.0.2.{i}") for i in range(1, 11)]
    answers = await asyncio.gather(*(get(port, f"/{c.src}", header=v1(c)) for c in clients))
    assert all(a.endswith(b"200 OK r") for a in answers), answers
    for seen in rec.seen:  # the back one's client is the front one's client
        assert seen.headers["X-Forwarded-For"].split(", ")[-1] == seen.path[1:]
    assert len(rec.seen) == 10
    upstream = front.pools["main"].upstreams[0]
    await wait_for(lambda: not upstream.h2 and upstream.conns == 0)


# -- HAProxy on either side ---------------------------------------------------------------


@pytest.fixture
async def haproxy(tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[None]]]:
    binary = shutil.which("haproxy")
    if binary is None:
        pytest.fail("haproxy is needed for these tests: apt-get install -y haproxy")
    started: list[subprocess.Popen[bytes]] = []

    async def start(config: str) -> None:
        path = tmp_path / f"haproxy{len(started)}.cfg"
        path.write_text(config)
        check = subprocess.run([binary, "-c", "-f", str(path)], capture_output=True)
        assert check.returncode == 0, check.stderr.decode()
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        started.append(subprocess.Popen([binary, "-db", "-f", str(path)], **quiet))  # type: ignore[call-overload]

    yield start
    for process in started:
        process.terminate()
        process.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


HAPROXY_GLOBAL = """
global
    maxconn 100
defaults
    timeout connect 2s
    timeout client 10s
    timeout server 10s
"""


async def _listening(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    writer.close()
    return True


async def test_haproxy_send_proxy_v2_in_front_of_aiolb(
    proxy: MakeProxy, recorders: MakeRecorder, haproxy: Callable[[str], Awaitable[None]]
) -> None:
    rec = await recorders("r")
    server = await proxy(make_config(
        [rec.url], listener={"proxy_protocol": {"trusted": ["127.0.0.1/32"]}},
    ))  # fmt: skip
    front = _free_port()
    await haproxy(
        HAPROXY_GLOBAL
        + f"""
frontend tcp_in
    mode tcp
    bind {HOST}:{front}
    default_backend aiolb
backend aiolb
    mode tcp
    server a {HOST}:{server.listeners[0].port} send-proxy-v2
"""
    )
    await wait_for(lambda: _listening(front), timeout=10)
    for source in ("127.0.0.2", "127.0.0.3"):  # the clients, as HAProxy saw them
        assert (await get(front, "/h", source=source)).endswith(b"200 OK r")
    assert [s.headers["X-Forwarded-For"] for s in rec.seen] == ["127.0.0.2", "127.0.0.3"]


async def test_aiolb_send_proxy_to_haproxy_accept_proxy(
    proxy: MakeProxy, recorders: MakeRecorder, haproxy: Callable[[str], Awaitable[None]]
) -> None:
    rec = await recorders("r")
    ports = {"v1": _free_port(), "v2": _free_port()}
    await haproxy(
        HAPROXY_GLOBAL
        + "".join(
            f"""
frontend http_{version}
    mode http
    bind {HOST}:{port} accept-proxy
    http-request set-header X-HAProxy-Src %[src]
    default_backend recorder
"""
            for version, port in ports.items()
        )
        + f"""
backend recorder
    mode http
    server r {HOST}:{rec.port}
"""
    )
    for port in ports.values():
        await wait_for(lambda port=port: _listening(port), timeout=10)
    for version, port in ports.items():
        server = await proxy(make_config(
            [f"http://{HOST}:{port}"], pool={"send_proxy_protocol": version},
        ))  # fmt: skip
        assert (await get(server.listeners[0].port, "/s", source="127.0.0.4")).endswith(b"r")
    assert [s.headers["x-haproxy-src"] for s in rec.seen] == ["127.0.0.4", "127.0.0.4"]
