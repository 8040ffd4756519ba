"""The HTTP/2 codec (``proxy.h2.codec``) against the ``h2`` library as a client, in
memory: what a long connection keeps, and what a peer can make it hold."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.h2 import codec as h2c
from proxy.h2.codec import Codec, CodecError


def pair() -> tuple[Codec, h2.connection.H2Connection]:
    server = Codec(client_side=False, validate_headers=False)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    server.feed(client.data_to_send())
    client.receive_data(server.out())
    server.feed(client.data_to_send())  # the client's SETTINGS ACK
    return server, client


HEAD = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


def test_a_long_connection_remembers_a_bounded_number_of_closed_streams() -> None:
    server, client = pair()
    for _ in range(1200):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, HEAD, end_stream=True)
        events = server.feed(client.data_to_send())
        assert events[0][0] == h2c.REQUEST
        server.send_headers(sid, [(b":status", b"204")], end=True)
        client.receive_data(server.out())
    # h2 keeps 65536 by default (python-hyper/h2#1163): some 8 MB per long connection
    closed = server._conn._closed_streams  # h2's own record: nothing else shows it
    assert len(closed) <= 1024


def test_a_frame_announced_over_the_maximum_is_refused_on_its_header() -> None:
    server, _ = pair()
    with pytest.raises(CodecError) as caught:
        server.feed((1 << 20).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + b"x" * 100)
    assert caught.value.code == 0x6  # FRAME_SIZE_ERROR


# -- HPACK: the blocks the codec remembers decode and encode as hpack's own ------------------

_NAMES = st.sampled_from([b"cookie", b"x-a", b"date", b"content-type", b"accept", b":path"])
_VALUES = st.sampled_from([b"1", b"2", b"text/plain", b"a=b", b"x" * 300, b""])
_LISTS = st.lists(st.lists(st.tuples(_NAMES, _VALUES), min_size=1, max_size=6), max_size=40)


@settings(max_examples=150, deadline=None)
@given(_LISTS, st.sampled_from([0, 256, 4096]))
def test_the_remembering_decoder_decodes_as_hpack_does(
    lists: list[list[tuple[bytes, bytes]]], table_size: int
) -> None:
    """Repeated lists (all indexed: remembered) and new ones (the table changes) mixed,
    with a table small enough to evict: every block decodes as hpack's decoder does."""
    encoder = hpack.Encoder()
    encoder.header_table_size = table_size
    plain, remembering = hpack.Decoder(), h2c._Decoder(65536)
    for headers in lists + lists + lists[::-1]:
        block = encoder.encode(headers)
        assert remembering.decode(block, raw=True) == plain.decode(block, raw=True)


@settings(max_examples=150, deadline=None)
@given(_LISTS)
def test_the_remembering_encoder_encodes_what_hpack_decodes(
    lists: list[list[tuple[bytes, bytes]]],
) -> None:
    encoder, decoder = h2c._Encoder(), hpack.Decoder()
    for headers in lists + lists + lists[::-1]:
        # credentials and per-message ids go last (in their own order): the order of
        # fields of different names means nothing (RFC 9110 5.3)
        moved = [f for f in headers if f[0] in h2c._UNINDEXED]
        expected = [f for f in headers if f[0] not in h2c._UNINDEXED] + moved
        assert decoder.decode(encoder.encode(headers), raw=True) == expected


def test_credentials_are_never_indexed_and_request_ids_stay_out_of_the_table() -> None:
    """A shared upstream connection carries many clients' requests: a cookie in its
    compression table would let one client probe for another's (CRIME-like), and a
    request id in it would push everything else out."""
    encoder, decoder = h2c._Encoder(), hpack.Decoder()
    for i in range(3):
        block = encoder.encode(
            [(b":path", b"/"), (b"cookie", b"sid=secret"), (b"x-request-id", b"id-%d" % i)]
        )
        fields = decoder.decode(block, raw=True)
        assert [type(f).__name__ for f in fields][1] == "NeverIndexedHeaderTuple"
    table = [name for name, _ in encoder.header_table.dynamic_entries]
    assert b"cookie" not in table and b"x-request-id" not in table


