"""Property test: whatever bytes a client sends, the proxy answers well or closes.

One upstream and one proxy serve the whole module from a background thread with its
own uvloop loop; each hypothesis example talks to them over a plain blocking socket,
so no event loop of the test runner is involved. All listener timeouts are short, so
every input ends within a bounded time: a complete request gets its response, an
incomplete one gets 408 (or, before any byte of a request, a quiet close).

Inputs: random bytes, mutated requests, pipelined sequences of them, Upgrade requests
(fuzzed ``Connection``/``Upgrade`` values and body framing), and, through a second proxy
in front of a raw upstream, fuzzed upstream responses (odd status codes, framing
headers, ``Connection`` tokens, 1xx sequences, truncation, a close or a reset after).

Checked for every input:
- the first bytes back (if any) are a well-formed head: ``HTTP/1.1 NNN reason``,
  NNN in 100..599, headers that parse, ending with CRLF CRLF;
- the proxy never answers 500 (its "bug" status), never logs an error and no log
  record at any level carries a traceback;
- no traceback text is ever sent;
- the connection ends (response complete, or closed) well within the deadline;
- afterwards a normal request on a new connection still gets 200.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import httptools
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.runtime.server import ProxyServer
from tests.framing_support import ANY_PATH, CLOSE, RESET, FramingUpstream, tracebacks
from tests.support import HOST, Recorder, make_config, start_proxy, start_recorder

T = TypeVar("T")

#: Far beyond every timeout below: an input still unanswered by then is a failure.
DEADLINE = 3.0
FUZZ_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
GOOD = b"GET / HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"
STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [^\r\n]*\r\n")


class ErrorLog(logging.Handler):
    """Remembers every ERROR record of the proxy and of asyncio, and every record at
    any level that carries a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or tracebacks([record]):
            self.records.append(record)


class BackgroundProxy:
    """A recorder upstream and the proxy in front of it, on a uvloop loop in a thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="fuzz-proxy", daemon=True)
        self.recorder: Recorder | None = None
        self.server: ProxyServer | None = None
        self.port = 0

    def _run(self) -> None:
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10.0)

    def start(self) -> None:
        self.thread.start()
        self.recorder = self.call(start_recorder("fuzz"))
        self.port = self.serve(self.recorder.url)

    def serve(self, url: str) -> int:
        """Start the proxy in front of ``url``; its port."""
        timeouts = {"header": "200ms", "body": "200ms", "idle": "200ms"}
        config = make_config(
            [url],
            listener={"timeouts": timeouts, "limits": {"max_body_size": 1_000_000}},
            pool={"timeouts": {"response_header": "1s", "read": "1s"}},
            routes=[  # a named host (absolute-form targets for it are served), then the rest
                {"match": {"host": "fuzz.test"}, "pool": "main"},
                {"match": {"path_prefix": "/"}, "pool": "main"},
            ],
        )
        self.server = self.call(start_proxy(config))
        return self.server.listeners[0].port

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.shutdown(timeout=1.0))
        if self.recorder is not None:
            self.call(self.recorder.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)


class RawBackgroundProxy(BackgroundProxy):
    """The proxy in front of a ``FramingUpstream`` whose answer each example sets."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: FramingUpstream | None = None

    def start(self) -> None:
        self.thread.start()
        self.raw = self.call(FramingUpstream().start())
        self.port = self.serve(self.raw.url)

    def answer(self, response: bytes | None, then: str | None = None) -> None:
        """Every request gets ``response`` (None: the upstream's own 200), then ``then``."""
        raw = self.raw
        assert raw is not None

        async def change() -> None:
            raw.answers = {} if response is None else {ANY_PATH: response}
            raw.then = {} if then is None else {ANY_PATH: then}

        self.call(change())

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.shutdown(timeout=1.0))
            self.server = None
        if self.raw is not None:
            self.call(self.raw.stop())
        super().stop()


