"""Header rules, fed bytes directly (no sockets)."""

from __future__ import annotations

import pytest

from proxy.http import headers
from proxy.http.headers import (
    REQUEST_HEAD,
    REQUEST_HEAD_TLS,
    RequestHeaders,
    ResponseHead,
    head_template,
    known_response_head,
    request_head,
    request_ids,
    response_head,
)

OK_HEAD = b"HTTP/1.1 200 OK\r\nServer: up\r\nContent-Length: 2\r\n"


def test_plain_response_head_passes_unchanged():
    found = ResponseHead(OK_HEAD + b"\r\n")
    assert found.head == OK_HEAD
    assert found.has_length and not found.chunked and not found.close


@pytest.mark.parametrize(("value", "close"), [(b"keep-alive", False), (b"Close", True)])
def test_plain_connection_line_is_cut(value: bytes, close: bool):
    raw = b"HTTP/1.1 200 OK\r\nConnection: " + value + b"\r\nContent-Length: 2\r\n\r\n"
    found = ResponseHead(raw)
    assert found.head == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
    assert found.close is close


def test_hop_by_hop_and_listed_headers_are_removed():
    raw = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Internal\r\nX-Internal: s\r\n"
        b"Keep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\nX-Public: yes\r\n\r\n"
    )
    found = ResponseHead(raw)
    assert found.head == b"HTTP/1.1 200 OK\r\nX-Public: yes\r\n"
    assert found.chunked and not found.has_length


def test_obs_fold_is_unfolded_and_version_is_ours():
    raw = b"HTTP/1.0 200 OK\r\nX-Long: a\r\n b\r\nContent-Length: 0\r\n\r\n"
    found = ResponseHead(raw)
    assert found.head == b"HTTP/1.1 200 OK\r\nX-Long: a b\r\nContent-Length: 0\r\n"


HEADS = [
    OK_HEAD + b"\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: x\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.0 304 Not Modified\r\nX-Long: a\r\n b\r\n\r\n",
]


@pytest.mark.parametrize("raw", HEADS)
def test_cached_response_head_is_the_same_rewrite(raw: bytes):
    fresh = ResponseHead(raw)
    for _ in range(2):  # the first call parses and keeps it, the second finds it
        found = response_head(bytes(raw))  # an equal head in a new buffer, as from a read
        assert (found.head, found.has_length, found.chunked, found.close) == (
            fresh.head, fresh.has_length, fresh.chunked, fresh.close,
        )  # fmt: skip
    assert response_head(raw) is response_head(bytes(raw))


@pytest.mark.parametrize(
    ("raw", "framing"),
    [
        (OK_HEAD + b"\r\n", (200, 2, False)),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length:  17 \r\n\r\n", (404, 17, False)),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", (200, 0, True)),
        # no fast framing: no length, a status without a body, HTTP/1.0, general filter
        (b"HTTP/1.1 200 OK\r\nServer: up\r\n\r\n", (0, -1, False)),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", (0, -1, False)),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", (0, -1, False)),
        (b"HTTP/1.1 101 Switching\r\nContent-Length: 0\r\n\r\n", (0, -1, False)),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", (0, -1, False)),
        (b"HTTP/1.1 200 OK\r\nConnection: x\r\nX: 1\r\nContent-Length: 2\r\n\r\n", (0, -1, False)),
    ],
)
def test_common_heads_carry_their_framing(raw: bytes, framing: tuple[int, int, bool]):
    found = ResponseHead(raw)
    assert (found.status, found.length, found.close) == framing


def test_only_heads_seen_before_are_known():
    raw = b"HTTP/1.1 200 OK\r\nX-Seen: %d\r\nContent-Length: 2\r\n\r\n" % id(object())
    assert known_response_head(raw) is None
    found = response_head(raw)
    assert known_response_head(bytes(raw)) is found


