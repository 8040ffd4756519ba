"""Differential framing suite (issue #23): what a client's bytes and an upstream's bytes
become on the other side of the proxy, over raw sockets.

The upstream is ``FramingUpstream`` (tests/framing_support.py): it records every byte
each connection received, reads them as a sequence of requests and answers each head
before reading its body, with a 200 whose body is the request path. So a smuggled
request shows twice: in what the upstream parsed, and as an extra response on the
client's connection.

Every request case ends with ``END`` (a request with ``Connection: close``) on the same
connection: a proxy that keeps the connection answers it, one that closes after the
case does not, and the client always reads to EOF. A case lists its acceptable
outcomes: the statuses the client got, with the paths the upstream saw.

``# nginx 1.22: ...`` beside a case is what nginx 1.22.1 answered in front of the same
upstream (``proxy_http_version 1.1``, upstream keepalive), checked by hand; CI does not
run nginx.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from proxy.runtime.server import ProxyServer
from tests.framing_support import (
    CLOSE,
    RESET,
    FramingUpstream,
    RawClient,
    Response,
    exchange_to_close,
    split_responses,
    tracebacks,
)
from tests.support import make_config, wait_for

MakeProxy = Callable[[Any], Awaitable[ProxyServer]]

END = b"GET /end HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
#: A request must be answered (or refused) well within this; every timeout is shorter.
LIMIT = 5.0

Outcome = tuple[tuple[int, ...], tuple[bytes, ...]]  # client statuses, upstream paths
REFUSED: Outcome = ((400,), ())


@dataclass(frozen=True)
class Case:
    data: bytes
    outcomes: tuple[Outcome, ...]
    #: bytes the upstream must never receive, on any connection
    absent: tuple[bytes, ...] = ()


def refused(data: bytes, *absent: bytes) -> Case:
    return Case(data, (REFUSED,), absent)


def cl_smuggle(connection: bytes) -> Case:
    """Finding 1: a Connection header naming a framing header, a request in the body."""
    poison = b"GET /poison HTTP/1.1\r\nHost: x\r\n\r\n"
    return refused(
        b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n%s"
        % (len(poison), connection, poison),
        b"/poison",
    )


SECRET = b"GET /admin/secret HTTP/1.1\r\nHost: x\r\n\r\n"


def upgrade_with_body(upgrade: bytes, body: bytes, framing: bytes, after: bytes = b"") -> Case:
    """Finding 2: an Upgrade request with a body that holds a request. Refused, or the
    body forwarded as the body; never parsed as a request."""
    tail = (b"/after",) if after else ()
    return Case(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: %s\r\n%s\r\n%s%s"
        % (upgrade, framing, body, after),
        (REFUSED, ((200,) * (2 + len(tail)), (b"/ws", *tail, b"/end"))),
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


PADDED = SECRET + b"x" * 3  # a request, padded

REQUEST_CASES: dict[str, Case] = {
    # -- finding 1: Connection naming a framing header: 400, nothing forwarded ----------
    # nginx 1.22: 200, 200 (/p with the 33 bytes forwarded as its body, then /end)
    "1-connection-content-length": cl_smuggle(b"Content-Length"),
    # nginx 1.22: 200, then close (body forwarded as the body)
    "1-connection-close-content-length": cl_smuggle(b"close, Content-Length"),
    # nginx 1.22: 200, 200 (body forwarded as the body)
    "1-connection-transfer-encoding": cl_smuggle(b"Transfer-Encoding"),
    # nginx 1.22: 200, 200
    "1-connection-host": refused(b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: Host\r\n\r\n"),
    # nginx 1.22: 200, 200 (body forwarded as the body)
    "1-connection-keep-alive-content-length-spaced": cl_smuggle(b"keep-alive , content-length"),
    # nginx 1.22: 200, 200 (body forwarded as the body)
    "1-connection-mixed-case": cl_smuggle(b"CoNtEnT-LeNgTh"),
    # -- finding 2: Upgrade request with a body holding a request -----------------------
    # nginx 1.22: 200, 200 (the body forwarded as the body)
    "2-upgrade-websocket-content-length": upgrade_with_body(
        b"websocket", PADDED, b"Content-Length: %d\r\n" % len(PADDED)
    ),
    # nginx 1.22: 200, 200
    "2-upgrade-foo-content-length": upgrade_with_body(
        b"foo", PADDED, b"Content-Length: %d\r\n" % len(PADDED)
    ),
    # nginx 1.22: 200, 200
    "2-upgrade-websocket-chunked": upgrade_with_body(
        b"websocket", chunk(PADDED), b"Transfer-Encoding: chunked\r\n"
    ),
    # nginx 1.22: 200, 200, 200
    "2-upgrade-foo-content-length-pipelined": upgrade_with_body(
        b"foo", PADDED, b"Content-Length: %d\r\n" % len(PADDED),
        after=b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n",
    ),
    # -- finding 12: invalid Host values: 400 --------------------------------------------
    # nginx 1.22: 400 (each)
    "12-host-with-space": refused(b"GET /h HTTP/1.1\r\nHost: a b\r\n\r\n"),
    "12-host-with-slash-and-at": refused(b"GET /h HTTP/1.1\r\nHost: a/b@c\r\n\r\n"),
    "12-host-with-control-char": refused(b"GET /h HTTP/1.1\r\nHost: x\x01\r\n\r\n"),
    # -- finding 13: a chunked HTTP/1.0 request: answered or refused, then closed -------
    # nginx 1.22: 400
    "13-http10-chunked": Case(
        b"POST /te10 HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"hello"),
        (REFUSED, ((200,), (b"/te10",))),
    ),
    # nginx 1.22: 400
    "13-http10-keep-alive-chunked": Case(
        b"POST /te10 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunk(b"hello"),
        (REFUSED, ((200,), (b"/te10",))),
    ),
    # -- finding 14: header names with underscores are not forwarded -----------------
    # nginx 1.22: 200, 200, the header dropped (underscores_in_headers off)
    "14-underscore-header-dropped": Case(
        b"GET /u HTTP/1.1\r\nHost: x\r\nX_Forwarded_Proto: https\r\n\r\n",
        (((200, 200), (b"/u", b"/end")),),
        absent=(b"X_Forwarded_Proto", b"x_forwarded_proto"),
    ),
    # -- classics that already work and must stay so -----------------------------------
    # nginx 1.22: 400
    "classic-cl-and-te": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    # nginx 1.22: 400
    "classic-differing-content-lengths": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    ),
    # nginx 1.22: 501
    "classic-te-chunked-identity": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
    ),
    # nginx 1.22: 501
    "classic-te-xchunked": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"
    ),
    # nginx 1.22: 400
    "classic-te-obs-fold": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"
    ),
    # nginx 1.22: 400
    "classic-space-before-colon": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length : 5\r\n\r\nhello"
    ),
    # nginx 1.22: 200, 200 (it accepts bare LF)
    "classic-bare-lf": refused(b"GET /c HTTP/1.1\nHost: x\n\n"),
    # nginx 1.22: 400
    "classic-chunk-size-0x": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0x5\r\nhello\r\n0\r\n\r\n"
    ),
    # nginx 1.22: 400
    "classic-chunk-size-overflow": refused(
        b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"ffffffffffffffffff5\r\nhello\r\n0\r\n\r\n"
    ),
    # nginx 1.22: 400
    "classic-nul-in-header": refused(b"GET /c HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    # nginx 1.22: 200, 200. RFC 9112 3: a recipient MAY parse the request-line on
    # whitespace; the proxy writes its own request-line upstream, so either is safe
    "classic-two-spaces-in-request-line": Case(
        b"GET  /c HTTP/1.1\r\nHost: x\r\n\r\n", (REFUSED, ((200, 200), (b"/c", b"/end")))
    ),
    # nginx 1.22: 200, 200 (to its one upstream); aiolb is never an open proxy
    "classic-absolute-form-unknown-host": refused(
        b"GET http://unknown.example/x HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    # nginx 1.22: 400
    "classic-connect": Case(b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", (((405,), ()),)),
    # nginx 1.22: 200, 200, 200
    "classic-pipelined-gets-in-order": Case(
        b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        (((200, 200, 200), (b"/a", b"/b", b"/end")),),
    ),
}  # fmt: skip


# -- fixtures and helpers --------------------------------------------------------------------


@pytest.fixture
async def upstream() -> AsyncIterator[FramingUpstream]:
    raw = await FramingUpstream().start()
    yield raw
    await raw.stop()


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The proxy's log at every level; each test ends by asserting it holds no traceback."""
    caplog.set_level(logging.DEBUG, logger="aiolb")
    return caplog


