"""``compress`` without sockets: Accept-Encoding negotiation, which responses are
compressed and how their heads change, and each coder's output decoded."""

from __future__ import annotations

import gzip
from typing import Any

import brotli
import pytest
import zstandard

from proxy.config.filters import CompressOptions
from proxy.filters.compress import MAX_ITEMS, Coder, Compress, accepted, negotiate
from proxy.http.headers import ResponseHead

OFFERED = (b"zstd", b"br", b"gzip")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (b"", None),
        (b"gzip", b"gzip"),
        (b"gzip, br", b"br"),  # equal q: the server's order
        (b"gzip, deflate, br, zstd", b"zstd"),
        (b"br;q=0.9, gzip", b"gzip"),  # the client's q-values first
        (b"zstd;q=0.1, br;q=0.2, gzip;q=0.3", b"gzip"),
        (b"zstd;q=0, gzip;q=0", None),  # q=0 refuses
        (b"*", b"zstd"),
        (b"*;q=0", None),
        (b"*;q=0, gzip", b"gzip"),
        (b"*;q=0.5, br;q=0.6", b"br"),
        (b"zstd;q=0, *", b"br"),  # what is named keeps its own q
        (b"identity", None),
        (b"identity;q=0, gzip", b"gzip"),
        (b"gzip;q=0.5, identity", None),  # identity named, and preferred
        (b"gzip, identity;q=0.5", b"gzip"),
        (b"gzip;q=0.5, identity;q=0.5", b"gzip"),  # a tie goes to compressing
        (b"deflate, compress", None),
        (b"GZip ; Q=0.8", b"gzip"),
        (b"x-gzip", b"gzip"),
        (b"gzip;q=1.0001", None),  # more than three decimals: malformed, refused
        (b"gzip;q=1.5", None),
        (b"gzip;q=-0", None),
        (b"gzip;q=.5", None),
        (b"gzip;q=0.", None),
        (b"gzip;q=1.", b"gzip"),
        (b"gzip;q=0.001", b"gzip"),
        (b"gzip;level=5;q=0.5, br;q=0.4", b"gzip"),  # other parameters ignored
        (b",,, ;q=1, gzip", b"gzip"),
        (b"gzip;q=0, gzip;q=1", None),  # the first mention counts
    ],
)
def test_negotiate(header: bytes | None, expected: bytes | None) -> None:
    assert negotiate(header, OFFERED) == expected


def test_the_server_order_is_the_configured_one() -> None:
    assert negotiate(b"zstd, br, gzip", (b"gzip", b"br")) == b"gzip"
    assert negotiate(b"zstd", (b"gzip", b"br")) is None


def test_a_huge_header_reads_at_most_max_items() -> None:
    many = b", ".join(b"c%d" % i for i in range(100_000)) + b", gzip"
    q = accepted(many)
    assert len(q) == MAX_ITEMS
    assert negotiate(many, OFFERED) is None  # gzip came after the items read
    assert negotiate(b"gzip, " + many, OFFERED) == b"gzip"


# --- the response head ---------------------------------------------------------------------


class _Req:
    def __init__(self, encoding: bytes | None) -> None:
        self.encoding = encoding


def _filter(**options: Any) -> Compress:
    return Compress(CompressOptions.model_validate(options), None)  # type: ignore[arg-type]


def _head(*lines: bytes, status: bytes = b"200 OK") -> ResponseHead:
    return ResponseHead(
        b"HTTP/1.1 " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    )


def _encode(
    head: ResponseHead,
    encoding: bytes | None = b"gzip",
    status: int = 200,
    head_only: bool = False,
    **options: Any,
) -> tuple[bytes, bool] | None:
    out = _filter(**options).encode(_Req(encoding), status, head, head_only)  # type: ignore[arg-type]
    return None if out is None else (out[0].head, out[1] is not None)


def test_a_compressed_head() -> None:
    head = _head(
        b"Content-Type: text/html",
        b"Content-Length: 5000",
        b'ETag: "abc"',
        b"Accept-Ranges: bytes",
        b"Vary: Cookie",
        b"X-Other: 1",
    )
    out = _filter().encode(_Req(b"br"), 200, head, False)  # type: ignore[arg-type]
    assert out is not None
    found, coder = out
    assert coder is not None
    assert found.head == (
        b'HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nETag: W/"abc"\r\n'
        b"Vary: Cookie, Accept-Encoding\r\nX-Other: 1\r\n"
        b"Content-Encoding: br\r\n"
    )
    assert (found.has_length, found.length, found.chunked) == (False, -1, True)
    assert (head.has_length, head.length) == (True, 5000)  # the upstream's is untouched


