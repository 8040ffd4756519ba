"""HTTP/2 request heads to HTTP/1.1 and back (``proxy.h2.headers``): the RFC 9113 8.2
and 8.3 rules, each malformed head refused as its stream's error (``Malformed``)."""

from __future__ import annotations

import pytest

from proxy.h2.headers import (
    Malformed,
    grpc_code,
    grpc_error,
    grpc_status_of,
    grpc_timeout,
    request_from_h2,
    request_to_h2,
    response_from_h2,
    response_to_h2,
    split_response,
    trailers_ok,
)

PSEUDO = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
          (b":path", b"/p?q=1")]  # fmt: skip


def test_a_request_becomes_method_target_and_host_first() -> None:
    method, target, headers = request_from_h2(
        [*PSEUDO, (b"cookie", b"a=1"), (b"x-a", b"v"), (b"cookie", b"b=2"), (b"te", b"trailers")],
        False,
    )
    assert (method, target) == (b"GET", b"/p?q=1")
    # te: trailers stays, for RequestHeaders to note (an HTTP/1.1 upstream is asked)
    assert headers == [
        (b"host", b"a.test"), (b"x-a", b"v"), (b"te", b"trailers"), (b"cookie", b"a=1; b=2")
    ]  # fmt: skip


def test_a_body_without_length_is_marked_chunked_for_the_upstream() -> None:
    _, _, headers = request_from_h2([*PSEUDO[:3], (b":path", b"/")], True)
    assert headers[-1] == (b"transfer-encoding", b"chunked")
    _, _, headers = request_from_h2([*PSEUDO, (b"content-length", b"3")], True)
    assert (b"transfer-encoding", b"chunked") not in headers


def test_host_alone_and_host_matching_authority_are_accepted() -> None:
    no_authority = [p for p in PSEUDO if p[0] != b":authority"]
    assert request_from_h2([*no_authority, (b"host", b"h.test")], False)[2][0] == (
        b"host", b"h.test"
    )  # fmt: skip
    assert request_from_h2([*PSEUDO, (b"host", b"A.TEST")], False)[2][0] == (b"host", b"a.test")


@pytest.mark.parametrize(
    "extra",
    [
        [(b"host", b"b.test")], [(b"host", b"a.test"), (b"host", b"a.test")],
        [(b"connection", b"close")], [(b"keep-alive", b"1")], [(b"proxy-connection", b"1")],
        [(b"transfer-encoding", b"chunked")], [(b"upgrade", b"h2c")], [(b"te", b"gzip")],
        [(b"X-A", b"v")], [(b"x a", b"v")], [(b"x:a", b"v")], [(b"", b"v")],
        [(b"x-a", b"v\r\nx-b: 1")], [(b"x-a", b"v\n")], [(b"x-a", b"\0")], [(b"x-a", b"v ")],
        [(b"x-a", b"\tv")], [(b"content-length", b"+1")], [(b"content-length", b"1, 1")],
        [(b"x-a", b"v"), (b":method", b"GET")], [(b":status", b"200")],
        [(b":protocol", b"websocket")], [(b":path", b"/two")], [(b":method", b"POST")],
    ],
)  # fmt: skip
def test_malformed_heads_are_refused_with_400(extra: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Malformed) as caught:
        request_from_h2([*PSEUDO, *extra], False)
    assert caught.value.status == 400


@pytest.mark.parametrize("missing", [b":method", b":scheme", b":path"])
def test_a_missing_pseudo_header_is_malformed(missing: bytes) -> None:
    with pytest.raises(Malformed):
        request_from_h2([p for p in PSEUDO if p[0] != missing], False)
    with pytest.raises(Malformed):
        request_from_h2([p for p in PSEUDO if p[0] != b":authority"], False)  # nor Host


def test_connect_is_refused_with_405() -> None:
    with pytest.raises(Malformed) as caught:
        request_from_h2([(b":method", b"CONNECT"), (b":authority", b"a.test:443")], False)
    assert caught.value.status == 405


def test_a_response_head_loses_its_connection_specific_headers() -> None:
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive\r\n"
            b"Transfer-Encoding: chunked\r\nKeep-Alive: 5\r\nX-A:  v \r\n")  # fmt: skip
    assert response_to_h2(head) == [(b":status", b"200"), (b"content-type", b"text/plain"),
                                    (b"x-a", b"v")]  # fmt: skip
    headers, body = split_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno")
    assert headers == [(b":status", b"404"), (b"content-length", b"2")] and body == b"no"


