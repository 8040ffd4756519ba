"""The gRPC health probe's pure parts: the hand-encoded protobuf messages against the
protobuf runtime's own, gRPC framing, ``grpc-timeout``, and the verdict of one
``HealthCall`` fed by a real ``h2`` server connection in memory (no sockets)."""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from grpc_health.v1 import health_pb2

from proxy.health import grpc_probe
from proxy.health.grpc_probe import (
    PATH,
    SERVING,
    HealthCall,
    ProbeFailed,
    decode_response,
    encode_request,
    timeout_header,
    unframe,
)

Respond = Callable[[h2.connection.H2Connection], None]


# --- the messages ------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "svc", "grpc.health.v1.Health", "a" * 200, "sérvice"])
def test_the_request_is_what_protobuf_encodes_in_a_grpc_frame(service: str) -> None:
    framed = encode_request(service)
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert framed[0] == 0 and int.from_bytes(framed[1:5], "big") == len(expected)
    assert framed[5:] == expected


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_the_response_decodes_as_protobuf_encodes_it(status: int) -> None:
    message = health_pb2.HealthCheckResponse(status=status).SerializeToString()  # type: ignore[arg-type]
    assert decode_response(message) == status


def test_unknown_fields_are_skipped_and_the_last_status_wins() -> None:
    message = (
        b"\x10\x96\x01"  # field 2, varint 150
        b"\x1a\x03abc"  # field 3, length-delimited
        b"\x08\x02"  # status NOT_SERVING
        b"\x25\x00\x00\x00\x00"  # field 4, fixed32
        b"\x29\x00\x00\x00\x00\x00\x00\x00\x00"  # field 5, fixed64
        b"\x08\x01"  # status SERVING: the last one wins
    )
    assert decode_response(message) == SERVING
    assert decode_response(b"") == 0  # no status: UNKNOWN


@pytest.mark.parametrize(
    "message",
    [b"\x08", b"\x08\x80", b"\x0b", b"\x0a\x01\x01", b"\x1a\x05ab", b"\x25\x00"],
    ids=["truncated-varint", "unfinished-varint", "group", "status-as-bytes",
         "short-bytes", "short-fixed32"],
)  # fmt: skip
def test_a_malformed_response_is_refused(message: bytes) -> None:
    with pytest.raises(ValueError):
        decode_response(message)


def test_unframe() -> None:
    assert unframe(b"\x00\x00\x00\x00\x02\x08\x01") == b"\x08\x01"
    assert unframe(b"\x00\x00\x00\x00\x00") == b""
    refused = [
        (b"\x00\x00", "no gRPC message"),
        (b"\x01\x00\x00\x00\x00", "compressed"),
        (b"\x00\x00\x00\x00\x03\x08\x01", "a message of 3 bytes in a body of 2"),
    ]
    for body, why in refused:
        with pytest.raises(ValueError, match=why):
            unframe(body)


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(1.0, "1000m"), (0.25, "250m"), (0.0001, "1m"), (0.0015, "2m"), (99_999.999, "99999999m"),
     (1e6, "1000000S"), (1e12, "99999999S")],
)  # fmt: skip
def test_grpc_timeout_header(seconds: float, header: str) -> None:
    assert timeout_header(seconds) == header


# --- one call against an h2 server in memory ----------------------------------------------


def call_against(respond: Respond) -> tuple[HealthCall, list[h2.events.Event]]:
    """A ``HealthCall`` whose request a server-side ``h2`` connection reads, then answers
    with what ``respond`` sends; returns the call and the events the server saw."""
    call = HealthCall()
    config = h2.config.H2Configuration(client_side=False, header_encoding=None)
    server = h2.connection.H2Connection(config)
    server.initiate_connection()
    seen = server.receive_data(call.start("api.test:50051", "http", "svc", 0.5))
    respond(server)
    call.feed(server.data_to_send())
    return call, seen


def answer(status: int = 1, *, code: str = "0", message: bytes | None = None) -> Respond:
    """A unary answer: 200, one message, trailers with ``grpc-status``."""
    body = encode_request("") if message is None else message
    if message is None:
        payload = health_pb2.HealthCheckResponse(status=status).SerializeToString()  # type: ignore[arg-type]
        body = b"\x00" + len(payload).to_bytes(4, "big") + payload

    def respond(server: h2.connection.H2Connection) -> None:
        server.send_headers(1, [(":status", "200"), ("content-type", "application/grpc")])
        server.send_data(1, body)
        server.send_headers(1, [("grpc-status", code)], end_stream=True)

    return respond