@pytest.mark.parametrize(
    ("lines", "status", "why"),
    [
        ((b"Content-Type: text/html", b"Content-Encoding: gzip"), 200, "already encoded"),
        ((b"Content-Type: text/html", b"Content-Encoding: identity"), 200, "any encoding"),
        ((b"Content-Type: text/html",), 206, "a part"),
        ((b"Content-Type: text/html",), 204, "no content"),
        ((b"Content-Type: text/html",), 304, "not modified"),
        ((b"Content-Type: text/html", b"Cache-Control: public, No-Transform"), 200, "asked"),
        ((b"Content-Type: text/event-stream",), 200, "events"),
        ((b"Content-Type: application/grpc+proto",), 200, "gRPC"),
        ((b"Content-Type: image/png",), 200, "not a listed type"),
        ((), 200, "no type"),
        ((b"Content-Type: text/plain", b"Content-Length: 1023"), 200, "below min_size"),
    ],
)
def test_responses_left_alone(lines: tuple[bytes, ...], status: int, why: str) -> None:
    code = b"%d X" % status
    assert _encode(_head(*lines, status=code), status=status) is None, why


def test_eligible_but_not_compressed_gets_vary_only() -> None:
    head = _head(b"Content-Type: application/json", b"Content-Length: 2048", b'ETag: "e"')
    for encoding, head_only in ((b"identity", False), (None, False), (b"gzip", True)):
        out = _encode(head, encoding, head_only=head_only)
        assert out == (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b'Content-Length: 2048\r\nETag: "e"\r\nVary: Accept-Encoding\r\n',
            False,
        )


def test_a_304_to_a_request_that_chose_an_encoding_has_its_etag_weakened() -> None:
    head = _head(b'ETag: "v1"', b"Cache-Control: max-age=60", status=b"304 Not Modified")
    out = _encode(head, b"gzip", status=304)
    assert out == (
        b'HTTP/1.1 304 Not Modified\r\nETag: W/"v1"\r\nCache-Control: max-age=60\r\n',
        False,
    )
    assert _encode(head, b"identity", status=304) is None
    assert _encode(_head(b'ETag: W/"v1"', status=b"304 Not Modified"), status=304) is None


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        (b"Vary: Accept-Encoding", b"Vary: Accept-Encoding"),
        (b"Vary: accept-encoding, Cookie", b"Vary: accept-encoding, Cookie"),
        (b"Vary: *", b"Vary: *"),
        (b"Vary: Origin", b"Vary: Origin, Accept-Encoding"),
        (b"Vary:", b"Vary: Accept-Encoding"),
    ],
)
def test_vary_is_merged(vary: bytes, expected: bytes) -> None:
    out = _encode(_head(b"Content-Type: text/css", vary))
    assert out is not None and expected + b"\r\n" in out[0]
    assert out[0].lower().count(b"vary") == 1


def test_types_min_size_and_the_length_of_a_chunked_body() -> None:
    css = _head(b"Content-Type: Text/CSS; charset=utf-8")
    assert _encode(css) is not None  # case and parameters do not matter
    assert _encode(css, types=["application/*"]) is None
    assert _encode(_head(b"Content-Type: application/ld+json"), types=["application/*+json"])
    small = _head(b"Content-Type: text/plain", b"Content-Length: 10")
    assert _encode(small, min_size=10) is not None
    assert _encode(small, min_size=11) is None
    chunked = _head(b"Content-Type: text/plain", b"Transfer-Encoding: chunked")
    assert _encode(chunked, min_size="1MiB") is not None  # unknown length: compressed


# --- the coders ---------------------------------------------------------------------------


def _decode(encoding: bytes, data: bytes) -> bytes:
    if encoding == b"gzip":
        return gzip.decompress(data)
    if encoding == b"br":
        return bytes(brotli.decompress(data))
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


@pytest.mark.parametrize("encoding", [b"gzip", b"br", b"zstd"])
def test_each_coder_streams_and_flushes(encoding: bytes) -> None:
    pieces = [b"piece %d " % i * 50 for i in range(20)]
    coder = Coder(encoding, 1)
    out = b""
    for piece in pieces:
        out += coder.compress(piece) + coder.flush()
    out += coder.finish()
    assert _decode(encoding, out) == b"".join(pieces)


@pytest.mark.parametrize("encoding", [b"gzip", b"br", b"zstd"])
def test_a_flush_makes_everything_so_far_decodable(encoding: bytes) -> None:
    coder = Coder(encoding, 3)
    sent = coder.compress(b"hello, ") + coder.flush()
    if encoding == b"gzip":
        import zlib

        assert zlib.decompressobj(31).decompress(sent) == b"hello, "
    elif encoding == b"br":
        assert brotli.Decompressor().process(sent) == b"hello, "
    else:
        assert zstandard.ZstdDecompressor().decompressobj().decompress(sent) == b"hello, "
