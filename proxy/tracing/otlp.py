"""OTLP/HTTP protobuf, written by hand: the few messages a span export needs.

``ExportTraceServiceRequest`` (opentelemetry-proto ``collector/trace/v1``) holds one
``ResourceSpans`` (the resource, ``service.name``) with one ``ScopeSpans`` (scope
``aiolb``) of spans. Each span is encoded once, when its request ends (``span``); a
batch is the encoded spans wrapped (``export_request``). Only what aiolb sends is here:
string, int, bool and double attribute values, no events or links.

Protobuf wire format: a field is a varint key ``(number << 3) | wire type`` and its
value; wire type 0 a varint, 1 eight little-endian bytes, 2 a varint length and that
many bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Final

#: ``Span.SpanKind``
SERVER: Final = 2
CLIENT: Final = 3
#: ``Status.StatusCode``
UNSET: Final = 0
ERROR: Final = 2

AttributeValue = str | bool | int | float

_FIXED64: Final = struct.Struct("<Q").pack
_DOUBLE: Final = struct.Struct("<d").pack


def varint(n: int) -> bytes:
    """``n`` (non-negative, or negative as its 64-bit two's complement) as a varint."""
    n &= 0xFFFFFFFFFFFFFFFF
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def _text(number: int, text: str) -> bytes:
    return _field(number, text.encode())


def any_value(value: AttributeValue) -> bytes:
    """``AnyValue``: string_value 1, bool_value 2, int_value 3, double_value 4."""
    if isinstance(value, str):
        return _text(1, value)
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    return b"\x21" + _DOUBLE(value)


def attributes(number: int, items: Mapping[str, AttributeValue]) -> bytes:
    """Repeated ``KeyValue`` (key 1, value 2) as field ``number``."""
    return b"".join(
        _field(number, _text(1, key) + _field(2, any_value(value))) for key, value in items.items()
    )


def span(
    trace_id: bytes,
    span_id: bytes,
    parent_id: bytes | None,
    name: str,
    kind: int,
    start_ns: int,
    end_ns: int,
    attrs: Mapping[str, AttributeValue],
    error: bool = False,
    trace_state: bytes | None = None,
) -> bytes:
    """One encoded ``Span`` (ids as raw bytes: 16 for the trace, 8 for spans)."""
    out = _field(1, trace_id) + _field(2, span_id)
    if trace_state:
        out += _field(3, trace_state)
    if parent_id is not None:
        out += _field(4, parent_id)
    out += _text(5, name) + b"\x30" + varint(kind)
    out += b"\x39" + _FIXED64(start_ns) + b"\x41" + _FIXED64(end_ns)
    out += attributes(9, attrs)
    if error:
        out += _field(15, b"\x18" + varint(ERROR))  # Status.code = 3
    return out


def export_request(
    resource: Mapping[str, AttributeValue], scope: tuple[str, str], spans: Iterable[bytes]
) -> bytes:
    """``ExportTraceServiceRequest`` for ``spans`` (each from ``span``)."""
    scope_spans = _field(1, _text(1, scope[0]) + _text(2, scope[1]))
    scope_spans += b"".join(_field(2, s) for s in spans)
    resource_spans = _field(1, attributes(1, resource)) + _field(2, scope_spans)
    return _field(1, resource_spans)