async def start(proxy: MakeProxy, upstream: FramingUpstream, **limits: Any) -> int:
    """The proxy in front of ``upstream``, short timeouts, Upgrade ``websocket`` and
    ``foo`` allowed; its port."""
    config = make_config(
        [upstream.url],
        listener={
            "timeouts": {"header": "1s", "body": "1s", "idle": "5s"},
            **({"limits": limits} if limits else {}),
        },
        pool={"timeouts": {"response_header": "10s", "read": "10s"}},
        routes=[{"match": {"path_prefix": "/"}, "pool": "main", "upgrades": ["websocket", "foo"]}],
    )
    server = await proxy(config)
    return server.listeners[0].port


def responses_of(data: bytes) -> list[Response]:
    """The responses a client read; nothing may be left that is no response."""
    responses, rest = split_responses(data)
    assert rest == b"", f"bytes that are no response: {rest[:200]!r} (after {data[:300]!r})"
    return responses


def statuses(responses: list[Response]) -> tuple[int, ...]:
    return tuple(r.status for r in responses)


def assert_no_traceback(log: pytest.LogCaptureFixture) -> None:
    assert not tracebacks(log.records), tracebacks(log.records)


# -- request side ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", REQUEST_CASES.values(), ids=REQUEST_CASES.keys())
async def test_request_framing(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture, case: Case
) -> None:
    port = await start(proxy, upstream)

    try:
        got = responses_of(await exchange_to_close(port, case.data + END, LIMIT))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the upstream saw {upstream.paths}") from None

    outcome = (statuses(got), tuple(upstream.paths))
    assert outcome in case.outcomes, f"got {outcome}, want one of {case.outcomes}"
    upstream_answered = [r.body for r in got if r.status == 200]
    assert upstream_answered == list(upstream.paths), "each response is its own request's"
    assert not upstream.garbage, upstream.garbage
    for piece in case.absent:
        assert piece not in upstream.raw, f"the upstream received {piece!r}: {upstream.raw!r}"
    assert_no_traceback(log)


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_finding_12_empty_host_is_refused(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture, version: bytes
) -> None:
    """``Host:`` with no value names no authority for an origin-form target: nothing to
    route or forward on (RFC 9112 3.2 allows it only for targets without one)."""
    port = await start(proxy, upstream)
    # nginx 1.22: 400 for HTTP/1.1 (and for HTTP/1.0)
    data = await exchange_to_close(port, b"GET /h %s\r\nHost:\r\n\r\n" % version + END, LIMIT)

    assert statuses(responses_of(data)) == (400,)
    assert upstream.paths == []
    assert_no_traceback(log)


