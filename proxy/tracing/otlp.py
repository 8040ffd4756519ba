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

_TIMES: Final = struct.Struct("<BQBQ").pack  # start (7) and end (8), fixed64 each
_DOUBLE: Final = struct.Struct("<d").pack
#: One-byte varints: lengths under 128, the common case.
_SMALL: Final = [bytes((n,)) for n in range(128)]


def varint(n: int) -> bytes:
    """``n`` (non-negative, or negative as its 64-bit two's complement) as a varint."""
    n &= 0xFFFFFFFFFFFFFFFF
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    size = len(data)
    return varint(number << 3 | 2) + (_SMALL[size] if size < 0x80 else varint(size)) + data


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


def key_value(key: str, value: AttributeValue) -> bytes:
    """One ``KeyValue`` (key 1, value 2)."""
    return _text(1, key) + _field(2, any_value(value))


#: Encoded span attributes (field 9) by key and value: most repeat (method, route,
#: pool, upstream, status). Bounded: emptied when full. (A key's values are all of one
#: type: ``True`` and ``1`` would be one entry.)
_ENCODED: Final[dict[tuple[str, AttributeValue], bytes]] = {}
_ENCODED_MAX: Final = 4096
#: Attributes whose values rarely repeat (strings): encoded each time, never kept.
UNIQUE: Final = frozenset(("url.path", "url.full", "aiolb.request_id"))


def span_attributes(items: Mapping[str, AttributeValue]) -> bytes:
    """A span's attributes (field 9), the repeating ones from ``_ENCODED``."""
    out = []
    encoded = _ENCODED
    for item in items.items():
        data = encoded.get(item)
        if data is None:
            data = _field(9, key_value(*item))
            if item[0] not in UNIQUE:
                if len(encoded) >= _ENCODED_MAX:
                    encoded.clear()
                encoded[item] = data
        out.append(data)
    return b"".join(out)


def attributes(number: int, items: Mapping[str, AttributeValue]) -> bytes:
    """Repeated ``KeyValue`` as field ``number``."""
    return b"".join(_field(number, key_value(key, value)) for key, value in items.items())


#: Encoded names and kinds (field 5 and 6) by name and kind.
_NAMES: Final[dict[tuple[str, int], bytes]] = {}


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
    out = b"\x0a\x10" + trace_id + b"\x12\x08" + span_id
    if trace_state:
        out += _field(3, trace_state)
    if parent_id is not None:
        out += b"\x22\x08" + parent_id
    named = _NAMES.get((name, kind))
    if named is None:
        named = _NAMES[(name, kind)] = _text(5, name) + b"\x30" + varint(kind)
    out += named + _TIMES(0x39, start_ns, 0x41, end_ns) + span_attributes(attrs)
    if error:
        out += b"\x7a\x02\x18\x02"  # status (15): code (3) = ERROR
    return out


def export_request(
    resource: Mapping[str, AttributeValue], scope: tuple[str, str], spans: Iterable[bytes]
) -> bytes:
    """``ExportTraceServiceRequest`` for ``spans`` (each from ``span``)."""
    scope_spans = _field(1, _text(1, scope[0]) + _text(2, scope[1]))
    scope_spans += b"".join(_field(2, s) for s in spans)
    resource_spans = _field(1, attributes(1, resource)) + _field(2, scope_spans)
    return _field(1, resource_spans)
