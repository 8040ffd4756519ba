"""HTTP/2 request heads to HTTP/1.1 and back (``proxy.h2.headers``): the RFC 9113 8.2
and 8.3 rules, each malformed head refused as its stream's error (``Malformed``)."""

from __future__ import annotations

import pytest

from proxy.h2.headers import Malformed, request_from_h2, response_to_h2, split_response

PSEUDO = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.test"),
          (b":path", b"/p?q=1")]  # fmt: skip


def test_a_request_becomes_method_target_and_host_first() -> None:
    method, target, headers = request_from_h2(
        [*PSEUDO, (b"cookie", b"a=1"), (b"x-a", b"v"), (b"cookie", b"b=2"), (b"te", b"trailers")],
        False,
    )
    assert (method, target) == (b"GET", b"/p?q=1")
    assert headers == [(b"host", b"a.test"), (b"x-a", b"v"), (b"cookie", b"a=1; b=2")]


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