# -- the upstream direction, and gRPC -------------------------------------------------------


@pytest.mark.parametrize("value", [b"abc", b"99", b"2000", b"", b"20x"])
def test_an_upstream_status_that_is_not_three_digits_is_no_status(value: bytes) -> None:
    """h2 lets any ``:status`` through; the session refuses status 0 as a protocol
    error (before, ``int(b"abc")`` raised inside the upstream's read callback)."""
    status, _ = response_from_h2([(b":status", value), (b"x-a", b"1")])
    assert status == 0


def test_an_upstream_head_becomes_the_http11_head_the_exchange_reads() -> None:
    status, raw = response_from_h2(
        [(b":status", b"201"), (b"content-type", b"text/plain"), (b"content-length", b"5")]
    )
    assert status == 201
    assert raw == (b"HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\n")


def test_the_proxys_request_head_becomes_http2_headers() -> None:
    head = (
        b"POST /a?b=1 HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: keep-alive\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"
    )
    headers, framing = request_to_h2(head, b"https")
    assert headers[:4] == [
        (b":method", b"POST"), (b":scheme", b"https"), (b":authority", b"api.test"),
        (b":path", b"/a?b=1"),
    ]  # fmt: skip
    assert (b"x-forwarded-for", b"10.0.0.1") in headers
    assert (b"te", b"trailers") in headers
    names = [n for n, _ in headers]
    assert b"connection" not in names and b"transfer-encoding" not in names
    assert b"host" not in names
    assert framing.chunked and framing.length == -1


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1S", 1.0), (b"300m", 0.3), (b"2M", 120.0), (b"1H", 3600.0), (b"5000u", 0.005),
     (b"123456789S", None), (b"1x", None), (b"S", None), (b"-1S", None)],
)  # fmt: skip
def test_grpc_timeout_is_read_as_the_spec_writes_it(value: bytes, seconds: float | None) -> None:
    found = grpc_timeout([(b"grpc-timeout", value)])
    assert found == seconds if seconds is None else found == pytest.approx(seconds)


def test_the_proxys_answers_are_never_unknown_to_grpc() -> None:
    assert grpc_code(502, "connect") == 14
    assert grpc_code(503) == 14
    assert grpc_code(503, "limit") == 8
    assert grpc_code(504) == 4
    assert grpc_code(429) == 8
    assert grpc_code(404) == 12
    for status in (400, 401, 403, 404, 405, 408, 413, 414, 429, 431, 500, 502, 503, 504):
        assert grpc_code(status) != 2, status


def test_a_grpc_error_is_trailers_only_and_its_message_percent_encoded() -> None:
    headers = dict(grpc_error(14, "no upstream: 100% down\n"))
    assert headers[b":status"] == b"200"
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == b"14"
    assert headers[b"grpc-message"] == b"no upstream: 100%25 down%0A"
    assert grpc_status_of(list(headers.items())) == 14
    assert grpc_status_of([(b"grpc-status", b"x")]) == 2
    assert grpc_status_of([]) == -1


@pytest.mark.parametrize(
    "headers",
    [
        [(b":status", b"200"), (b"x-a", b"1\r\nSet-Cookie: evil=1")],  # response splitting
        [(b":status", b"200"), (b"x-a", b"\x00")],
        [(b":status", b"200"), (b"X-Upper", b"1")],
        [(b":status", b"200"), (b"bad name", b"1")],
        [(b":status", b"200"), (b"connection", b"close")],
        [(b":status", b"200"), (b"transfer-encoding", b"chunked")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b":status", b"200"), (b":status", b"204")],
        [(b"x-a", b"1"), (b":status", b"200")],
        [(b"x-a", b"1")],
    ],
)  # fmt: skip
def test_a_malformed_upstream_head_is_no_response(headers: list[tuple[bytes, bytes]]) -> None:
    """The upstream codec leaves these checks to the translation (one pass instead of
    h2's chain of generators): each is refused as a whole, never half relayed."""
    assert response_from_h2(headers) == (0, b"")


def test_upstream_trailers_are_checked_before_they_are_relayed() -> None:
    assert trailers_ok([(b"grpc-status", b"0"), (b"grpc-message", b"ok")])
    assert not trailers_ok([(b":status", b"200")])
    assert not trailers_ok([(b"grpc-message", b"a\r\nb")])
    assert not trailers_ok([(b"Grpc-Status", b"0")])