async def test_finding_10_non_utf8_upgrade_token_gets_a_clean_4xx(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture
) -> None:
    port = await start(proxy, upstream)
    request = b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: \xff\xfe\r\n\r\n"
    after = b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n"

    # nginx 1.22: 200, 200, 200 (forwarded as an ordinary request)
    got = responses_of(await exchange_to_close(port, request + after + END, LIMIT))

    assert statuses(got) in [(400,), (403,), (403, 200, 200)], statuses(got)
    assert b"/u" not in upstream.paths
    assert_no_traceback(log)


def headers(count: int) -> bytes:
    return b"".join(b"X-H%d: v\r\n" % i for i in range(count))


async def test_finding_17_ten_thousand_headers_get_431(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture
) -> None:
    port = await start(proxy, upstream, max_header_size="1MiB")
    # nginx 1.22: 400 "Request Header Or Cookie Too Large" (no count limit of its own)
    many = b"GET /many HTTP/1.1\r\nHost: x\r\n" + headers(10_000) + b"\r\n"

    data = await exchange_to_close(port, many + END, LIMIT)

    assert statuses(responses_of(data)) == (431,)
    assert upstream.paths == []
    assert_no_traceback(log)


async def test_finding_17_a_hundred_headers_pass(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture
) -> None:
    port = await start(proxy, upstream)
    # nginx 1.22: 200, 200
    hundred = b"GET /ok HTTP/1.1\r\nHost: x\r\n" + headers(99) + b"\r\n"  # with Host: 100

    data = await exchange_to_close(port, hundred + END, LIMIT)

    assert statuses(responses_of(data)) == (200, 200)
    assert upstream.paths == [b"/ok", b"/end"]
    assert_no_traceback(log)


