"""Which HTTP/2 codec for the proxy's hot path: h2 (python-hyper) or zttp (Zig core).

A benchmark and a probe, not a test; no sockets, no event loop. The peer's bytes are
hand-built frames (HPACK from the ``hpack`` package that h2 depends on), generated before
the clock starts, so the figures are the codec's cost plus the few calls a wrapper in
the proxy would make, nothing else. Every timing is ``time.perf_counter`` around the
codec calls only; the fake peer's work (parsing the server's output, building
WINDOW_UPDATEs) is outside the clock.

Scenarios (each codec, best of ``--repeats``, microseconds per request):

``server-20b-fresh``
    A browser's 100 concurrent GETs (pseudo-headers plus 6 typical browser headers) in
    one buffer on a new connection; the server parses them and answers each with
    HEADERS (:status 200, content-type, content-length 20) and 20 bytes of DATA with
    END_STREAM, then drains ``data_to_send``. ``--rounds`` such connections.
``server-20b-long``
    The same on ONE connection for ``--long-streams`` streams (100 per round); the first
    and the last 10% are timed apart, to see whether closed streams pile up
    (python-hyper/h2#1163). Memory is measured in a separate child process: RSS growth,
    Python heap (tracemalloc) and, for h2, ``len(conn.streams)``.
``server-64k-default-window`` / ``server-64k-browser-window``
    100 concurrent GETs answered with 64 KiB bodies, split at the peer's max frame size
    (16384). The fake client acknowledges DATA with WINDOW_UPDATEs (when half a window
    is used, like browsers do); the default one keeps RFC windows of 65,535 bytes, the
    browser one announces Chrome's (6 MiB per stream, 15 MiB per connection).
``client-20b-long`` / ``client-20b-fresh``
    The proxy as an HTTP/2 client of an upstream: 100 concurrent requests with 10
    forwarded headers, each answered with a 20-byte response that the client parses
    (h2: acknowledging the DATA with ``acknowledge_received_data``).

Then, each in its own child process: hostile inputs (CONTINUATION flood, HPACK bomb,
a >64 KiB header block, 1000 SETTINGS, rapid reset, PING flood, too many streams, an
HPACK table size update above the limit, a flow-control violation, an empty-DATA flood),
reporting the exception, the GOAWAY/RST_STREAM the codec queued, events, time and peak
RSS; and a random/mutated-frame fuzz (``--fuzz-seconds`` per codec, server and client
role) that reports crashes (a child killed by a signal) with the input that did it.

Run from the repository root with the project's venv (h2 and zttp installed)::

    python loadtests/h2_codec_bench.py                      # everything (~3 min)
    python loadtests/h2_codec_bench.py --only speed --quick # timings only, fewer rounds
    python loadtests/h2_codec_bench.py --only hostile,fuzz --fuzz-seconds 60
    python loadtests/h2_codec_bench.py --json /tmp/h2codec.json

Instruction counts (stable on a busy machine; ``--only speed`` with one scenario)::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \\
        python loadtests/h2_codec_bench.py --only speed --quick --scenarios server-20b-fresh \\
        --codecs zttp
    callgrind_annotate /tmp/cg.out | head -40
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import hpack
import zttp

# --------------------------------------------------------------------------- frames

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
FRAME_NAMES = [
    "DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING",
    "GOAWAY", "WINDOW_UPDATE", "CONTINUATION",
]  # fmt: skip
ERROR_NAMES = {int(c): c.name for c in zttp.H2ErrorCode}

INITIAL_WINDOW = 65_535
CHROME_STREAM_WINDOW = 6 * 1024 * 1024
CHROME_CONN_WINDOW = 15 * 1024 * 1024 + 65_535


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((ftype, flags))
        + struct.pack(">I", sid)
        + payload
    )


def settings(*params: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in params))


def window_update(sid: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", increment))


def hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with ``first`` holding the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes, indexing: bool = False) -> bytes:
    """A literal header with a new name, not Huffman coded."""
    head = b"\x40" if indexing else b"\x00"
    return head + hpack_int(len(name), 7, 0) + name + hpack_int(len(value), 7, 0) + value


def parse_frames(buf: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each whole frame in a server's or client's output."""
    if buf.startswith(PREFACE):
        buf = buf[len(PREFACE) :]
    pos = 0
    while pos + 9 <= len(buf):
        length = int.from_bytes(buf[pos : pos + 3], "big")
        ftype, flags = buf[pos + 3], buf[pos + 4]
        sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
        yield ftype, flags, sid, buf[pos + 9 : pos + 9 + length]
        pos += 9 + length