def test_response_head_cache_is_bounded():
    for i in range(3 * headers._HEADS_MAX):
        response_head(b"HTTP/1.1 200 OK\r\nETag: %d\r\nContent-Length: 0\r\n\r\n" % i)
        assert len(headers._HEADS) <= headers._HEADS_MAX
    long = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    assert response_head(long).head == long[:-2]
    assert long not in headers._HEADS  # long heads are rewritten every time, not kept


def test_request_headers_one_pass():
    found = RequestHeaders(
        [
            (b"Host", b"shop.test"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"X-Secret", b"s"),
            (b"TE", b"gzip"),
            (b"X-Forwarded-For", b"203.0.113.9"),
            (b"X-Request-ID", b"abc"),
            (b"Expect", b"100-continue"),
            (b"Content-Length", b"5"),
            (b"Accept", b"*/*"),
        ]
    )
    assert found.host == b"shop.test" and found.request_id == b"abc"
    assert found.expect_continue and found.content_length == b"5" and not found.chunked
    head = request_head(b"POST", b"/x", found, b"127.0.0.1", found.host, b"rid", REQUEST_HEAD, b"")
    assert head == (
        b"POST /x HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 5\r\nAccept: */*\r\n"
        b"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
        b"X-Request-ID: rid\r\nVia: 1.1 aiolb\r\nX-Forwarded-Host: shop.test\r\n\r\n"
    )


def test_a_head_without_host_has_no_x_forwarded_host():
    found = RequestHeaders([(b"Accept", b"*/*")])  # HTTP/1.0: the attempt adds Host
    found.parts += (b"Host", b": ", b"10.0.0.2:80", b"\r\n")
    head = request_head(b"GET", b"/", found, b"ip", None, b"rid", REQUEST_HEAD, b"")
    assert head == (
        b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: 10.0.0.2:80\r\nX-Forwarded-For: ip\r\n"
        b"X-Forwarded-Proto: http\r\nX-Request-ID: rid\r\nVia: 1.1 aiolb\r\n\r\n"
    )


def test_a_traced_listeners_heads_name_the_trace_and_the_tracers_parent():
    trace, parent = b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7"
    found = RequestHeaders([(b"Host", b"a")])
    for tls, host in ((False, b"a"), (True, None)):
        template = headers.forwarded_template(head_template(tls, parent), "192.0.2.7")
        head = request_head(b"GET", b"/", found, b"ip", host, b"rid", template, trace)
        assert head.endswith(b"\r\ntraceparent: 00-%s-%s-00\r\n\r\n" % (trace, parent))
        assert head.count(b"traceparent") == 1 and b"Forwarded: for=192.0.2.7" in head
        assert (b"X-Forwarded-Host: a\r\n" in head) is (host is not None)
    assert head_template(False, None) == REQUEST_HEAD
    assert head_template(True, None) == REQUEST_HEAD_TLS


def test_tls_clients_get_x_forwarded_proto_https():
    found = RequestHeaders([(b"Host", b"a")])
    head = request_head(b"GET", b"/", found, b"10.0.0.1", None, b"rid", REQUEST_HEAD_TLS, b"")
    assert b"\r\nX-Forwarded-Proto: https\r\n" in head
    assert head.count(b"X-Forwarded-Proto") == 1


