"""W3C Trace Context (``traceparent``, ``tracestate``): pure parsing.

``traceparent: 00-<trace-id: 32 hex>-<parent-id: 16 hex>-<flags: 2 hex>``. A value is
valid when the version is not ``ff``, the ids are lower-case hex and not all zeros, and
a version-00 value has nothing after the flags (a later version may add fields after a
``-``). Whatever aiolb sends is version 00.
"""

from __future__ import annotations

import re
from typing import Final

_TRACEPARENT: Final = re.compile(
    rb"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\r\n]*)?[ \t]*"
)
_HEX: Final = b"0123456789abcdef"
_ZERO_TRACE: Final = b"0" * 32
_ZERO_SPAN: Final = b"0" * 16

SAMPLED: Final = 1


def parse_traceparent(value: bytes) -> tuple[bytes, bytes, int] | None:
    """``(trace_id_hex, parent_id_hex, flags)`` of a valid ``traceparent``, else None
    (then the request starts a new trace, and its ``tracestate`` is dropped)."""
    if len(value) == 55 and value[:3] == b"00-" and value[35:36] == value[52:53] == b"-":
        trace, parent, flags = value[3:35], value[36:52], value[53:]  # the common form
        if (
            (trace + parent + flags).translate(None, _HEX)
            or trace == _ZERO_TRACE
            or (parent == _ZERO_SPAN)
        ):
            return None
        return trace, parent, int(flags, 16)
    m = _TRACEPARENT.fullmatch(value)
    if m is None:
        return None
    version, trace, parent, flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):
        return None
    if trace == _ZERO_TRACE or parent == _ZERO_SPAN:
        return None
    return trace, parent, int(flags, 16)
