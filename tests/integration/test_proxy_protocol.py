"""The PROXY protocol received on a listener (``proxy_protocol: {trusted: [...]}``),
through real sockets: v1 and v2 from a raw client and from curl, the address it carries
in ``X-Forwarded-For``, the access log, ``access`` and ``ip_hash``, over HTTP/1.1,
HTTP/2 (h2c and h2 by ALPN after the header) and TLS; and the hostile cases: an
untrusted peer sending one, garbage, bad fields, a slow header, bytes split anywhere."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import pytest

from proxy.config import Config
from proxy.proxy_protocol import V2_SIGNATURE, Addresses, v1, v2
from proxy.runtime.reload import apply_config
from proxy.runtime.server import ProxyServer
from tests.admin_support import samples, scrape
from tests.h2_support import H2Client
from tests.support import (
    HOST,
    CertAuthority,
    Recorder,
    make_config,
    read_response,
    unused_port,
    wait_for,
)

MakeProxy = Callable[[Config], Awaitable[ProxyServer]]
MakeRecorder = Callable[..., Awaitable[Recorder]]
GET = b"GET /p HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"
CLIENT = Addresses("203.0.113.7", 51000, "198.51.100.1", 443)
CLIENT6 = Addresses("2001:db8::7", 51000, "2001:db8::1", 443)


def pp_config(upstream: str, trusted: list[str] | None = None, **listener: Any) -> Config:
    listener = {"proxy_protocol": {"trusted": trusted or ["127.0.0.1/32"]}, **listener}
    return make_config([upstream], listener=listener)


async def exchange(port: int, *pieces: bytes, timeout: float = 5.0) -> bytes:
    """Write ``pieces`` one by one (each its own segment), read until the proxy closes."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        return await read_all(reader, timeout)
    finally:
        writer.close()