def summarize_output(buf: bytes) -> dict[str, Any]:
    counts: dict[str, int] = {}
    summary: dict[str, Any] = {"bytes": len(buf)}
    rst_codes: dict[str, int] = {}
    for ftype, _flags, _sid, payload in parse_frames(buf):
        name = FRAME_NAMES[ftype] if ftype < len(FRAME_NAMES) else f"type{ftype}"
        counts[name] = counts.get(name, 0) + 1
        if ftype == GOAWAY and len(payload) >= 8:
            last, code = struct.unpack(">II", payload[:8])
            summary["goaway"] = f"{ERROR_NAMES.get(code, code)} last_stream_id={last}"
        elif ftype == RST_STREAM and len(payload) == 4:
            code_name = ERROR_NAMES.get(int.from_bytes(payload, "big"), "?")
            rst_codes[code_name] = rst_codes.get(code_name, 0) + 1
    summary["frames"] = counts
    if rst_codes:
        summary["rst_codes"] = rst_codes
    return summary


# --------------------------------------------------------------------------- traffic

BROWSER_HEADERS: list[tuple[bytes, bytes]] = [
    (b"user-agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                    b"Chrome/126.0.0.0 Safari/537.36"),
    (b"accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
                b"image/webp,*/*;q=0.8"),
    (b"accept-encoding", b"gzip, deflate, br, zstd"),
    (b"accept-language", b"en-US,en;q=0.9"),
    (b"cookie", b"session=6f1c0e9a4b2d4e7f8a9b0c1d2e3f4a5b; theme=dark; _ga=GA1.2.1234567890"),
    (b"sec-fetch-mode", b"navigate"),
]  # fmt: skip
REQUEST_HEADERS: list[tuple[bytes, bytes]] = [
    (b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
    (b":authority", b"example.com"), *BROWSER_HEADERS,
]  # fmt: skip
RESPONSE_HEADERS_H2: list[tuple[bytes, bytes]] = [
    (b":status", b"200"), (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"20"),
]  # fmt: skip
RESPONSE_HEADERS_ZTTP = RESPONSE_HEADERS_H2[1:]
BODY_20 = b"0123456789abcdefghij"
BODY_64K = bytes(range(256)) * 256
# what the proxy forwards upstream: host (zttp derives :authority from it) + 9 more
FORWARDED_HEADERS: list[tuple[bytes, bytes]] = [
    (b"host", b"backend.internal"), *BROWSER_HEADERS,
    (b"x-forwarded-for", b"203.0.113.7"), (b"x-forwarded-proto", b"https"),
    (b"x-request-id", b"9f86d081884c7d659a2feaa0c55ad015"),
]  # fmt: skip
STREAMS_PER_ROUND = 100


def client_preface(initial_window: int | None = None, conn_window: int | None = None) -> bytes:
    """What a client sends first: magic, SETTINGS, the ACK of the server's SETTINGS."""
    params = [(2, 0)] if initial_window is None else [(2, 0), (4, initial_window)]
    out = PREFACE + settings(*params) + frame(SETTINGS, ACK, 0)
    if conn_window is not None:
        out += window_update(0, conn_window - INITIAL_WINDOW)
    return out


def request_round(encoder: hpack.Encoder, first_sid: int, n: int = STREAMS_PER_ROUND) -> bytes:
    """``n`` GETs, HEADERS with END_STREAM, stream ids from ``first_sid``; the leading
    connection WINDOW_UPDATE credits the previous round's 20-byte bodies."""
    out = [window_update(0, n * len(BODY_20))]
    for i in range(n):
        block = encoder.encode(REQUEST_HEADERS)
        out.append(frame(HEADERS, END_STREAM | END_HEADERS, first_sid + 2 * i, block))
    return b"".join(out)


def response_round(encoder: hpack.Encoder, first_sid: int, n: int = STREAMS_PER_ROUND) -> bytes:
    """An upstream's answers: HEADERS + 20 bytes of DATA with END_STREAM per stream."""
    out = []
    for i in range(n):
        sid = first_sid + 2 * i
        out.append(frame(HEADERS, END_HEADERS, sid, encoder.encode(RESPONSE_HEADERS_H2)))
        out.append(frame(DATA, END_STREAM, sid, BODY_20))
    return b"".join(out)


UPSTREAM_PREFACE = settings((3, 128), (4, INITIAL_WINDOW)) + frame(SETTINGS, ACK, 0)


# --------------------------------------------------------------------------- adapters
# What an aiolb wrapper would do per connection, written the fastest way each API allows.


class Server:
    """A server connection: ``feed`` parses, answers every request, returns the bytes."""

    name = ""
    streams_done = 0

    def feed(self, data: bytes) -> bytes:
        raise NotImplementedError


class H2Server(Server):
    name = "h2"

    def __init__(self, body: bytes = BODY_20) -> None:
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_inbound_headers=True
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.body = body
        self.headers = [*RESPONSE_HEADERS_H2[:2], (b"content-length", str(len(body)).encode())]
        # stream id -> (body, offset) still to send once the windows allow it
        self.pending: dict[int, tuple[memoryview, int]] = {}

    def feed(self, data: bytes) -> bytes:
        conn = self.conn
        for event in conn.receive_data(data):
            if type(event) is h2.events.RequestReceived:
                sid = event.stream_id
                try:
                    conn.send_headers(sid, self.headers)
                except (h2.exceptions.StreamClosedError, h2.exceptions.StreamIDTooLowError):
                    # reset later in the same batch of events: h2 has forgotten the stream
                    continue
                body = self.body
                if len(body) <= conn.max_outbound_frame_size and (
                    conn.local_flow_control_window(sid) >= len(body)
                ):
                    conn.send_data(sid, body, end_stream=True)
                    self.streams_done += 1
                else:
                    self.pending[sid] = (memoryview(body), 0)
            elif type(event) is h2.events.DataReceived:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif type(event) is h2.events.StreamReset:
                self.pending.pop(event.stream_id, None)
        if self.pending:
            self._flush()
        return conn.data_to_send()

    def _flush(self) -> None:
        conn = self.conn
        max_frame = conn.max_outbound_frame_size
        for sid, (body, offset) in list(self.pending.items()):
            while offset < len(body):
                size = min(conn.local_flow_control_window(sid), max_frame, len(body) - offset)
                if size <= 0:
                    break
                end = offset + size
                conn.send_data(sid, body[offset:end], end_stream=end == len(body))
                offset = end
            if offset == len(body):
                del self.pending[sid]
                self.streams_done += 1
            else:
                self.pending[sid] = (body, offset)


class ZttpServer(Server):
    name = "zttp"

    def __init__(self, body: bytes = BODY_20) -> None:
        self.conn = zttp.Connection(zttp.SERVER, zttp.HTTP2)
        self.conn.initiate_connection()
        self.body = body
        self.headers = [RESPONSE_HEADERS_ZTTP[0], (b"content-length", str(len(body)).encode())]

    def feed(self, data: bytes) -> bytes:
        conn = self.conn
        conn.receive_data(data)
        request, need_data = zttp.Request, zttp.NEED_DATA
        while True:
            event = conn.next_event()
            if event is need_data:
                break
            if type(event) is request:
                stream = conn.stream(event.stream_id)
                stream.send_response(200, self.headers)
                stream.send_data(self.body)  # zttp parks what the windows do not admit
                stream.end_message()
                self.streams_done += 1
            elif event is zttp.CONNECTION_CLOSED:
                break
        return conn.data_to_send()


class H2Client:
    name = "h2"

    def __init__(self) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.headers = [
            (b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
            (b":authority", FORWARDED_HEADERS[0][1]), *FORWARDED_HEADERS[1:],
        ]  # fmt: skip
        self.responses = 0

    def send(self, n: int) -> bytes:
        conn = self.conn
        for _ in range(n):
            conn.send_headers(conn.get_next_available_stream_id(), self.headers, end_stream=True)
        return conn.data_to_send()

    def feed(self, data: bytes) -> bytes:
        conn = self.conn
        for event in conn.receive_data(data):
            if type(event) is h2.events.DataReceived:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif type(event) is h2.events.StreamEnded:
                self.responses += 1
        return conn.data_to_send()


class ZttpClient:
    name = "zttp"

    def __init__(self) -> None:
        self.conn = zttp.Connection(zttp.CLIENT, zttp.HTTP2)
        self.conn.initiate_connection()
        self.responses = 0

    def send(self, n: int) -> bytes:
        conn = self.conn
        for _ in range(n):
            conn.send_request(b"GET", b"/", b"2", FORWARDED_HEADERS).end_message()
        return conn.data_to_send()

    def feed(self, data: bytes) -> bytes:
        conn = self.conn
        conn.receive_data(data)
        need_data, end = zttp.NEED_DATA, zttp.EndOfMessage
        while True:
            event = conn.next_event()
            if event is need_data:
                break
            if type(event) is end:
                self.responses += 1
        return conn.data_to_send()


SERVERS: dict[str, Callable[..., Server]] = {"h2": H2Server, "zttp": ZttpServer}
CLIENTS: dict[str, Callable[[], H2Client | ZttpClient]] = {"h2": H2Client, "zttp": ZttpClient}


# --------------------------------------------------------------------------- fake browser


class FakeClient:
    """Reads a server's output; acknowledges DATA with WINDOW_UPDATEs when half a window
    is consumed (per stream and for the connection), as browsers do."""

    def __init__(self, stream_window: int, conn_window: int) -> None:
        self.stream_window, self.conn_window = stream_window, conn_window
        self.unacked: dict[int, int] = {}
        self.conn_unacked = 0
        self.ended: set[int] = set()
        self.buf = b""
        self.body_bytes = 0

    def read(self, data: bytes) -> bytes:
        buf = self.buf + data
        out = []
        pos = 0
        while pos + 9 <= len(buf):
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if pos + 9 + length > len(buf):
                break
            ftype, flags = buf[pos + 3], buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big")
            pos += 9 + length
            if ftype != DATA:
                continue
            self.body_bytes += length
            self.conn_unacked += length
            if flags & END_STREAM:
                self.ended.add(sid)
                self.unacked.pop(sid, None)
            else:
                used = self.unacked.get(sid, 0) + length
                if used >= self.stream_window // 2:
                    out.append(window_update(sid, used))
                    used = 0
                self.unacked[sid] = used
            if self.conn_unacked >= self.conn_window // 2:
                out.append(window_update(0, self.conn_unacked))
                self.conn_unacked = 0
        self.buf = buf[pos:]
        return b"".join(out)


# --------------------------------------------------------------------------- timings


@dataclass
class Timing:
    scenario: str
    codec: str
    us_per_request: float
    bytes_out_per_request: float
    extra: dict[str, Any] = field(default_factory=dict)


def best(repeats: int, run: Callable[[], tuple[float, int, int]]) -> tuple[float, int, int]:
    """The fastest of ``repeats`` runs of ``run`` -> (seconds, requests, bytes out)."""
    results = []
    for _ in range(repeats):
        gc.collect()
        results.append(run())
    return min(results, key=lambda r: r[0] / r[1])


def server_20b_fresh(codec: str, rounds: int) -> tuple[float, int, int]:
    data = client_preface() + request_round(hpack.Encoder(), 1)
    make = SERVERS[codec]
    clock = time.perf_counter
    elapsed, out_bytes = 0.0, 0
    for _ in range(rounds):
        start = clock()
        server = make()
        out = server.feed(data)
        elapsed += clock() - start
        assert server.streams_done == STREAMS_PER_ROUND, (codec, server.streams_done)
        out_bytes += len(out)
    return elapsed, rounds * STREAMS_PER_ROUND, out_bytes


def long_rounds(n_streams: int) -> list[bytes]:
    encoder = hpack.Encoder()
    rounds = [client_preface()]
    for first in range(1, 2 * n_streams, 2 * STREAMS_PER_ROUND):
        rounds.append(request_round(encoder, first))
    rounds[1] = rounds[0] + rounds[1]
    return rounds[1:]


def server_20b_long(
    codec: str, rounds_data: list[bytes]
) -> tuple[list[float], int, Server, str | None]:
    """Per-round seconds on one connection, and the error that ended it early, if any
    (zttp 0.0.35 answers stream 4097 with GOAWAY ENHANCE_YOUR_CALM, "flood detected")."""
    server = SERVERS[codec]()
    clock = time.perf_counter
    per_round = []
    out_bytes = 0
    for data in rounds_data:
        start = clock()
        try:
            out = server.feed(data)
        except (zttp.ProtocolError, h2.exceptions.ProtocolError) as exc:
            return per_round, out_bytes, server, f"{type(exc).__name__}: {exc}"
        per_round.append(clock() - start)
        out_bytes += len(out)
    assert server.streams_done == len(rounds_data) * STREAMS_PER_ROUND, server.streams_done
    return per_round, out_bytes, server, None


def server_64k(codec: str, rounds: int, browser: bool) -> tuple[float, int, int]:
    if browser:
        preface = client_preface(CHROME_STREAM_WINDOW, CHROME_CONN_WINDOW)
        windows = (CHROME_STREAM_WINDOW, CHROME_CONN_WINDOW)
    else:
        preface, windows = client_preface(), (INITIAL_WINDOW, INITIAL_WINDOW)
    first = preface + request_round(hpack.Encoder(), 1)
    make = SERVERS[codec]
    clock = time.perf_counter
    elapsed, out_bytes = 0.0, 0
    for _ in range(rounds):
        peer = FakeClient(*windows)
        start = clock()
        server = make(BODY_64K)
        out = server.feed(first)
        elapsed += clock() - start
        while True:
            acks = peer.read(out)
            out_bytes += len(out)
            if len(peer.ended) == STREAMS_PER_ROUND:
                break
            assert acks, f"{codec}: stalled with {len(peer.ended)} streams done"
            start = clock()
            out = server.feed(acks)
            elapsed += clock() - start
        assert peer.body_bytes == STREAMS_PER_ROUND * len(BODY_64K), peer.body_bytes
    return elapsed, rounds * STREAMS_PER_ROUND, out_bytes


def client_20b(codec: str, rounds: int, fresh: bool) -> tuple[list[float], int, int]:
    """Per-round seconds (100 requests each), requests, bytes sent."""
    if fresh:
        replies = [UPSTREAM_PREFACE + response_round(hpack.Encoder(), 1)] * rounds
    else:
        encoder = hpack.Encoder()
        replies = [response_round(encoder, 1 + 2 * STREAMS_PER_ROUND * i) for i in range(rounds)]
        replies[0] = UPSTREAM_PREFACE + replies[0]
    make = CLIENTS[codec]
    clock = time.perf_counter
    per_round, out_bytes = [], 0
    client = make()
    for reply in replies:
        start = clock()
        if fresh:
            client = make()
        sent = client.send(STREAMS_PER_ROUND)
        acks = client.feed(reply)
        per_round.append(clock() - start)
        out_bytes += len(sent) + len(acks)
    assert client.responses == (STREAMS_PER_ROUND if fresh else rounds * STREAMS_PER_ROUND)
    return per_round, rounds * STREAMS_PER_ROUND, out_bytes


def split_tenths(per_round: list[float], extra: dict[str, Any]) -> None:
    tenth = max(1, len(per_round) // 10)
    per_req = [1e6 * s / STREAMS_PER_ROUND for s in per_round]
    extra["first_10pct_us"] = round(sum(per_req[:tenth]) / tenth, 2)
    extra["last_10pct_us"] = round(sum(per_req[-tenth:]) / tenth, 2)


def run_speed(args: argparse.Namespace) -> list[Timing]:
    results: list[Timing] = []
    scenarios = args.scenarios.split(",")
    long_data = long_rounds(args.long_streams) if "server-20b-long" in scenarios else []
    for scenario in scenarios:
        for codec in args.codecs.split(","):
            extra: dict[str, Any] = {}
            if scenario == "server-20b-fresh":
                secs, n, out = best(args.repeats, lambda c=codec: server_20b_fresh(c, args.rounds))
            elif scenario == "server-20b-long":
                per_round, out, server, error = server_20b_long(codec, long_data)
                if error:
                    extra["ended_early"] = f"after {server.streams_done} streams: {error}"
                split_tenths(per_round, extra)
                secs, n = sum(per_round), len(per_round) * STREAMS_PER_ROUND
            elif scenario.startswith("server-64k"):
                browser = scenario.endswith("browser-window")
                rounds = max(1, args.rounds // 4)
                secs, n, out = best(
                    args.repeats, lambda c=codec, b=browser, r=rounds: server_64k(c, r, b)
                )
            elif scenario == "client-20b-fresh":

                def fresh_run(c: str = codec) -> tuple[float, int, int]:
                    per_round, n, out = client_20b(c, args.rounds, True)
                    return sum(per_round), n, out

                secs, n, out = best(args.repeats, fresh_run)
            elif scenario == "client-20b-long":  # one pass: closed streams may pile up
                rounds = args.long_streams // STREAMS_PER_ROUND
                per_round, n, out = client_20b(codec, rounds, False)
                secs = sum(per_round)
                split_tenths(per_round, extra)
            else:
                raise SystemExit(f"unknown scenario {scenario}")
            timing = Timing(scenario, codec, 1e6 * secs / n, out / n, extra)
            print(
                f"  {scenario:28} {codec:5} {timing.us_per_request:8.2f} us/request"
                f"  {timing.bytes_out_per_request:8.1f} B out/request  {extra or ''}",
                flush=True,
            )
            results.append(timing)
    return results


# --------------------------------------------------------------------------- children


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child_memory(codec: str, n_streams: int) -> dict[str, Any]:
    """RSS and Python heap growth over ``n_streams`` 20-byte exchanges on one connection."""
    rounds_data = long_rounds(n_streams)
    gc.collect()
    tracemalloc.start()
    rss0, heap0 = rss_kib(), tracemalloc.get_traced_memory()[0]
    server = SERVERS[codec]()
    server.feed(rounds_data[0])
    gc.collect()
    rss1, heap1 = rss_kib(), tracemalloc.get_traced_memory()[0]
    error = None
    for data in rounds_data[1:]:
        try:
            server.feed(data)
        except (zttp.ProtocolError, h2.exceptions.ProtocolError) as exc:
            error = f"after {server.streams_done} streams: {type(exc).__name__}: {exc}"
            break
    gc.collect()
    rss2, heap2 = rss_kib(), tracemalloc.get_traced_memory()[0]
    result: dict[str, Any] = {
        "streams": server.streams_done,
        "ended_early": error,
        "after_first_100_kib": {"rss": rss1 - rss0, "py_heap": (heap1 - heap0) // 1024},
        "growth_after_kib": {"rss": rss2 - rss1, "py_heap": (heap2 - heap1) // 1024},
    }
    if isinstance(server, H2Server):
        result["h2_len_streams"] = len(server.conn.streams)
        result["h2_len_closed_streams"] = len(server.conn._closed_streams)
    return result


# hostile inputs: each a list of chunks a client sends after its preface


def req_block(encoder: hpack.Encoder | None = None) -> bytes:
    return (encoder or hpack.Encoder()).encode(REQUEST_HEADERS)


def hostile_cases() -> dict[str, Callable[[], list[bytes]]]:
    def continuation_flood(fragment: bytes) -> list[bytes]:
        out = [frame(HEADERS, END_STREAM, 1, req_block())]
        out += [frame(CONTINUATION, 0, 1, fragment)] * 10_000
        return out

    def hpack_bomb() -> list[bytes]:
        block = req_block() + literal(b"x-bomb", b"a" * 4000, indexing=True) + b"\xbe" * 10_000
        return [frame(HEADERS, END_STREAM | END_HEADERS, 1, block)]

    def big_header_block() -> list[bytes]:
        block = req_block() + literal(b"x-big", b"b" * 70_000)
        parts = [block[i : i + 16_384] for i in range(0, len(block), 16_384)]
        out = [frame(HEADERS, END_STREAM, 1, parts[0])]
        out += [frame(CONTINUATION, 0, 1, p) for p in parts[1:-1]]
        return [*out, frame(CONTINUATION, END_HEADERS, 1, parts[-1])]

    def rapid_reset() -> list[bytes]:
        encoder = hpack.Encoder()
        return [
            frame(HEADERS, END_STREAM | END_HEADERS, sid, req_block(encoder))
            + frame(RST_STREAM, 0, sid, struct.pack(">I", 8))
            for sid in range(1, 20_001, 2)
        ]

    def too_many_streams() -> list[bytes]:
        encoder = hpack.Encoder()
        return [frame(HEADERS, END_HEADERS, sid, req_block(encoder)) for sid in range(1, 401, 2)]

    def table_size_update() -> list[bytes]:
        return [
            frame(HEADERS, END_STREAM | END_HEADERS, 1, hpack_int(65_536, 5, 0x20) + req_block())
        ]

    def flow_control_violation() -> list[bytes]:
        chunk = b"u" * 16_384
        block = hpack.Encoder().encode([(b":method", b"POST"), *REQUEST_HEADERS[1:]])
        return [frame(HEADERS, END_HEADERS, 1, block)] + [frame(DATA, 0, 1, chunk)] * 8

    def empty_data_flood() -> list[bytes]:
        block = hpack.Encoder().encode([(b":method", b"POST"), *REQUEST_HEADERS[1:]])
        return [frame(HEADERS, END_HEADERS, 1, block)] + [frame(DATA, 0, 1)] * 10_000

    return {
        "continuation_flood_10k_empty": lambda: continuation_flood(b""),
        "continuation_flood_10k_x16B": lambda: continuation_flood(literal(b"x-f", b"y" * 10)),
        "hpack_bomb_4KBx10k_refs": hpack_bomb,
        "header_block_70KiB": big_header_block,
        "settings_1000": lambda: [settings((1, 4096))] * 1000,
        "rapid_reset_10k": rapid_reset,
        "ping_10k": lambda: [frame(PING, 0, 0, b"12345678")] * 10_000,
        "too_many_streams_200_open": too_many_streams,
        "hpack_table_size_update_64k": table_size_update,
        "flow_control_violation_128KiB": flow_control_violation,
        "empty_data_flood_10k": empty_data_flood,
    }


def child_hostile(codec: str, case: str) -> dict[str, Any]:
    chunks = hostile_cases()[case]()
    server = SERVERS[codec]()
    initial = server.feed(b"")  # the server's SETTINGS
    events: dict[str, int] = {}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = [initial]
    error = None
    start = time.perf_counter()
    fed = 0
    preface = client_preface()
    # feed in network-sized pieces (64 KiB), draining events after each
    buf = preface + b"".join(chunks)
    original_feed = server.feed

    if isinstance(server, H2Server):
        conn = server.conn

        def h2_feed(data: bytes) -> bytes:
            result = original_feed(data)
            return result

        # count events by wrapping receive_data
        receive = conn.receive_data

        def counting_receive(data: bytes) -> list[h2.events.Event]:
            evs = receive(data)
            for e in evs:
                events[type(e).__name__] = events.get(type(e).__name__, 0) + 1
            return evs

        conn.receive_data = counting_receive  # type: ignore[method-assign]
        feed = h2_feed
    else:
        zconn = server.conn
        next_event = zconn.next_event

        class Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(zconn, name)

            def next_event(self) -> zttp.Event:
                e = next_event()
                if e is not zttp.NEED_DATA:
                    events[type(e).__name__] = events.get(type(e).__name__, 0) + 1
                return e

        server.conn = Counting()  # type: ignore[assignment]
        feed = original_feed
    try:
        for pos in range(0, len(buf), 65_536):
            piece = buf[pos : pos + 65_536]
            out.append(feed(piece))
            fed += len(piece)
    except Exception as exc:
        error = f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:150]}"
        try:
            real = server.conn if isinstance(server, H2Server) else zconn
            out.append(real.data_to_send())
        except Exception as exc2:
            error += f" (then data_to_send raised {type(exc2).__name__})"
    elapsed = time.perf_counter() - start
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "input_bytes": len(buf),
        "fed_bytes": fed,
        "exception": error,
        "events": events,
        "output": summarize_output(b"".join(out)),
        "ms": round(1e3 * elapsed, 1),
        "peak_rss_growth_kib": rss1 - rss0,
    }


# fuzz


def seed_corpus() -> list[list[bytes]]:
    """Valid client conversations, as frame lists after the preface."""
    enc = hpack.Encoder()
    post = [(b":method", b"POST"), *REQUEST_HEADERS[1:], (b"content-length", b"5")]
    block = enc.encode(post)
    return [
        [frame(HEADERS, END_STREAM | END_HEADERS, 1, enc.encode(REQUEST_HEADERS))],
        [
            frame(HEADERS, END_HEADERS, 1, block),
            frame(DATA, 0, 1, b"he"),
            frame(DATA, END_STREAM, 1, b"llo"),
            frame(PING, 0, 0, b"abcdefgh"),
            window_update(0, 1000),
        ],
        [
            frame(HEADERS, PRIORITY_FLAG, 3, b"\x00\x00\x00\x01\x10" + block[:5]),
            frame(CONTINUATION, END_HEADERS, 3, block[5:]),
            frame(DATA, PADDED, 3, b"\x03abc\x00\x00\x00"),
            frame(HEADERS, END_STREAM | END_HEADERS, 3, enc.encode([(b"x-trailer", b"1")])),
            frame(PRIORITY, 0, 5, b"\x00\x00\x00\x03\x20"),
            frame(RST_STREAM, 0, 3, struct.pack(">I", 8)),
            settings((1, 0), (4, 1 << 20), (5, 1 << 16)),
            frame(GOAWAY, 0, 0, struct.pack(">II", 3, 0) + b"bye"),
        ],
    ]


def server_corpus_for_client() -> list[list[bytes]]:
    enc = hpack.Encoder()
    return [
        [
            UPSTREAM_PREFACE,
            frame(HEADERS, END_HEADERS, 1, enc.encode([(b":status", b"103"), (b"link", b"</a>")])),
            frame(HEADERS, END_HEADERS, 1, enc.encode(RESPONSE_HEADERS_H2)),
            frame(DATA, 0, 1, BODY_20[:10]),
            frame(DATA, END_STREAM, 1, BODY_20[10:]),
            frame(HEADERS, END_HEADERS, 3, enc.encode(RESPONSE_HEADERS_H2)),
            frame(DATA, 0, 3, BODY_20),
            frame(HEADERS, END_STREAM | END_HEADERS, 3, enc.encode([(b"grpc-status", b"0")])),
            frame(RST_STREAM, 0, 5, struct.pack(">I", 7)),
            frame(PUSH_PROMISE, END_HEADERS, 1, b"\x00\x00\x00\x02" + enc.encode(REQUEST_HEADERS)),
            frame(GOAWAY, 0, 0, struct.pack(">II", 5, 0)),
        ]
    ]


def mutate(rng: random.Random, frames: list[bytes]) -> bytes:
    frames = list(frames)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and any(frames):  # flip bytes in a frame
            i = rng.choice([j for j, f in enumerate(frames) if f])
            b = bytearray(frames[i])
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            frames[i] = bytes(b)
        elif op == 1:  # a random frame
            payload = rng.randbytes(rng.choice((0, 1, 4, 5, 8, 9, 16, 100, 3000)))
            f = frame(
                rng.randrange(12),
                rng.randrange(256),
                rng.choice((0, 1, 2, 3, 5, 7, 2**31 - 1)),
                payload,
            )
            if rng.random() < 0.2:  # lie about the length
                f = struct.pack(">I", rng.randrange(1 << 24))[1:] + f[3:]
            frames.insert(rng.randint(0, len(frames)), f)
        elif op == 2 and frames:  # duplicate / reorder
            frames.insert(rng.randint(0, len(frames)), rng.choice(frames))
        elif op == 3 and frames:  # drop
            frames.pop(rng.randrange(len(frames)))
        elif op == 4 and frames:  # truncate
            i = rng.randrange(len(frames))
            frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        else:  # random HPACK block
            block = rng.randbytes(rng.randint(1, 40))
            frames.insert(
                rng.randint(0, len(frames)),
                frame(HEADERS, rng.choice((4, 5, 0)), rng.choice((1, 3, 7)), block),
            )
    return b"".join(frames)


def fuzz_server(codec: str, data: bytes, rng: random.Random) -> None:
    server = SERVERS[codec]()
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 9, 64, 1 << 20))
        piece = data[pos : pos + step]
        pos += step
        if isinstance(server, ZttpServer):
            server.conn.receive_data(piece)
            while True:
                event = server.conn.next_event()
                if event is zttp.NEED_DATA or event is zttp.CONNECTION_CLOSED:
                    break
                if type(event) is zttp.Request:
                    stream = server.conn.stream(event.stream_id)
                    op = rng.randrange(4)
                    if op == 0:
                        stream.reset()
                    else:
                        stream.send_informational(103) if op == 1 else None
                        stream.send_response(200, server.headers)
                        stream.send_data(server.body)
                        stream.end_message([(b"x-t", b"1")] if op == 2 else None)
            server.conn.data_to_send()
        else:
            server.feed(piece)
    if isinstance(server, ZttpServer):
        server.conn.receive_data(b"")
        server.conn.next_event()
        server.conn.close()
        server.conn.data_to_send()


def fuzz_client(codec: str, data: bytes, rng: random.Random) -> None:
    client = CLIENTS[codec]()
    client.send(3)
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 9, 64, 1 << 20))
        client.feed(data[pos : pos + step])
        pos += step