def test_a_repeated_block_is_decoded_once() -> None:
    encoder, decoder = hpack.Encoder(), h2c._Decoder(65536)
    headers = [(b":method", b"GET"), (b"user-agent", b"curl/8"), (b"accept", b"*/*")]
    decoder.decode(encoder.encode(headers), raw=True)  # adds them to the table
    block = encoder.encode(headers)  # now all indexed
    assert decoder.decode(block, raw=True) == headers
    assert block in decoder.cache
    assert decoder.decode(block, raw=True) == headers


# -- the frames the codec parses and builds itself: as h2 would --------------------------------


def _server() -> Codec:
    return Codec(client_side=False, validate_headers=False, initial_window=1 << 20,
                 connection_window=1 << 24)  # fmt: skip


def _client_bytes(actions: list[tuple[str, int]]) -> bytes:
    """What an h2 client (that read the server's SETTINGS) writes for ``actions``:
    requests (some with bodies in several DATA frames, padded or not; a header block
    split by CONTINUATION; a PRIORITY flag), RST_STREAM, PING, WINDOW_UPDATE."""
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.receive_data(_server().out())
    out = bytearray(client.data_to_send())
    out += b"\0\0\0\xfe\0\0\0\0\0" + b"\0\0\x08\x06\0\0\0\0\0" + b"\x01" * 8  # unknown; PING
    for kind, n in actions:
        sid = client.get_next_available_stream_id()
        if kind == "get":
            client.send_headers(sid, HEAD, end_stream=True)
        elif kind == "post":
            client.send_headers(sid, [*HEAD, (b"content-length", b"%d" % n)], end_stream=False)
            for at in range(0, n, 9000):
                piece = b"b" * min(9000, n - at)
                client.send_data(sid, piece, end_stream=at + 9000 >= n,
                                 pad_length=at % 7 if at % 2 else None)  # fmt: skip
            if not n:
                client.end_stream(sid)
        elif kind == "big-head":  # over one frame: HEADERS then CONTINUATION
            client.max_outbound_frame_size = 500  # up to 80 frames: over 64 is refused
            client.send_headers(sid, [*HEAD, (b"x-big", b"v" * n)], end_stream=True)
            client.max_outbound_frame_size = 16384
        elif kind == "priority":
            client.send_headers(sid, HEAD, end_stream=True, priority_weight=n % 256 + 1)
        elif kind == "reset":
            client.send_headers(sid, HEAD, end_stream=False)
            client.reset_stream(sid)
        elif kind == "ping":
            client.ping(b"%08d" % (n % 10**8))
        elif kind == "window":
            client.increment_flow_control_window(n + 1)
        out += client.data_to_send()
    return bytes(out)


_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(["get", "post", "big-head", "priority", "reset", "ping", "window"]),
        st.integers(min_value=0, max_value=36000),
    ),
    max_size=12,
)