async def read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """What the proxy sends until it closes (a reset after nothing: ``b""``)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


def errors(server: ProxyServer) -> dict[str, int]:
    return server.listeners[0].proxy_errors


# -- the happy paths ----------------------------------------------------------------------


@pytest.mark.parametrize("build", [v1, v2], ids=["v1", "v2"])
@pytest.mark.parametrize("client", [CLIENT, CLIENT6], ids=["ipv4", "ipv6"])
async def test_the_header_s_address_is_the_client_s(
    recorders: MakeRecorder, proxy: MakeProxy, build: Any, client: Addresses
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url, forwarded="replace"))
    answer = await exchange(server.listeners[0].port, build(client) + GET)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    headers = up.seen[0].headers
    assert headers["X-Forwarded-For"] == client.src
    quoted = f'"[{client.src}]"' if ":" in client.src else client.src
    assert headers["Forwarded"] == f"for={quoted};proto=http"


async def test_a_header_split_into_single_bytes_and_keep_alive(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url))
    header = v2(CLIENT)
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        for i in range(len(header)):
            writer.write(header[i : i + 1])
            await writer.drain()
        for _ in range(3):  # one header, then requests on the kept connection
            writer.write(b"GET /k HTTP/1.1\r\nHost: a.test\r\n\r\n")
            status, _, _ = await asyncio.wait_for(read_response(reader), 5)
            assert status.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert [s.headers["X-Forwarded-For"] for s in up.seen] == [CLIENT.src] * 3


async def test_v2_local_and_v1_unknown_keep_the_peer_s_address(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url))
    port = server.listeners[0].port
    tlv = b"\x04\x00\x03abc"  # a TLV (NOOP) after the addresses: skipped
    local = V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlv)) + tlv
    for header in (local, v1(None), b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        assert (await exchange(port, header + GET)).startswith(b"HTTP/1.1 200")
    assert [s.headers["X-Forwarded-For"] for s in up.seen] == [HOST] * 3


async def test_tlvs_after_the_addresses_are_skipped(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url))
    header = v2(CLIENT)
    tlvs = b"\x01\x00\x02h2" + b"\x05\x00\x04uniq"  # ALPN, UNIQUE_ID
    header = header[:14] + struct.pack("!H", 12 + len(tlvs)) + header[16:] + tlvs
    answer = await exchange(server.listeners[0].port, header + GET)
    assert answer.startswith(b"HTTP/1.1 200")
    assert up.seen[0].headers["X-Forwarded-For"] == CLIENT.src


async def test_the_address_reaches_the_access_log_access_filter_and_ip_hash(
    recorders: MakeRecorder, proxy: MakeProxy, tmp_path: Path
) -> None:
    ups = [await recorders(name) for name in "abc"]
    log_path = tmp_path / "access.log"
    routes = [
        {"match": {"path_prefix": "/denied"}, "pool": "main",
         "filters": [{"access": {"deny": ["203.0.113.0/24"]}}]},
        {"match": {"path_prefix": "/"}, "pool": "main"},
    ]  # fmt: skip
    config = make_config(
        [u.url for u in ups], routes=routes, pool={"balancer": "ip_hash"},
        listener={"proxy_protocol": {"trusted": ["127.0.0.0/8"]}},
    )  # fmt: skip
    config = Config.model_validate({**config.model_dump(), "access_log": {"path": str(log_path)}})
    server = await proxy(config)
    port = server.listeners[0].port
    denied = b"GET /denied HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    assert (await exchange(port, v1(CLIENT) + denied)).startswith(b"HTTP/1.1 403")
    other = CLIENT._replace(src="192.0.2.44")
    assert (await exchange(port, v1(other) + denied)).startswith(b"HTTP/1.1 200")
    # ip_hash: every connection from one proxied client lands on one upstream
    for _ in range(6):
        assert (await exchange(port, v2(CLIENT) + GET)).startswith(b"HTTP/1.1 200")
    chosen = [u.name for u in ups for s in u.seen if s.path == "/p"]
    assert len(chosen) == 6 and len(set(chosen)) == 1

    def clients() -> list[str]:
        lines = log_path.read_text().splitlines() if log_path.exists() else []
        return [json.loads(line)["client"] for line in lines]

    await wait_for(lambda: len(clients()) == 8)
    assert clients() == [CLIENT.src, "192.0.2.44"] + [CLIENT.src] * 6


async def test_rate_limit_buckets_are_per_proxied_client(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    routes = [{"match": {"path_prefix": "/"}, "pool": "main",
               "filters": [{"rate_limit": {"rate": "1/m", "burst": 1}}]}]  # fmt: skip
    config = make_config(
        [up.url], routes=routes, listener={"proxy_protocol": {"trusted": ["127.0.0.1/32"]}}
    )
    server = await proxy(config)
    port = server.listeners[0].port
    other = CLIENT._replace(src="192.0.2.44")
    statuses = [
        (await exchange(port, v2(client) + GET))[:12] for client in (CLIENT, CLIENT, other, other)
    ]
    assert statuses == [b"HTTP/1.1 200", b"HTTP/1.1 429", b"HTTP/1.1 200", b"HTTP/1.1 429"]


async def test_h2c_after_the_header(recorders: MakeRecorder, proxy: MakeProxy) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url, protocols=["http/1.1", "h2c"]))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(v2(CLIENT))
    client = _h2(reader, writer)
    try:
        reply = await client.request("/h2c")
        assert reply.status == 200
    finally:
        await client.close()
    assert up.seen[0].headers["X-Forwarded-For"] == CLIENT.src


def _h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> H2Client:
    config = h2.config.H2Configuration(client_side=True, header_encoding=None)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    client = H2Client(reader, writer, conn)
    client.flush()
    client._task = asyncio.get_running_loop().create_task(client._run())
    return client


@pytest.mark.parametrize("alpn", ["h2", "http/1.1"])
async def test_tls_after_the_header(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority, alpn: str
) -> None:
    up = await recorders("a")
    cert = ca.issue("a.test")
    server = await proxy(pp_config(up.url, tls={"certificates": [cert.entry]}))
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    writer.write(v1(CLIENT))  # in clear, before the ClientHello
    await writer.drain()
    context = ca.client_context()
    context.set_alpn_protocols([alpn])
    await writer.start_tls(context, server_hostname="a.test")
    if alpn == "h2":
        client = _h2(reader, writer)
        try:
            assert (await client.request("/tls")).status == 200
        finally:
            await client.close()
    else:
        writer.write(GET)
        status, _, _ = await asyncio.wait_for(read_response(reader), 5)
        assert status.startswith(b"HTTP/1.1 200")
        writer.close()
    assert up.seen[0].headers["X-Forwarded-For"] == CLIENT.src
    assert up.seen[0].headers["X-Forwarded-Proto"] == "https"


async def test_the_header_and_the_client_hello_in_one_segment(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority
) -> None:
    """The bytes after the header in the same read are the handshake's: the TLS
    protocol is fed them (a buffered protocol: ``proxied.feed``)."""
    up = await recorders("a")
    cert = ca.issue("a.test")
    server = await proxy(pp_config(up.url, tls={"certificates": [cert.entry]}))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ca.client_context().wrap_bio(incoming, outgoing, server_hostname="a.test")
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        writer.write(v2(CLIENT) + outgoing.read())  # header and ClientHello, one write
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "closed during the handshake"
                incoming.write(data)
        tls.write(GET)
        writer.write(outgoing.read())
        answer = b""
        while not answer.endswith(b"a"):
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, answer
                incoming.write(data)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert up.seen[0].headers["X-Forwarded-For"] == CLIENT.src


async def test_curl_haproxy_protocol_over_http_and_https(
    recorders: MakeRecorder, proxy: MakeProxy, ca: CertAuthority
) -> None:
    assert shutil.which("curl"), "curl is needed (apt-get install curl)"
    up = await recorders("a")
    cert = ca.issue("a.test")
    plain = await proxy(pp_config(up.url))
    tls = await proxy(pp_config(up.url, tls={"certificates": [cert.entry]}))
    for url in (
        f"http://{HOST}:{plain.listeners[0].port}/curl",
        f"https://a.test:{tls.listeners[0].port}/curl",
    ):
        done = await asyncio.to_thread(
            subprocess.run,
            ["curl", "-sS", "--haproxy-protocol", "--cacert", ca.cert_file,
             "--resolve", f"a.test:{tls.listeners[0].port}:{HOST}", url],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout == "a"
    assert [s.headers["X-Forwarded-For"] for s in up.seen] == [HOST, HOST]


async def test_websocket_upgrade_carries_the_proxied_address(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url))
    upgrade = (b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n"
               b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")  # fmt: skip
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        writer.write(v2(CLIENT) + upgrade)
        await asyncio.wait_for(read_response(reader), 5)  # the recorder refuses: any answer
    finally:
        writer.close()
    assert up.seen[0].path == "/ws"
    assert up.seen[0].headers["X-Forwarded-For"] == CLIENT.src


# -- who may send it, and what is refused ------------------------------------------------


async def test_an_untrusted_peer_speaks_http_and_may_not_send_a_header(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url, trusted=["10.0.0.0/8", "::1/128"]))
    port = server.listeners[0].port
    answer = await exchange(port, GET)
    assert answer.startswith(b"HTTP/1.1 200")
    assert up.seen[0].headers["X-Forwarded-For"] == HOST
    # a method that starts like the header is HTTP: "PRO" then "PFIND"
    propfind = b"PROPFIND /p HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    assert (await exchange(port, propfind[:3], propfind[3:])).startswith(b"HTTP/1.1 ")
    for header in (v1(CLIENT), v2(CLIENT)):
        assert await exchange(port, header + GET) == b""
        assert await exchange(port, header[:4], header[4:] + GET) == b""
    assert errors(server) == {"untrusted": 4}
    assert len(up.seen) == 2  # nothing forwarded for the refused ones
    found = samples(await scrape(server), "aiolb_proxy_protocol_errors_total")
    assert found == {(("listener", "test"), ("reason", "untrusted")): 4.0}


async def test_a_trusted_peer_must_send_a_header(recorders: MakeRecorder, proxy: MakeProxy) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url))
    assert await exchange(server.listeners[0].port, GET) == b""
    assert errors(server) == {"malformed": 1}
    assert up.seen == []


BAD = {
    "v1 port over 65535": b"PROXY TCP4 203.0.113.7 198.51.100.1 65536 443\r\n",
    "v1 port with a leading zero": b"PROXY TCP4 203.0.113.7 198.51.100.1 0443 443\r\n",
    "v1 negative port": b"PROXY TCP4 203.0.113.7 198.51.100.1 -1 443\r\n",
    "v1 bad IPv4": b"PROXY TCP4 203.0.113.999 198.51.100.1 1 443\r\n",
    "v1 IPv6 as TCP4": b"PROXY TCP4 2001:db8::1 198.51.100.1 1 443\r\n",
    "v1 IPv4 as TCP6": b"PROXY TCP6 203.0.113.7 2001:db8::1 1 443\r\n",
    "v1 scoped IPv6": b"PROXY TCP6 fe80::1%eth0 fe80::2 1 443\r\n",
    "v1 unknown protocol": b"PROXY UDP4 203.0.113.7 198.51.100.1 1 443\r\n",
    "v1 too few fields": b"PROXY TCP4 203.0.113.7 198.51.100.1 1\r\n",
    "v1 two spaces": b"PROXY TCP4  203.0.113.7 198.51.100.1 1 443\r\n",
    "v1 bare LF": b"PROXY TCP4 203.0.113.7 198.51.100.1 1 443\n",
    "v1 no CRLF in 107 bytes": b"PROXY TCP4 " + b"1" * 120 + b"\r\n",
    "v1 lower case": b"proxy TCP4 203.0.113.7 198.51.100.1 1 443\r\n",
    "v2 bad signature": b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12),
    "v2 version 1": V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),
    "v2 version 3": V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),
    "v2 command 2": V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),
    "v2 length over 4 KiB": V2_SIGNATURE + b"\x21\x11\xff\xff" + bytes(64),
    "v2 IPv4 too short": V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4),
    "v2 IPv6 too short": V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),
    "v2 unknown family": V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),
    "TLS ClientHello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "binary garbage": bytes(range(256)),
}


@pytest.mark.parametrize("header", list(BAD.values()), ids=list(BAD))
async def test_a_malformed_header_closes_without_an_answer(
    recorders: MakeRecorder, proxy: MakeProxy, header: bytes
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url))
    assert await exchange(server.listeners[0].port, header + GET) == b""
    assert errors(server) == {"malformed": 1}
    assert up.seen == []


async def test_a_slow_header_times_out(recorders: MakeRecorder, proxy: MakeProxy) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url, timeouts={"header": "300ms"}))
    loop = asyncio.get_running_loop()
    header = v1(CLIENT)
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    started = loop.time()
    try:
        writer.write(header[:10])  # and the rest never comes
        assert await read_all(reader) == b""
    finally:
        writer.close()
    assert 0.25 < loop.time() - started < 3
    assert errors(server) == {"timeout": 1}
    # silence from the start times out the same way
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        assert await read_all(reader) == b""
    finally:
        writer.close()
    assert errors(server) == {"timeout": 2}
    await wait_for(lambda: not server.listeners[0].readers)


async def test_an_untrusted_client_that_sends_nothing_is_closed_quietly(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    server = await proxy(pp_config(up.url, trusted=["10.0.0.0/8"], timeouts={"header": "200ms"}))
    for sent in (b"", b"PRO"):  # nothing; the start of a method or of a header
        reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
        try:
            writer.write(sent)
            assert await read_all(reader) == b""
        finally:
            writer.close()
    assert errors(server) == {"timeout": 1}  # only the one that began a header


async def test_a_header_then_a_stalled_request_still_gets_408_in_time(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    """The header timeout runs from the accept: a header does not buy a new one."""
    up = await recorders("a")
    server = await proxy(pp_config(up.url, timeouts={"header": "500ms"}))
    loop = asyncio.get_running_loop()
    started = loop.time()
    answer = await exchange(server.listeners[0].port, v2(CLIENT) + b"GET / HTTP/1.1\r\n")
    assert answer.startswith(b"HTTP/1.1 408")
    assert loop.time() - started < 3


async def test_a_header_claiming_a_trusted_address_is_still_refused_from_outside(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    """The trust is in the peer that connects, never in what a header says."""
    up = await recorders("a")
    server = await proxy(pp_config(up.url, trusted=["10.0.0.0/8"]))
    spoof = Addresses("10.0.0.1", 1, "10.0.0.2", 80)
    assert await exchange(server.listeners[0].port, v1(spoof) + GET) == b""
    assert errors(server) == {"untrusted": 1}


async def test_shutdown_closes_connections_still_in_their_header(
    recorders: MakeRecorder, tmp_path: Path
) -> None:
    up = await recorders("a")
    server = ProxyServer(pp_config(up.url))
    await server.start()
    reader, writer = await asyncio.open_connection(HOST, server.listeners[0].port)
    try:
        writer.write(b"PROXY TCP4 ")
        await wait_for(lambda: len(server.listeners[0].readers) == 1)
        await server.shutdown(1.0)
        assert await read_all(reader) == b""
    finally:
        writer.close()
    assert not server.listeners[0].readers


async def test_a_reload_turns_it_on_and_off_for_new_connections(
    recorders: MakeRecorder, proxy: MakeProxy
) -> None:
    up = await recorders("a")
    port = unused_port()
    plain = make_config([up.url], listener={"bind": f"{HOST}:{port}"})
    on = pp_config(up.url, bind=f"{HOST}:{port}")
    server = await proxy(plain)
    assert (await exchange(port, GET)).startswith(b"HTTP/1.1 200")
    assert await apply_config(server, on, "c.yaml") == []
    assert (await exchange(port, v1(CLIENT) + GET)).startswith(b"HTTP/1.1 200")
    assert await exchange(port, GET) == b""  # the trusted peer must send one now
    assert await apply_config(server, plain, "c.yaml") == []
    assert (await exchange(port, GET)).startswith(b"HTTP/1.1 200")
    assert [s.headers["X-Forwarded-For"] for s in up.seen] == [HOST, CLIENT.src, HOST]