@pytest.mark.parametrize(
    ("headers", "upgrade"),
    [
        ([(b"Connection", b"Upgrade"), (b"Upgrade", b"WebSocket")], [b"websocket"]),
        ([(b"Connection", b"keep-alive, upgrade"), (b"Upgrade", b"foo/2, websocket")],
         [b"foo/2", b"websocket"]),
        ([(b"Upgrade", b"websocket")], None),  # Connection does not list it: hop-by-hop, dropped
        ([(b"Connection", b"upgrade")], None),  # nothing to upgrade to
        ([(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")], None),  # never
        ([(b"Connection", b"upgrade"), (b"Upgrade", b"h2c, websocket")], [b"websocket"]),
        ([(b"Connection", b"upgrade"), (b"Upgrade", b"websocket"), (b"Content-Length", b"3")],
         None),  # a body: forwarded as a plain request
    ],
)  # fmt: skip
def test_upgrade_requests_are_noted_and_their_headers_never_forwarded_as_they_are(
    headers: list[tuple[bytes, bytes]], upgrade: list[bytes] | None
) -> None:
    found = RequestHeaders([(b"Host", b"a"), *headers])
    assert found.upgrade == upgrade
    head = request_head(b"GET", b"/", found, b"10.0.0.1", None, b"rid", REQUEST_HEAD, b"")
    assert b"upgrade" not in head.lower().replace(b"x-forwarded", b"")


def test_duplicate_host_is_refused():
    with pytest.raises(ValueError):
        RequestHeaders([(b"Host", b"a"), (b"host", b"b")])


def test_request_ids_are_unique():
    ids = request_ids()
    assert len({next(ids) for _ in range(1000)}) == 1000


def test_the_parser_keeps_only_http11_alive_without_a_connection_header():
    """``ClientConnection.on_headers_complete`` takes a request the parser keeps alive and
    that has no ``Connection`` header as HTTP/1.1 without asking for the version: true of
    every version the parser accepts (0.9, 1.0, 1.1, 2.0; the others it refuses)."""
    import httptools

    class Heads:
        def on_headers_complete(self) -> None:
            pass

    accepted, kept = set(), set()
    for major in range(10):
        for minor in range(10):
            parser = httptools.HttpRequestParser(Heads())
            try:
                parser.feed_data(b"GET / HTTP/%d.%d\r\nHost: a\r\n\r\n" % (major, minor))
            except httptools.HttpParserError:
                continue
            accepted.add(parser.get_http_version())
            if parser.should_keep_alive():
                kept.add(parser.get_http_version())
    assert kept == {"1.1"}
    assert accepted == {"0.9", "1.0", "1.1", "2.0"}


# -- issue #23: framing headers a Connection header may not remove, Host syntax ----------


@pytest.mark.parametrize(
    "connection",
    [b"Content-Length", b"close, Content-Length", b"Transfer-Encoding", b"Host",
     b"keep-alive , content-length", b"HOST"],
)  # fmt: skip
def test_a_connection_header_naming_a_framing_header_is_refused(connection: bytes):
    found = [(b"Host", b"x"), (b"Content-Length", b"33"), (b"Connection", connection)]
    with pytest.raises(ValueError, match="Connection header names"):
        RequestHeaders(found)


def test_a_connection_header_may_still_name_other_headers():
    found = RequestHeaders(
        [(b"Host", b"x"), (b"Connection", b"X-Secret, close"), (b"X-Secret", b"s")]
    )
    assert b"X-Secret" not in b"".join(found.parts)
    assert found.close


@pytest.mark.parametrize("connection", [b"Content-Length", b"keep-alive, content-length, X-A"])
def test_a_response_keeps_the_framing_its_connection_header_names(connection: bytes):
    raw = (
        b"HTTP/1.1 200 OK\r\nConnection: " + connection
        + b"\r\nX-A: 1\r\nContent-Length: 2\r\n\r\n"
    )  # fmt: skip
    found = ResponseHead(raw)
    assert b"Content-Length: 2\r\n" in found.head and found.has_length
    assert (b"X-A" in found.head) is (b"X-A" not in connection)


@pytest.mark.parametrize(
    "host",
    [b"example.com", b"example.com:8080", b"127.0.0.1:80", b"[::1]:443", b"[::1]",
     b"xn--bcher-kva.example", b"a_b.internal", b"host:"],
)  # fmt: skip
def test_valid_host_values_pass(host: bytes):
    assert headers.valid_host(host)
    assert RequestHeaders([(b"Host", host)]).host == host


@pytest.mark.parametrize(
    "host",
    [b"a b", b"a/b@c", b"user@host", b"a/b", b"x\x01", b"[::1", b"host:80:80", b"h\\x", b"",
     b"example.com:8o"],
)  # fmt: skip
def test_invalid_host_values_are_refused(host: bytes):
    assert not headers.valid_host(host)
    with pytest.raises(ValueError, match="invalid Host"):
        RequestHeaders([(b"Host", host)])


@pytest.mark.parametrize(
    ("client_ip", "template", "element"),
    [
        ("192.0.2.7", headers.REQUEST_HEAD, b"for=192.0.2.7;proto=http"),
        ("::1", headers.REQUEST_HEAD_TLS, b'for="[::1]";proto=https'),  # RFC 7239 6
        ("fe80::1%eth0", headers.REQUEST_HEAD, b'for="[fe80::1%eth0]";proto=http'),
        ("", headers.REQUEST_HEAD, b"for=unknown;proto=http"),
    ],
)
def test_forwarded_element_in_the_connections_head_template(
    client_ip: str, template: bytes, element: bytes
):
    found = RequestHeaders([(b"Host", b"a"), (b"Forwarded", b"for=evil")])
    assert found.parts == [b"Host", b": ", b"a", b"\r\n"]  # the client's: dropped
    head = headers.request_head(b"GET", b"/", found, b"ip", b"a", b"id",
                                headers.forwarded_template(template, client_ip), b"")  # fmt: skip
    assert b"\r\nVia: 1.1 aiolb\r\nForwarded: " + element + b"\r\n" in head
    kept = RequestHeaders([(b"Forwarded", b"for=lb")], forwarded=True)
    assert kept.parts == [b"Forwarded", b": ", b"for=lb", b"\r\n"]


@pytest.mark.parametrize(
    ("fields", "trailers"),
    [
        ([(b"TE", b"trailers"), (b"Connection", b"TE")], True),  # as RFC 9110 10.1.4 has it
        ([(b"te", b"trailers")], True),  # not listed in Connection: honoured all the same
        ([(b"TE", b"deflate;q=0.5, Trailers")], True),
        ([(b"TE", b"trailers"), (b"TE", b"trailers"), (b"Connection", b"close, te")], True),
        ([(b"TE", b"gzip")], False),
        ([(b"TE", b"trailersx"), (b"Connection", b"TE")], False),
    ],
)
def test_te_trailers_is_noted_and_sent_on_as_the_proxys_own(
    fields: list[tuple[bytes, bytes]], trailers: bool
):
    found = RequestHeaders([(b"Host", b"a"), *fields])
    assert found.trailers is trailers
    head = request_head(b"GET", b"/", found, b"ip", None, b"id", REQUEST_HEAD, b"")
    lines = head.lower().split(b"\r\n")
    # once, whatever the client sent; the client's other codings never
    assert lines.count(b"te: trailers") == (1 if trailers else 0)
    assert lines.count(b"connection: te") == (1 if trailers else 0)
    assert not [line for line in lines if line.startswith(b"te:") and line != b"te: trailers"]


def test_relayed_trailers_keep_only_valid_end_to_end_fields():
    fields = [
        (b"Grpc-Status", b"0"), (b"x-checksum", b" abc\t"), (b"Content-Length", b"5"),
        (b"transfer-encoding", b"chunked"), (b"Host", b"evil"), (b"set-cookie", b"a=b"),
        (b"trailer", b"x"), (b"connection", b"close"), (b":status", b"200"),
        (b"x bad", b"1"), (b"x-crlf", b"a\r\nInjected: 1"), (b"x-nul", b"a\x00"),
        (b"x-del", b"a\x7f"), (b"x-obs", b"caf\xc3\xa9"), (b"", b"empty name"),
    ]  # fmt: skip
    assert headers.relayed_trailers(fields) == [
        (b"grpc-status", b"0"), (b"x-checksum", b"abc"), (b"x-obs", b"caf\xc3\xa9"),
    ]  # fmt: skip