@contextmanager
def error_log() -> Iterator[ErrorLog]:
    """An ``ErrorLog`` on the proxy's and asyncio's loggers, the proxy's at DEBUG."""
    errors = ErrorLog()
    loggers = [logging.getLogger("aiolb"), logging.getLogger("asyncio")]
    level = loggers[0].level
    loggers[0].setLevel(logging.DEBUG)
    for logger in loggers:
        logger.addHandler(errors)
    try:
        yield errors
    finally:
        loggers[0].setLevel(level)
        for logger in loggers:
            logger.removeHandler(errors)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[BackgroundProxy, ErrorLog]]:
    background = BackgroundProxy()
    with error_log() as errors:
        try:
            background.start()
            yield background, errors
        finally:
            background.stop()


# -- talking to the proxy ------------------------------------------------------------------


class _FirstResponse:
    """httptools callbacks: is the first response head, and its message, complete?"""

    def __init__(self) -> None:
        self.head_done = False
        self.message_done = False

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_message_complete(self) -> None:
        self.message_done = True


def exchange(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data``; read until the first response is complete or the proxy closes.

    Returns what was read and whether it ended in time. A reset counts as a close.
    """
    sock = socket.create_connection((HOST, port), timeout=DEADLINE)
    try:
        try:
            sock.sendall(data)
        except OSError:  # the proxy refused early and closed: read what it said
            pass
        got = b""
        seen = _FirstResponse()
        parser = httptools.HttpResponseParser(seen)
        ends_at = time.monotonic() + DEADLINE
        while not seen.message_done:
            left = ends_at - time.monotonic()
            if left <= 0:
                return got, False
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return got, False
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
            try:
                parser.feed_data(chunk)
            except httptools.HttpParserError:
                if not seen.head_done:
                    raise AssertionError(f"malformed response head: {got[:300]!r}") from None
                return got, True  # a later message: judged by the checks on the first
        return got, True
    finally:
        sock.close()


def check_answer(data: bytes, port: int, errors: ErrorLog) -> None:
    errors.records.clear()  # each example answers for what it logs
    answer, ended = exchange(port, data)
    assert ended, f"no answer and no close within {DEADLINE}s; got {answer[:300]!r}"
    if answer:
        status_line = STATUS_LINE.match(answer)
        assert status_line is not None, f"bad status line: {answer[:300]!r}"
        assert b"\r\n\r\n" in answer, f"response head not terminated: {answer[:300]!r}"
        assert status_line.group(1) != b"500", f"internal error for {data[:300]!r}"
    assert b"Traceback" not in answer
    assert not errors.records, [r.getMessage() for r in errors.records]

    follow_up, ended = exchange(port, GOOD)
    assert ended and follow_up.startswith(b"HTTP/1.1 200 "), follow_up[:300]


# -- strategies ------------------------------------------------------------------------------

VALID_REQUESTS = [
    GOOD,
    b"GET /path/to?q=1&r=%20x HTTP/1.1\r\nHost: fuzz.test\r\nAccept: */*\r\n"
    b"User-Agent: fuzz/1.0\r\nX-Request-ID: abc\r\n\r\n",
    b"POST /upload HTTP/1.1\r\nHost: fuzz.test\r\nContent-Length: 5\r\n\r\nhello",
    b"PUT /chunked HTTP/1.1\r\nHost: fuzz.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nTrailer-A: x\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nHost: fuzz.test\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"POST /expect HTTP/1.1\r\nHost: fuzz.test\r\nExpect: 100-continue\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    b"GET http://fuzz.test/abs HTTP/1.1\r\nHost: fuzz.test\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: fuzz.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    GOOD + b"GET /second HTTP/1.1\r\nHost: fuzz.test\r\nConnection: close\r\n\r\n",
]
# fmt: off
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"TRACE",
           b"CONNECT", b"PRI", b"PROPFIND", b"get", b"G\x00T", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/11",
            b"http/1.1", b"HTTP/1.1 ", b"HTTP/", b""]
INSERTS = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b":", b"\t", b"\r\n\r\n", b"\xff", b",",
           b"\r\n: x\r\n", b"\r\nContent-Length: 0\r\n", b"\r\nTransfer-Encoding: chunked\r\n"]
# fmt: on
HUGE_NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=10**40).map(lambda n: str(n).encode()),
    st.sampled_from([b"-1", b"0x10", b"1e3", b" 5", b"5 ", b"", b"+5", b"5,5"]),
)
HUGE_HEX = st.one_of(
    st.integers(min_value=0, max_value=16**24).map(lambda n: b"%x" % n),
    st.sampled_from([b"-1", b"0x10", b"g", b"", b"ffffffffffffffffffffffffffff", b"5;"]),
)


def _replace_first_line_part(request: bytes, index: int, new: bytes) -> bytes:
    line, sep, rest = request.partition(b"\r\n")
    parts = line.split(b" ")
    if index < len(parts):
        parts[index] = new
    return b" ".join(parts) + sep + rest


@st.composite
def mutated_requests(draw: st.DrawFn) -> bytes:
    """A valid request (or two pipelined) with one to four mutations applied."""
    data = draw(st.sampled_from(VALID_REQUESTS))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(
            ["flip", "insert", "delete", "truncate", "duplicate", "length", "chunk",
             "method", "version"]
        ))  # fmt: skip
        at = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
        if op == "flip" and data:
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
        elif op == "insert":
            piece = draw(st.one_of(st.sampled_from(INSERTS), st.binary(min_size=1, max_size=8)))
            data = data[:at] + piece + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 16)) :]
        elif op == "truncate":
            data = data[:at]
        elif op == "duplicate":
            lines = data.split(b"\r\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            data = b"\r\n".join(lines)
        elif op == "length":
            # fmt: off
            data = re.sub(rb"(?i)(content-length:) *[^\r\n]*",
                          lambda m: m.group(1) + b" " + draw(HUGE_NUMBERS), data, count=1)
            # fmt: on
            if b"ontent-" not in data.lower():
                head, sep, body = data.partition(b"\r\n\r\n")
                data = head + b"\r\nContent-Length: " + draw(HUGE_NUMBERS) + sep + body
        elif op == "chunk":
            data = data.replace(b"\r\n\r\n5\r\n", b"\r\n\r\n" + draw(HUGE_HEX) + b"\r\n", 1)
        elif op == "method":
            data = _replace_first_line_part(data, 0, draw(st.sampled_from(METHODS)))
        elif op == "version":
            data = _replace_first_line_part(data, 2, draw(st.sampled_from(VERSIONS)))
    return data


# -- the properties --------------------------------------------------------------------------


def test_valid_requests_get_200(served: tuple[BackgroundProxy, ErrorLog]) -> None:
    """The base inputs are really valid: the mutations start from working requests."""
    background, errors = served
    for request in VALID_REQUESTS:
        answer, ended = exchange(background.port, request)
        assert ended and answer.startswith(b"HTTP/1.1 "), (request, answer[:300])
        assert int(answer[9:12]) < 300, (request, answer[:300])
    assert not errors.records


@FUZZ_SETTINGS
@given(data=st.binary(min_size=1, max_size=4096))
def test_random_bytes_get_a_well_formed_answer_or_a_close(
    served: tuple[BackgroundProxy, ErrorLog], data: bytes
) -> None:
    background, errors = served
    check_answer(data, background.port, errors)


@FUZZ_SETTINGS
@given(data=mutated_requests())
def test_mutated_requests_get_a_well_formed_answer_or_a_close(
    served: tuple[BackgroundProxy, ErrorLog], data: bytes
) -> None:
    background, errors = served
    check_answer(data, background.port, errors)


# -- pipelined requests, Upgrade requests ----------------------------------------------------

CLOSING = b"GET /last HTTP/1.1\r\nHost: fuzz.test\r\nConnection: close\r\n\r\n"


def exchange_all(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send ``data``; read until the proxy closes. (what was read, whether it closed in time)"""
    sock = socket.create_connection((HOST, port), timeout=DEADLINE)
    try:
        try:
            sock.sendall(data)
        except OSError:
            pass
        got = b""
        ends_at = time.monotonic() + DEADLINE
        while (left := ends_at - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                return got, True
            if not chunk:
                return got, True
            got += chunk
        return got, False
    finally:
        sock.close()


def check_all_answers(data: bytes, port: int, errors: ErrorLog) -> None:
    """A pipelined sequence: the connection ends in time (the last request closes it), the
    first answer is well formed, no answer is a 500, nothing is logged as a bug."""
    errors.records.clear()
    answer, ended = exchange_all(port, data)
    assert ended, f"no close within {DEADLINE}s; got {answer[-300:]!r}"
    if answer:
        assert STATUS_LINE.match(answer), f"bad status line: {answer[:300]!r}"
        assert b"\r\n\r\n" in answer, f"response head not terminated: {answer[:300]!r}"
    assert re.search(rb"HTTP/1\.1 500 ", answer) is None, f"internal error for {data[:300]!r}"
    assert b"Traceback" not in answer
    assert not errors.records, [r.getMessage() for r in errors.records]
    follow_up, ended = exchange(port, GOOD)
    assert ended and follow_up.startswith(b"HTTP/1.1 200 "), follow_up[:300]


@st.composite
def pipelined_requests(draw: st.DrawFn) -> bytes:
    """Two to four requests, valid or mutated, then one that asks to close."""
    parts = draw(st.lists(
        st.one_of(st.sampled_from(VALID_REQUESTS), mutated_requests()), min_size=2, max_size=4
    ))  # fmt: skip
    return b"".join(parts) + CLOSING


UPGRADE_CONNECTIONS = [
    b"Upgrade",
    b"upgrade",
    b"keep-alive, Upgrade",
    b"close, upgrade",
    b"Upgrade, Content-Length",
    b"Upgrade, Transfer-Encoding",
    b"Upgrade, Host",
    b"upgrade , keep-alive",
    b"",
    b"\xffupgrade",
    b"Upgrade\x00",
]
UPGRADE_PROTOCOLS = [
    b"websocket",
    b"WebSocket",
    b"foo",
    b"h2c",
    b"websocket, foo",
    b"\xff\xfe",
    b"",
    b"foo/1.0",
    b"a b",
    b"websocket\x01",
    b"h2c, websocket",
]
SMUGGLED = b"GET /admin/secret HTTP/1.1\r\nHost: fuzz.test\r\n\r\n"


@st.composite
def upgrade_requests(draw: st.DrawFn) -> bytes:
    """An Upgrade request with fuzzed Connection/Upgrade values and body framing, then
    maybe a pipelined request or tunnel bytes."""
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    head = b"GET /ws %s\r\nHost: fuzz.test\r\n" % version
    for name, values in ((b"Connection", UPGRADE_CONNECTIONS), (b"Upgrade", UPGRADE_PROTOCOLS)):
        for value in draw(st.lists(st.sampled_from(values), min_size=0, max_size=2)):
            head += b"%s: %s\r\n" % (name, value)
    body = draw(st.one_of(st.sampled_from([b"", SMUGGLED, GOOD]), st.binary(max_size=48)))
    framing = draw(st.sampled_from(["none", "length", "chunked", "both", "short", "long"]))
    if framing == "length":
        head += b"Content-Length: %d\r\n" % len(body)
    elif framing in ("short", "long"):
        head += b"Content-Length: %d\r\n" % max(len(body) + (5 if framing == "long" else -5), 0)
    elif framing in ("chunked", "both"):
        head += b"Transfer-Encoding: chunked\r\n"
        head += b"Content-Length: 3\r\n" if framing == "both" else b""
        body = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    after = draw(st.sampled_from([b"", GOOD, SMUGGLED, b"\x81\x05hello", CLOSING]))
    return head + b"\r\n" + body + after


@FUZZ_SETTINGS
@given(data=pipelined_requests())
def test_pipelined_requests_get_well_formed_answers_or_a_close(
    served: tuple[BackgroundProxy, ErrorLog], data: bytes
) -> None:
    background, errors = served
    check_all_answers(data, background.port, errors)


@FUZZ_SETTINGS
@given(data=upgrade_requests())
def test_upgrade_requests_get_a_well_formed_answer_or_a_close(
    served: tuple[BackgroundProxy, ErrorLog], data: bytes
) -> None:
    background, errors = served
    check_answer(data, background.port, errors)


# -- upstream responses ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_raw() -> Iterator[tuple[RawBackgroundProxy, ErrorLog]]:
    background = RawBackgroundProxy()
    with error_log() as errors:
        try:
            background.start()
            yield background, errors
        finally:
            background.stop()


STATUS_CODES = st.one_of(
    st.sampled_from([b"200", b"204", b"304", b"101", b"100", b"103", b"099", b"000", b"999",
                     b"600", b"404", b"502", b"20", b"2000", b"abc", b""]),
    st.integers(min_value=0, max_value=999).map(lambda n: b"%03d" % n),
)  # fmt: skip
RESPONSE_VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1", b"HTTP/1.1 ", b""]
RESPONSE_HEADERS = [
    b"Content-Length: 5", b"Content-Length: 0", b"Content-Length: -1", b"Content-Length: 5, 5",
    b"Content-Length: 99999999999999999999", b"Content-Length : 5", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked, identity", b"Connection: close",
    b"Connection: keep-alive", b"Connection: Content-Length", b"Connection: Transfer-Encoding",
    b"Connection: upgrade", b"Upgrade: websocket", b"Keep-Alive: timeout=1", b"X-A: \xff",
    b"Bad Header: x", b"Content-Type: text/plain", b" folded", b"Trailer: X",
]  # fmt: skip
RESPONSE_BODIES = [
    b"",
    b"hello",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhel",
    b"zz\r\n",
    b"hello" + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale",
]
INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
]


#: What may reach the client from a fuzzed upstream: a status of three digits from 100
#: (RFC 9112 4's grammar; 600-999 relayed as they came is not a framing fault, 099 is).
RELAYED_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-9][0-9][0-9]) [^\r\n]*\r\n")