def _fed(data: bytes, sizes: list[int] | None) -> tuple[list[h2c.Event], bytes]:
    """The events of ``data`` fed in pieces of ``sizes`` (in turn; None: whole, to h2
    itself, as the codec did before it parsed any frame), and what the server answered
    (WINDOW_UPDATEs for the bodies it took, PING ACKs, RST_STREAMs; a GOAWAY for a
    connection error, which ends the events with ``("error", code)``)."""
    server = _server()
    server.out()
    events: list[h2c.Event] = []
    answered = bytearray()
    at = data.index(b"\x01" * 8) + 8  # the opening (preface, SETTINGS, PING) goes first
    server._conn.receive_data(data[:at])
    i = 0
    while at < len(data):
        n = sizes[i % len(sizes)] if sizes else len(data) - at
        new: list[h2c.Event] = []
        try:
            if sizes:
                new = server.feed(data[at : at + n])
            else:
                Codec._convert(server._conn.receive_data(data[at:]), new)
        except (CodecError, h2.exceptions.ProtocolError) as exc:
            events.append(("error", int(getattr(exc, "code", 0) or exc.error_code)))
            answered += server.out()
            break
        for ev in new:
            if ev[0] == h2c.DATA:
                server.ack(ev[1], ev[3])
        events += new
        answered += server.out()
        at, i = at + n, i + 1
    conn = server._conn  # and h2's state: the windows it counts, each stream's state
    windows = [conn._inbound_flow_control_window_manager.current_window_size]
    for sid, stream in sorted(conn.streams.items()):
        windows += [sid, stream.state_machine.state, stream.inbound_flow_control_window]
    events.append(("state", tuple(windows), conn.highest_inbound_stream_id))
    return events, bytes(answered)


@settings(max_examples=80, deadline=None)
@given(_ACTIONS, st.lists(st.integers(min_value=1, max_value=70000), min_size=1, max_size=8))
def test_frames_taken_whole_give_the_events_h2_gives(
    actions: list[tuple[str, int]], cuts: list[int]
) -> None:
    """The same bytes fed whole (the codec parses HEADERS and DATA itself) and to h2
    alone: the same events, and the same frames answered; cut at random points, the
    same events again (a connection error: the same error; the events of the read it
    ends in are lost either way)."""
    data = _client_bytes(actions)
    whole = _fed(data, [len(data)])
    assert whole == _fed(data, None)
    cut = _fed(data, cuts)[0]
    if len(whole[0]) > 1 and whole[0][-2][0] == "error":
        assert cut[-2] == whole[0][-2]
    else:
        assert cut == whole[0]


def _frame_types(data: bytes) -> list[int]:
    types, at = [], 0
    while at + 9 <= len(data):
        types.append(data[at + 3])
        at += 9 + int.from_bytes(data[at : at + 3], "big")
    return types


def test_a_body_longer_than_its_content_length_ends_the_connection() -> None:
    """The length h2 tracks for a stream holds on the codec's own path as on h2's
    (RFC 9113 section 8.1.1: a malformed request, never forwarded)."""
    server, client = pair()
    client.send_headers(1, [*HEAD, (b"content-length", b"5")], end_stream=False)
    raw = client.data_to_send() + b"\0\0\x0a\0\x01\0\0\0\x01" + b"x" * 10  # DATA, END_STREAM
    with pytest.raises(CodecError):
        server.feed(raw)
    assert 0x7 in _frame_types(bytes(server.out()))  # GOAWAY


