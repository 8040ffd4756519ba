"""The PROXY protocol codec (``proxy.proxy_protocol``): round trips of both versions,
incomplete input, the bounds, and what is refused."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.proxy_protocol import (
    V1_MAX,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Addresses,
    Header,
    ProxyHeaderError,
    may_be_header,
    parse,
    v1,
    v2,
)

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
addresses = st.one_of(
    st.builds(Addresses, ipv4, ports, ipv4, ports),
    st.builds(Addresses, ipv6, ports, ipv6, ports),
)


@given(addresses, st.sampled_from([v1, v2]), st.binary(max_size=64))
def test_round_trip_and_the_bytes_after_are_the_client_s(
    a: Addresses, build: object, after: bytes
) -> None:
    header = build(a)  # type: ignore[operator]
    found = parse(header + after)
    assert found == Header(a, len(header), 1 if build is v1 else 2)
    assert len(header) <= V1_MAX or build is v2


@given(addresses, st.sampled_from([v1, v2]))
def test_every_proper_prefix_asks_for_more(a: Addresses, build: object) -> None:
    header = build(a)  # type: ignore[operator]
    for n in range(1, len(header)):
        assert parse(header[:n]) is None
        assert may_be_header(header[:n])


@given(st.binary(min_size=1, max_size=200))
def test_any_bytes_give_a_header_more_or_an_error_never_another_exception(data: bytes) -> None:
    try:
        found = parse(data)
    except ProxyHeaderError:
        return
    if found is not None:
        assert 0 < found.length <= len(data)


def test_mixed_families_are_sent_as_ipv6() -> None:
    a = Addresses("192.0.2.1", 1, "2001:db8::1", 2)
    mapped = Addresses("::ffff:c000:201", 1, "2001:db8::1", 2)
    assert parse(v1(a)) == Header(mapped, len(v1(a)), 1)
    assert parse(v2(a)) == Header(mapped, len(v2(a)), 2)


def test_health_probes_send_local_and_unknown() -> None:
    assert v1(None) == b"PROXY UNKNOWN\r\n"
    assert v2(None) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    assert parse(v1(None)) == Header(None, 15, 1)
    assert parse(v2(None)) == Header(None, 16, 2)
    assert v1(Addresses("a.sock", 0, "b.sock", 0)) == b"PROXY UNKNOWN\r\n"


def test_v2_bounds() -> None:
    fixed = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_LENGTH)
    assert parse(fixed) is None  # the most allowed: waits for it
    with pytest.raises(ProxyHeaderError, match="at most 4096"):
        parse(V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", V2_MAX_LENGTH + 1))
    unix = V2_SIGNATURE + b"\x21\x31" + struct.pack("!H", 216) + bytes(216)
    assert parse(unix) == Header(None, 232, 2)  # AF_UNIX: the connection's own address
    with pytest.raises(ProxyHeaderError, match="version 1"):
        parse(V2_SIGNATURE + b"\x11")


def test_v1_limits() -> None:
    assert parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2") is None
    with pytest.raises(ProxyHeaderError, match="107"):
        parse(b"PROXY TCP6 " + b"f" * 100)
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    tcp6 = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    found = parse(tcp6)
    assert found is not None and found.length == 104
    assert found.addresses == Addresses(full, 65535, full, 65535)
    longest = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()  # the spec's worst
    assert len(longest) == V1_MAX and parse(longest) == Header(None, V1_MAX, 1)


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n", b"PROXY  TCP4 x\r\n", b"\r\n\r\n\x00\r\nQUIT!", b"\x16\x03\x01"],
)
def test_not_a_header(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)