async def test_finding_17_max_headers_is_a_limit_of_its_own(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture
) -> None:
    port = await start(proxy, upstream, max_headers=200)
    # nginx 1.22: 200, 200 for 150 headers (and for 300: it counts bytes only)

    fine = await exchange_to_close(
        port, b"GET /ok HTTP/1.1\r\nHost: x\r\n" + headers(150) + b"\r\n" + END, LIMIT
    )
    over = await exchange_to_close(
        port, b"GET /over HTTP/1.1\r\nHost: x\r\n" + headers(300) + b"\r\n" + END, LIMIT
    )

    assert statuses(responses_of(fine)) == (200, 200)
    assert statuses(responses_of(over)) == (431,)
    assert upstream.paths == [b"/ok", b"/end"]
    assert_no_traceback(log)


# -- response side ---------------------------------------------------------------------------


async def answer(
    proxy: MakeProxy, upstream: FramingUpstream, response: bytes, then: str | None = None
) -> list[Response]:
    """The upstream answers ``GET /r`` with ``response``; what the client read (its
    connection also asked for ``END``)."""
    upstream.answers[b"/r"] = response
    if then is not None:
        upstream.then[b"/r"] = then
    port = await start(proxy, upstream)
    data = await exchange_to_close(port, b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n" + END, LIMIT)
    assert not data.startswith(b"HTTP/1.1 1"), f"an interim response reached the client: {data!r}"
    return responses_of(data)


UNASKED_101 = {
    # nginx 1.22: nothing within 4 s (it holds the client until proxy_read_timeout)
    "with-upgrade-headers": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
    b"Upgrade: websocket\r\n\r\n",
    "bare": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",  # nginx 1.22: nothing in 4 s
    "then-bytes": b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"  # nginx 1.22: same
    b"Upgrade: foo\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
}


@pytest.mark.parametrize("response", UNASKED_101.values(), ids=UNASKED_101.keys())
async def test_finding_4_unasked_101_gets_one_502(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture, response: bytes
) -> None:
    got = await answer(proxy, upstream, response)

    assert statuses(got) in [(502,), (502, 200)], statuses(got)
    assert b"101" not in b"".join(r.body for r in got)
    assert_no_traceback(log)


CONNECTION_FRAMING = {
    # nginx 1.22: 200 with Content-Length: 5, then /end
    "connection-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    b"Connection: Content-Length\r\n\r\nhello",
    # nginx 1.22: 200 with Content-Length: 5, then /end
    "connection-keep-alive-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    b"Connection: keep-alive, content-length\r\n\r\nhello",
    # nginx 1.22: 200 chunked, then /end
    "connection-transfer-encoding": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: Transfer-Encoding\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("response", CONNECTION_FRAMING.values(), ids=CONNECTION_FRAMING.keys())
async def test_finding_5_response_stays_framed_when_connection_lists_its_framing(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture, response: bytes
) -> None:
    got = await answer(proxy, upstream, response)

    first = got[0]
    assert (first.status, first.body) == (200, b"hello"), got
    assert first.complete
    if first.framing == "eof":  # close-delimited: allowed only when nothing follows
        assert len(got) == 1
    else:
        assert first.framing in ("length", "chunked")
        assert [r.body for r in got[1:]] in ([], [b"/end"])
    assert_no_traceback(log)


@pytest.mark.parametrize(
    "response",
    [b"HTTP/1.1 099 Foo\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 000 X\r\n\r\n",
     b"HTTP/1.1 099 Foo\r\n\r\n"],
    ids=["099-with-length", "000", "099"],
)  # fmt: skip
async def test_finding_15_status_below_100_gets_502_at_once(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture, response: bytes
) -> None:
    # nginx 1.22: "099" with a length relayed as it came; 000 and 099 without one:
    # nothing within 4 s (a body to the end of the connection)
    upstream.answers[b"/r"] = response
    port = await start(proxy, upstream)
    client = await RawClient.connect(port)
    try:
        client.send(b"GET /r HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: b"\r\n\r\n" in client.received or client.closed.done(), 3.0)
    finally:
        client.close()

    assert bytes(client.received).startswith(b"HTTP/1.1 502 "), bytes(client.received)
    assert_no_traceback(log)


async def test_finding_16_two_responses_to_one_request_give_the_client_the_first(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture
) -> None:
    # nginx 1.22: 200 "first", then 200 "/end"; the next client gets "/next"
    upstream.answers[b"/double"] = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    )
    port = await start(proxy, upstream)

    one = await exchange_to_close(port, b"GET /double HTTP/1.1\r\nHost: x\r\n\r\n" + END, LIMIT)
    two = await exchange_to_close(port, b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n" + END, LIMIT)

    assert [(r.status, r.body) for r in responses_of(one)][:1] == [(200, b"first")]
    assert b"stale" not in one and b"stale" not in two
    assert [r.body for r in responses_of(two) if r.status == 200] == [b"/next", b"/end"]
    assert_no_traceback(log)


@pytest.mark.parametrize("how", [CLOSE, RESET])
async def test_finding_6_close_delimited_body_ends_only_on_a_clean_close(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture, how: str
) -> None:
    # nginx 1.22: FIN: chunked with the "0" chunk, kept alive; RST: no "0" chunk, closed
    upstream.answers[b"/cut"] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-body"
    port = await start(proxy, upstream)
    client = await RawClient.connect(port)
    try:
        client.send(b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
        await wait_for(lambda: b"partial-body" in client.received, LIMIT)

        upstream.end_all(how)
        if how == CLOSE:
            await wait_for(lambda: client.received.endswith(b"\r\n0\r\n\r\n"), LIMIT)
        else:
            await client.until_closed(LIMIT)
    finally:
        client.close()

    (got,) = responses_of(bytes(client.received))
    assert got.status == 200
    assert got.body == b"partial-body"
    if how == CLOSE:
        assert got.complete and got.framing in ("chunked", "eof")
    else:
        assert not client.received.endswith(b"0\r\n\r\n"), "a cut body must not look complete"
        assert not got.complete or got.framing == "eof"
    assert_no_traceback(log)


UPSTREAM_CLASSICS = {
    # nginx 1.22: 200 "hello!" (the last length)
    "duplicate-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello!",
    "bad-status": b"HTTP/1.1 abc Broken\r\n\r\n",  # nginx 1.22: relayed as HTTP/0.9
    "not-http": b"hello there\r\n\r\n",  # nginx 1.22: relayed as HTTP/0.9
}


@pytest.mark.parametrize("response", UPSTREAM_CLASSICS.values(), ids=UPSTREAM_CLASSICS.keys())
async def test_upstream_classics_get_502(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture, response: bytes
) -> None:
    got = await answer(proxy, upstream, response, then=CLOSE)

    assert statuses(got) in [(502,), (502, 200)], statuses(got)
    assert_no_traceback(log)


async def test_upstream_cl_and_te_is_refused_or_read_as_chunked(
    proxy: MakeProxy, upstream: FramingUpstream, log: pytest.LogCaptureFixture
) -> None:
    # nginx 1.22: 200, chunked "hello" (Content-Length ignored)
    got = await answer(
        proxy, upstream,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    )  # fmt: skip

    assert statuses(got) in [(502,), (502, 200)] or got[0].body == b"hello", got
    assert_no_traceback(log)
