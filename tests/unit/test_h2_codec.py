"""The HTTP/2 codec (``proxy.h2.codec``) against the ``h2`` library as a client, in
memory: what a long connection keeps, and what a peer can make it hold."""

from __future__ import annotations

import h2.config
import h2.connection
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