def child_fuzz(codec: str, seconds: float, seed: int, last_path: str) -> dict[str, Any]:
    rng = random.Random(seed)
    servers_in, clients_in = seed_corpus(), server_corpus_for_client()
    expected: tuple[type[BaseException], ...]
    expected = (zttp.ProtocolError,) if codec == "zttp" else (h2.exceptions.ProtocolError,)
    fd = os.open(last_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    iterations, expected_errors = 0, 0
    unexpected: dict[str, int] = {}
    unexpected_examples: dict[str, str] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        role = "server" if rng.random() < 0.7 else "client"
        if role == "server":
            data = client_preface() + mutate(rng, rng.choice(servers_in))
        else:
            data = mutate(rng, rng.choice(clients_in))
        os.ftruncate(fd, 0)
        os.pwrite(fd, role.encode() + b"\n" + data, 0)
        iterations += 1
        try:
            if role == "server":
                fuzz_server(codec, data, random.Random(iterations))
            else:
                fuzz_client(codec, data, random.Random(iterations))
        except expected:
            expected_errors += 1
        except Exception as exc:
            name = f"{role}:{type(exc).__module__}.{type(exc).__name__}"
            unexpected[name] = unexpected.get(name, 0) + 1
            unexpected_examples.setdefault(name, str(exc)[:200])
    os.close(fd)
    return {
        "iterations": iterations,
        "protocol_errors": expected_errors,
        "unexpected_exceptions": unexpected,
        "unexpected_examples": unexpected_examples,
    }


def run_child(args: list[str], timeout: float) -> tuple[dict[str, Any] | None, str]:
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return None, f"rc={proc.returncode} {proc.stderr[-600:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default="speed,memory,hostile,fuzz")
    parser.add_argument("--codecs", default="h2,zttp")
    parser.add_argument(
        "--scenarios",
        default="server-20b-fresh,server-20b-long,server-64k-default-window,"
        "server-64k-browser-window,client-20b-long,client-20b-fresh",
    )
    parser.add_argument("--rounds", type=int, default=200, help="connections / rounds of 100")
    parser.add_argument("--long-streams", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fuzz-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and streams")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, codec, *rest = args.child
        if kind == "memory":
            result = child_memory(codec, int(rest[0]))
        elif kind == "hostile":
            result = child_hostile(codec, rest[0])
        else:
            result = child_fuzz(codec, float(rest[0]), int(rest[1]), rest[2])
        print(json.dumps(result))
        return

    if args.quick:
        args.rounds, args.long_streams, args.repeats = 40, 20_000, 2
        args.fuzz_seconds = min(args.fuzz_seconds, 10.0)
    only = args.only.split(",")
    codecs = args.codecs.split(",")
    report: dict[str, Any] = {"versions": {"h2": h2.__version__, "zttp": "0.0.35?"}}
    try:
        from importlib.metadata import version

        report["versions"]["zttp"] = version("zttp")
    except Exception:
        pass
    print(f"versions: {report['versions']}  python {sys.version.split()[0]}", flush=True)

    if "speed" in only:
        print("speed (best of repeats; us per request, codec calls only):", flush=True)
        timings = run_speed(args)
        report["speed"] = [t.__dict__ for t in timings]
        by = {(t.scenario, t.codec): t.us_per_request for t in timings}
        for scenario in dict.fromkeys(t.scenario for t in timings):
            if (scenario, "h2") in by and (scenario, "zttp") in by:
                ratio = by[scenario, "h2"] / by[scenario, "zttp"]
                print(f"  {scenario:28} h2/zttp = {ratio:5.1f}x")

    if "memory" in only:
        print(f"memory after {args.long_streams} streams on one connection:", flush=True)
        report["memory"] = {}
        for codec in codecs:
            result, err = run_child(["memory", codec, str(args.long_streams)], 600)
            report["memory"][codec] = result or err
            print(f"  {codec:5} {result or err}", flush=True)

    if "hostile" in only:
        print("hostile inputs (each in a child process):", flush=True)
        report["hostile"] = {}
        for case in hostile_cases():
            for codec in codecs:
                try:
                    result, err = run_child(["hostile", codec, case], 120)
                except subprocess.TimeoutExpired:
                    result, err = None, "timeout after 120 s"
                report["hostile"][f"{case}/{codec}"] = result or err
                print(f"  {case:32} {codec:5} {json.dumps(result) if result else err}", flush=True)

    if "fuzz" in only:
        print(f"fuzz ({args.fuzz_seconds:.0f} s per codec, seed {args.seed}):", flush=True)
        report["fuzz"] = {}
        for codec in codecs:
            last = f"/tmp/h2_codec_fuzz_last_{codec}.bin"
            result, err = run_child(
                ["fuzz", codec, str(args.fuzz_seconds), str(args.seed), last],
                args.fuzz_seconds + 120,
            )
            if result is None:
                err += f"; crashing input kept in {last}"
            report["fuzz"][codec] = result or err
            print(f"  {codec:5} {result or err}", flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