@st.composite
def upstream_responses(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A response (after zero to three 1xx), maybe cut short; and how the upstream ends:
    a close, a reset or keeping the connection."""
    data = b"".join(draw(st.lists(st.sampled_from(INTERIM), max_size=3)))
    version = draw(st.sampled_from(RESPONSE_VERSIONS))
    data += b"%s %s %s\r\n" % (version, draw(STATUS_CODES), draw(st.sampled_from([b"OK", b""])))
    for header in draw(st.lists(st.sampled_from(RESPONSE_HEADERS), max_size=4)):
        data += header + b"\r\n"
    data += b"\r\n" + draw(st.one_of(st.sampled_from(RESPONSE_BODIES), st.binary(max_size=32)))
    if draw(st.booleans()):
        data = data[: draw(st.integers(min_value=0, max_value=len(data)))]
    return data, draw(st.sampled_from([CLOSE, CLOSE, RESET, None]))


@FUZZ_SETTINGS
@given(response=upstream_responses())
def test_upstream_responses_get_a_well_formed_answer_or_a_close(
    served_raw: tuple[RawBackgroundProxy, ErrorLog], response: tuple[bytes, str | None]
) -> None:
    background, errors = served_raw
    background.answer(*response)
    errors.records.clear()
    try:
        answer, ended = exchange(background.port, b"GET /fuzz HTTP/1.1\r\nHost: fuzz.test\r\n\r\n")
    finally:
        background.answer(None)
    assert ended, f"no answer and no close within {DEADLINE}s; got {answer[:300]!r}"
    if answer:
        assert RELAYED_STATUS_LINE.match(answer), f"bad status line: {answer[:300]!r}"
        assert b"\r\n\r\n" in answer, f"response head not terminated: {answer[:300]!r}"
        assert not answer.startswith(b"HTTP/1.1 500 "), f"internal error for {response!r}"
    assert not errors.records, [r.getMessage() for r in errors.records]

    follow_up, ended = exchange(background.port, b"GET /next HTTP/1.1\r\nHost: fuzz.test\r\n\r\n")
    assert ended and follow_up.startswith(b"HTTP/1.1 200 "), follow_up[:300]
    assert follow_up.endswith(b"\r\n\r\n/next"), f"not this request's answer: {follow_up!r}"