@pytest.mark.parametrize("trailers", [True, False])
@pytest.mark.parametrize("size", [0, 10, 16384, 16385, 100_001])
def test_responses_built_by_the_codec_decode_in_h2(size: int, trailers: bool) -> None:
    """An informational 100, a response head (one over a frame size: CONTINUATION), a
    body cut into frames of the client's maximum, ending the stream or followed by
    trailers: h2 as the client reads what the codec framed itself, and both sides
    count the same window."""
    server, client = pair()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
    client.increment_flow_control_window(1 << 20)
    client.send_headers(1, [*HEAD, (b"te", b"trailers")], end_stream=True)
    server.feed(client.data_to_send())
    client.receive_data(bytes(server.out()))
    server.feed(client.data_to_send())  # the ACK of the client's SETTINGS
    head = [(b":status", b"200")] + ([(b"x-long", b"h" * 20000)] if size % 2 else [])
    server.send_headers(1, [(b":status", b"100")])
    server.send_headers(1, head)
    body = bytes(range(256)) * (size // 256) + b"t" * (size % 256)
    before = server.window(1)
    server.send_data(1, body, end=not trailers)
    if trailers:
        assert server.window(1) == before - size
        server.send_headers(1, [(b"grpc-status", b"0")], end=True)
    got = client.receive_data(bytes(server.out()))
    kinds = [type(e).__name__ for e in got if type(e).__name__ != "DataReceived"]
    assert kinds == ["InformationalResponseReceived", "ResponseReceived",
                     *(["TrailersReceived"] if trailers else []), "StreamEnded"]  # fmt: skip
    assert client.inbound_flow_control_window == (1 << 20) + 65535 - size
    assert got[1].headers == head
    data = [e for e in got if isinstance(e, h2.events.DataReceived)]
    assert b"".join(e.data for e in data) == body
    assert all(len(e.data) <= 16384 for e in data)
    assert client._get_stream_by_id(1).closed  # both sides ended


_REPLIES = st.lists(
    st.tuples(
        st.sampled_from(["body", "continue", "trailers", "head", "reset", "empty"]),
        st.integers(min_value=0, max_value=30000),
    ),
    min_size=1,
    max_size=10,
)


def _client_side(replies: list[tuple[str, int]]) -> tuple[Codec, bytes, list[int]]:
    """A client codec that sent one request per reply (the codec's own framing), an h2
    server that read them, and the server's bytes answering each as ``replies`` say."""
    client = Codec(client_side=True, initial_window=1 << 20, connection_window=1 << 24)
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()
    server.receive_data(bytes(client.out()))
    client.feed(server.data_to_send())
    server.receive_data(bytes(client.out()))  # the SETTINGS ACK
    sids = []
    for kind, _ in replies:
        sid = client.next_stream_id()
        method = b"HEAD" if kind == "head" else b"GET"
        client.send_headers(sid, [(b":method", method), *HEAD[1:]], end=True)
        sids.append(sid)
    got = server.receive_data(bytes(client.out()))
    received = [e for e in got if isinstance(e, h2.events.RequestReceived)]
    assert [e.stream_id for e in received] == sids  # the requests the codec framed
    assert [dict(e.headers)[b":method"] for e in received] == [
        b"HEAD" if kind == "head" else b"GET" for kind, _ in replies
    ]
    server.data_to_send()
    for sid, (kind, n) in zip(sids, replies, strict=True):
        if kind == "reset":
            server.reset_stream(sid)
            continue
        if kind == "continue":
            server.send_headers(sid, [(b":status", b"100")])
        length = [(b"content-length", b"%d" % n)] if kind != "trailers" else []
        server.send_headers(sid, [(b":status", b"200"), *length], end_stream=kind == "empty")
        if kind == "head":  # its Content-Length, then an empty DATA ending the stream
            server.end_stream(sid)
        if kind in ("head", "empty"):
            continue
        for at in range(0, n, 16384):
            server.send_data(sid, b"r" * min(16384, n - at))
        if kind == "trailers":
            server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        else:
            server.end_stream(sid)
    return client, server.data_to_send(), sids


@settings(max_examples=60, deadline=None)
@given(_REPLIES, st.integers(min_value=1, max_value=5000))
def test_responses_taken_whole_give_the_events_h2_gives(
    replies: list[tuple[str, int]], cut: int
) -> None:
    """A client codec reads responses (informational heads, trailers, a HEAD's head
    with a Content-Length and no body, resets) as h2 alone does, whole or cut."""
    results = []
    for how in ("whole", "h2", "cut"):
        client, data, _ = _client_side([(k, n if k != "empty" else 0) for k, n in replies])
        events: list[h2c.Event] = []
        if how == "h2":
            Codec._convert(client._conn.receive_data(data), events)
        else:
            size = len(data) if how == "whole" else cut
            for at in range(0, len(data), size):
                events += client.feed(data[at : at + size])
        conn = client._conn
        state = [(sid, s.state_machine.state) for sid, s in sorted(conn.streams.items())]
        results.append(([e if e[0] != h2c.DATA else e[:3] + e[4:] for e in events], state))
    assert results[0] == results[1] == results[2]
