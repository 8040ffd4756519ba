"""The pure parts of tracing: traceparent parsing, the OTLP encoder (decoded by
opentelemetry-proto), the headers' notes, the config's URL, the access log field and
the exporter's bounded queue."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from proxy.config.models import TracingSpec
from proxy.http.headers import NO_PARENT, TRACED, RequestHeaders
from proxy.metrics.log_format import compile_format
from proxy.tracing import Tracer, otlp
from proxy.tracing.context import parse_traceparent
from proxy.tracing.export import MAX_QUEUE, Exporter

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"00-%s-%s-01" % (TRACE, PARENT), (TRACE, PARENT, 1)),
        (b" 00-%s-%s-00 " % (TRACE, PARENT), (TRACE, PARENT, 0)),  # OWS
        (b"01-%s-%s-03-future" % (TRACE, PARENT), (TRACE, PARENT, 3)),  # a later version
        (b"00-%s-%s-01-extra" % (TRACE, PARENT), None),  # version 00 has no more fields
        (b"ff-%s-%s-01" % (TRACE, PARENT), None),
        (b"00-%s-%s-01" % (b"0" * 32, PARENT), None),
        (b"00-%s-%s-01" % (TRACE, b"0" * 16), None),
        (b"00-%s-%s-01" % (TRACE.upper(), PARENT), None),
        (b"00-%s-%s-1" % (TRACE, PARENT), None),
        (b"", None),
    ],
)
def test_traceparent_parsing(value: bytes, expected: tuple[bytes, bytes, int] | None) -> None:
    assert parse_traceparent(value) == expected


def test_the_encoder_is_what_opentelemetry_proto_decodes() -> None:
    trace, span_id, parent = bytes(range(16)), bytes(range(8)), bytes(range(8, 16))
    attrs = {"s": "é", "t": True, "f": False, "i": 2**40, "n": -5, "d": 0.25}
    one = otlp.span(trace, span_id, parent, "GET", otlp.SERVER, 10**18, 10**18 + 5, attrs,
                    error=True, trace_state=b"a=b")  # fmt: skip
    two = otlp.span(trace, parent, None, "GET", otlp.CLIENT, 1, 2, {})
    message = ExportTraceServiceRequest()
    message.ParseFromString(otlp.export_request({"service.name": "x"}, ("aiolb", "1"), [one, two]))
    (rs,) = message.resource_spans
    assert [(kv.key, kv.value.string_value) for kv in rs.resource.attributes] == [
        ("service.name", "x")]  # fmt: skip
    (ss,) = rs.scope_spans
    assert (ss.scope.name, ss.scope.version) == ("aiolb", "1")
    first, second = ss.spans
    assert (first.trace_id, first.span_id, first.parent_span_id) == (trace, span_id, parent)
    assert (first.name, first.kind, first.trace_state) == ("GET", Span.SPAN_KIND_SERVER, "a=b")
    assert (first.start_time_unix_nano, first.end_time_unix_nano) == (10**18, 10**18 + 5)
    values = {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in first.attributes}
    assert values == attrs
    assert first.status.code == 2
    assert (second.parent_span_id, second.kind, second.status.code) == (b"", 3, 0)


def test_headers_note_the_trace_headers_and_forward_them() -> None:
    found = RequestHeaders([(b"TraceParent", b"x"), (b"tracestate", b"a=1"),
                            (b"tracestate", b"b=2")])  # fmt: skip
    assert (found.traceparent, found.tracestate) == (b"x", b"a=1,b=2")
    assert b"".join(found.parts).count(b"\r\n") == 3
    twice = RequestHeaders([(b"traceparent", b"x"), (b"traceparent", b"y")])
    assert twice.traceparent == b""  # invalid: a new trace
    assert RequestHeaders([(b"host", b"a")]).traceparent is None
    # a tracestate alone is no traceparent, but not None either: None means no trace
    # header came (``Exchange.start`` checks that one attribute)
    alone = RequestHeaders([(b"tracestate", b"a=1")])
    assert alone.traceparent == NO_PARENT and parse_traceparent(NO_PARENT) is None
    state_first = RequestHeaders([(b"tracestate", b"a=1"), (b"traceparent", b"x")])
    assert (state_first.traceparent, state_first.tracestate) == (b"x", b"a=1")
    state_between = RequestHeaders([(b"traceparent", b"x"), (b"tracestate", b"a=1"),
                                    (b"traceparent", b"y")])  # fmt: skip
    assert state_between.traceparent == b""


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://c:4318", "http://c:4318/v1/traces"),
        ("http://c:4318/", "http://c:4318/v1/traces"),
        ("https://otlp.example/api/v1/spans", "https://otlp.example/api/v1/spans"),
    ],
)
def test_the_endpoint_gets_the_traces_path_only_without_a_path(endpoint: str, url: str) -> None:
    assert TracingSpec(endpoint=endpoint).url == url


def test_the_access_log_trace_id_field() -> None:
    line = compile_format(("status", "trace_id"), str)
    args = [0.0, "c", b"GET", b"/", 200, 0, 0, 0.0, 1, b"r", None, [], "l", None, None]
    traced = SimpleNamespace(trace_id=TRACE)  # the exchange: the formatter reads its trace_id
    assert json.loads(line(*args, traced)) == {"status": 200, "trace_id": TRACE.decode()}
    assert json.loads(line(*args, None)) == {"status": 200, "trace_id": None}
    untraced = SimpleNamespace(trace_id=b"")  # a listener without ``tracing``
    assert json.loads(line(*args, untraced)) == {"status": 200, "trace_id": None}
    text = compile_format("$status $trace_id", str)
    assert text(*args, None) == "200 -\n"


def test_a_full_queue_drops_and_counts() -> None:
    exporter = Exporter(TracingSpec(endpoint="http://127.0.0.1:9"))
    exporter.add([b"x"] * MAX_QUEUE)
    exporter.add([b"y", b"z"])
    assert (len(exporter.queue), exporter.dropped) == (MAX_QUEUE, 2)


def test_new_traces_are_sampled_at_the_rate() -> None:
    for rate, low, high in ((0.0, 0, 0), (1.0, 20_000, 20_000), (0.25, 4_600, 5_400)):
        tracer = Tracer(TracingSpec(endpoint="http://127.0.0.1:9", sample_rate=rate))
        ids = [next(tracer.ids) for _ in range(20_000)]
        assert low <= ids.count(None) <= high
        values = [TRACED % (i, tracer.parent) for i in ids if i is not None]
        assert len(set(values)) == len(values)
        assert all(parse_traceparent(v[13:-2]) is not None for v in values)
        assert all(v.endswith(b"-00\r\n") for v in values)