def headers_only(*headers: tuple[str, str]) -> Respond:
    def respond(server: h2.connection.H2Connection) -> None:
        server.send_headers(1, list(headers), end_stream=True)

    return respond


def test_the_request_is_a_grpc_call_with_its_deadline() -> None:
    _, seen = call_against(answer())
    [request] = [e for e in seen if isinstance(e, h2.events.RequestReceived)]
    headers = {name.decode(): value.decode() for name, value in request.headers}
    assert headers == {
        ":method": "POST", ":scheme": "http", ":path": PATH, ":authority": "api.test:50051",
        "content-type": "application/grpc", "te": "trailers", "grpc-timeout": "500m",
    }  # fmt: skip
    [data] = [e for e in seen if isinstance(e, h2.events.DataReceived)]
    assert data.data == encode_request("svc")
    assert any(isinstance(e, h2.events.StreamEnded) for e in seen)


@pytest.mark.parametrize(
    ("respond", "verdict"),
    [
        (answer(1), (True, "SERVING")),
        (answer(2), (False, "NOT_SERVING")),
        (answer(3), (False, "SERVICE_UNKNOWN")),
        (answer(0), (False, "UNKNOWN")),
        (answer(9), (False, "status 9")),
        (answer(code="5"), (False, "grpc-status 5 NOT_FOUND")),
        (answer(message=b"\x00\x00\x00\x00\x01\x0b"),
         (False, "invalid HealthCheckResponse: field 1 has wire type 3")),
        (headers_only((":status", "200"), ("content-type", "application/grpc"),
                      ("grpc-status", "14"), ("grpc-message", "going%20away")),
         (False, "grpc-status 14 UNAVAILABLE: going away")),
        (headers_only((":status", "200"), ("content-type", "application/grpc"),
                      ("grpc-status", "14"), ("grpc-message", "line%0A%1Bnext%20%E2%9C%93")),
         (False, "grpc-status 14 UNAVAILABLE: line  next \u2713")),
        (headers_only((":status", "200"), ("content-type", "application/grpc+proto"),
                      ("grpc-status", "12")),
         (False, "grpc-status 12 UNIMPLEMENTED")),
        (headers_only((":status", "200"), ("content-type", "application/grpc")),
         (False, "no grpc-status in the answer")),
        (headers_only((":status", "503"), ("content-type", "text/plain")),
         (False, "HTTP status 503")),
        (headers_only((":status", "200"), ("content-type", "text/html")),
         (False, "not a gRPC answer (content-type text/html)")),
        (headers_only((":status", "200"), ("content-type", "application/grpc"),
                      ("grpc-status", "99")),
         (False, "grpc-status 99")),
    ],
    ids=["serving", "not-serving", "service-unknown", "unknown", "unknown-enum",
         "grpc-not-found", "malformed", "trailers-only", "control-characters", "unimplemented",
         "no-grpc-status", "http-503", "not-grpc", "unknown-code"],
)  # fmt: skip
def test_the_verdict(respond: Respond, verdict: tuple[bool, str]) -> None:
    call, _ = call_against(respond)
    assert call.done and call.verdict() == verdict


def test_a_reset_stream_fails_the_call() -> None:
    def reset(server: h2.connection.H2Connection) -> None:
        server.reset_stream(1, h2.errors.ErrorCodes.REFUSED_STREAM)

    with pytest.raises(ProbeFailed, match=r"stream reset by the upstream \(REFUSED_STREAM\)"):
        call_against(reset)


def test_goaway_before_the_answer_fails_the_call() -> None:
    def goaway(server: h2.connection.H2Connection) -> None:
        server.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    with pytest.raises(ProbeFailed, match=r"GOAWAY from the upstream \(ENHANCE_YOUR_CALM\)"):
        call_against(goaway)


def test_an_http1_answer_is_named() -> None:
    call = HealthCall()
    call.start("a:1", "http", "", 1.0)
    with pytest.raises(ProbeFailed, match=r"not HTTP/2: the upstream answered HTTP/1.x"):
        call.feed(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def test_an_oversized_answer_fails_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_probe, "MAX_BODY", 16)
    with pytest.raises(ProbeFailed, match="an answer of more than 16 bytes"):
        call_against(answer(message=bytes(17)))
