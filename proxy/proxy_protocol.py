"""The PROXY protocol (HAProxy's, versions 1 and 2): parsing and building headers.

Theory of operation
-------------------
A load balancer in TCP mode (HAProxy ``send-proxy``, an AWS NLB, another aiolb) that
opens a connection on behalf of a client writes one header before the client's bytes:
who connected to whom. Version 1 is a line of text (``PROXY TCP4 SRC DST SPORT
DPORT\\r\\n``, at most 107 bytes with its CRLF); version 2 is binary (a 12-byte
signature, version and command, family, a 16-bit length, the addresses, then TLVs,
which are skipped here). ``parse`` is a pure function of the bytes received so far: it
says "more" (None), "a header of N bytes carrying these addresses", or raises
``ProxyHeaderError``; it never reads past the header, so what follows is the client's.

A ``LOCAL`` (v2) or ``UNKNOWN`` (v1) header, and a v2 ``PROXY`` of a family other than
TCP over IPv4 or IPv6, carries no usable address: the connection's own is used (the
specification's rule; load balancers' health probes send ``LOCAL``).

Bounds: a v1 line is 107 bytes at most (the specification's); a v2 header's length
field may say at most ``V2_MAX_LENGTH`` (4 KiB of addresses and TLVs): a longer one is
refused before its bytes are waited for.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from typing import Final, NamedTuple

#: the v2 signature, its first 12 bytes
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
#: the longest v1 header, CRLF included (the specification's limit)
V1_MAX: Final = 107
#: the most a v2 header's length field may announce (addresses and TLVs)
V2_MAX_LENGTH: Final = 4096

_V2_FIXED: Final = struct.Struct("!12sBBH")
_INET4: Final = struct.Struct("!4s4sHH")
_INET6: Final = struct.Struct("!16s16sHH")
_LOCAL, _PROXY = 0x20, 0x21
_TCP4, _TCP6 = 0x11, 0x21
#: The v2 families whose addresses are the client's: name, address block, address type.
_V2_TCP: Final = {
    _TCP4: ("TCP/IPv4", _INET4, ipaddress.IPv4Address),
    _TCP6: ("TCP/IPv6", _INET6, ipaddress.IPv6Address),
}
_UNSPEC_FAMILY: Final = 0x00


class ProxyHeaderError(ValueError):
    """The bytes are no valid PROXY header (the message says what is wrong)."""


class Addresses(NamedTuple):
    """Who connected to whom: the client's address and port, and the address and port
    it connected to."""

    src: str
    src_port: int
    dst: str
    dst_port: int


class Header(NamedTuple):
    """A parsed header: ``length`` bytes long, carrying ``addresses`` (None: ``LOCAL``,
    ``UNKNOWN`` or an unsupported family; the connection's own address applies)."""

    addresses: Addresses | None
    length: int
    version: int


def may_be_header(data: bytes) -> bool:
    """Whether ``data`` (at least one byte) begins a PROXY header of either version,
    as far as it goes."""
    n = min(len(data), 12)
    head = data[:n]
    return head == V2_SIGNATURE[:n] or head[:6] == V1_PREFIX[: min(n, 6)]


def parse(data: bytes) -> Header | None:
    """The header at the start of ``data``; None while it is incomplete (and valid so
    far). Raises ``ProxyHeaderError`` for bytes that are no header."""
    if not data:
        return None
    if data[0] == 0x0D:  # '\r': only the v2 signature starts so
        return _parse_v2(data)
    return _parse_v1(data)


def _parse_v1(data: bytes) -> Header | None:
    n = min(len(data), 6)
    if data[:n] != V1_PREFIX[:n]:
        raise ProxyHeaderError("no PROXY header (neither the v1 text nor the v2 signature)")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyHeaderError("v1 header without CRLF within 107 bytes")
        return None
    try:
        line = data[6:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("v1 header with non-ASCII bytes") from None
    parts = line.split(" ")
    if parts[0] == "UNKNOWN":
        return Header(None, end + 2, 1)
    if len(parts) != 5:
        raise ProxyHeaderError(f"v1 header with {len(parts)} fields, not 5: {line[:60]!r}")
    family, src, dst, sport, dport = parts
    if family == "TCP4":
        kind: type[ipaddress.IPv4Address | ipaddress.IPv6Address] = ipaddress.IPv4Address
    elif family == "TCP6":
        kind = ipaddress.IPv6Address
    else:
        raise ProxyHeaderError(f"v1 header with protocol {family[:10]!r}; TCP4, TCP6 or UNKNOWN")
    try:
        src_ip, dst_ip = kind(src), kind(dst)
    except ValueError:
        raise ProxyHeaderError(f"v1 header with a bad {family} address") from None
    if "%" in src or "%" in dst:  # a scope id is no address a peer could have
        raise ProxyHeaderError("v1 header with a scoped address")
    addresses = Addresses(str(src_ip), _port(sport), str(dst_ip), _port(dport))
    return Header(addresses, end + 2, 1)


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0"):
        raise ProxyHeaderError(f"v1 header with a bad port {text[:10]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"v1 header with port {port} out of range")
    return port


def _parse_v2(data: bytes) -> Header | None:
    n = min(len(data), 12)
    if data[:n] != V2_SIGNATURE[:n]:
        raise ProxyHeaderError("no PROXY header (a bad v2 signature)")
    if len(data) < 16:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyHeaderError(f"v2 header with version {data[12] >> 4}")
        return None
    _, ver_cmd, family, length = _V2_FIXED.unpack_from(data)
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"v2 header with version {ver_cmd >> 4}")
    if ver_cmd not in (_LOCAL, _PROXY):
        raise ProxyHeaderError(f"v2 header with command {ver_cmd & 0x0F}; 0 (LOCAL) or 1 (PROXY)")
    if length > V2_MAX_LENGTH:
        raise ProxyHeaderError(f"v2 header of {length} bytes; at most {V2_MAX_LENGTH}")
    total = 16 + length
    if len(data) < total:
        return None
    if ver_cmd == _LOCAL:
        return Header(None, total, 2)
    tcp = _V2_TCP.get(family)
    if tcp is not None:
        name, layout, address = tcp
        if length < layout.size:
            raise ProxyHeaderError(
                f"v2 {name} header with {length} address bytes, not {layout.size}"
            )
        s, d, sp, dp = layout.unpack_from(data, 16)
        return Header(Addresses(str(address(s)), sp, str(address(d)), dp), total, 2)
    if family >> 4 > 3 or family & 0x0F > 2:
        raise ProxyHeaderError(f"v2 header with an unknown family byte {family:#04x}")
    return Header(None, total, 2)  # UNSPEC, UNIX, UDP: the connection's own address


# -- building (what a pool with ``send_proxy_protocol`` sends) --------------------------


def _pair(a: Addresses) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None:
    """Both addresses of one family (an IPv4 one mapped into IPv6 beside an IPv6 one);
    None when either is no IP address."""
    try:
        src, dst = ipaddress.ip_address(a.src), ipaddress.ip_address(a.dst)
    except ValueError:
        return None
    if src.version != dst.version:
        src = src if src.version == 6 else ipaddress.IPv6Address(f"::ffff:{src}")
        dst = dst if dst.version == 6 else ipaddress.IPv6Address(f"::ffff:{dst}")
    return src, dst


@functools.lru_cache(maxsize=4096)
def v1(addresses: Addresses | None) -> bytes:
    """A v1 header for ``addresses``; ``PROXY UNKNOWN`` for None (a health probe)."""
    pair = _pair(addresses) if addresses is not None else None
    if addresses is None or pair is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    line = f"PROXY {family} {src} {dst} {addresses.src_port} {addresses.dst_port}\r\n"
    return line.encode("ascii")


@functools.lru_cache(maxsize=4096)
def v2(addresses: Addresses | None) -> bytes:
    """A v2 header for ``addresses``; a ``LOCAL`` one for None (a health probe)."""
    pair = _pair(addresses) if addresses is not None else None
    if addresses is None or pair is None:
        return _V2_FIXED.pack(V2_SIGNATURE, _LOCAL, _UNSPEC_FAMILY, 0)
    src, dst = pair
    ports = addresses.src_port, addresses.dst_port
    if src.version == 4:
        body = _INET4.pack(src.packed, dst.packed, *ports)
        return _V2_FIXED.pack(V2_SIGNATURE, _PROXY, _TCP4, len(body)) + body
    body = _INET6.pack(src.packed, dst.packed, *ports)
    return _V2_FIXED.pack(V2_SIGNATURE, _PROXY, _TCP6, len(body)) + body


#: by ``send_proxy_protocol`` value; cached: a keep-alive client's requests ask for the
#: same header again (``proxy.upstream.acquire`` keys idle connections by it)
BUILDERS: Final = {"v1": v1, "v2": v2}
