"""Access log line formats: a list of fields (JSON) or a ``$field`` template (text).

Theory of operation
-------------------
``access_log.format`` is turned, once, into one Python function that formats a whole
line with a single f-string, the way ``collections.namedtuple`` builds its methods:
the generated source holds only the expressions of the table below (our code) and
references ``_0``, ``_1``, ... for the literal text between them, which is passed in
as data, so nothing an operator writes in the config is ever compiled. The default
JSON line costs what the hand-written f-string it replaced cost.

JSON lines quote what a client chose (path, host, user agent, request id) with
``json.dumps`` unless it is plain printable ASCII; text lines escape ``"``, ``\\`` and
bytes outside printable ASCII as ``\\xHH`` (nginx's ``escape=default``) and show a
missing value as ``-``.

``http_NAME`` is any request header by name, as nginx's ``$http_NAME`` (lower case,
``_`` for ``-``: ``http_x_custom`` is ``X-Custom``); the header's name is passed in as
data too. Fields about the upstream's answer (``upstream_status``, its times) and
``grpc_status`` read the exchange (``ex``), and only when a format names them. The
grammar (the field names, templates) is ``proxy.config.log_fields``, which the config
validates formats with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from proxy.config.log_fields import parse_template

if TYPE_CHECKING:
    from proxy.metrics.source import PoolRef, UpstreamRef

#: The arguments of ``AccessLog.record``, in order: what a formatter is called with.
ARGUMENTS: Final = (
    "now", "client", "method", "target", "status", "bytes_in", "bytes_out", "seconds",
    "attempts", "request_id", "host", "headers", "listener", "pool", "upstream", "ex",
)  # fmt: skip

# field -> (JSON value expression, whether the JSON value needs quotes around it,
#           text value expression); ``:spec`` after the expression is a format spec.
# The keys are ``proxy.config.log_fields.FIELDS``, in that order (a test checks it).
_FIELDS: Final = {
    "time": ("timestamp(now)", True, "timestamp(now)"),
    "client": ("client", True, "client"),
    "method": ("method.decode('latin-1')", True, "method.decode('latin-1')"),
    "path": ("quote(target)", False, "escape(target)"),
    "status": ("status", False, "status"),
    "bytes_in": ("bytes_in", False, "bytes_in"),
    "bytes_out": ("bytes_out", False, "bytes_out"),
    "duration_ms": ("seconds * 1000:.3f", False, "seconds * 1000:.3f"),
    "host": ("quote_or_null(host)", False, "escape_or_dash(host)"),
    "user_agent": ("quote_or_null(user_agent(headers))", False,
                   "escape_or_dash(user_agent(headers))"),
    "listener": ("listener", True, "listener"),
    "pool": ("pool_name(pool)", True, "pool_name(pool) or '-'"),
    "upstream": ("quote_text(upstream_address(upstream))", False,
                 "upstream_address(upstream) or '-'"),
    "upstream_name": ("quote_text(upstream_name(upstream))", False,
                      "upstream_name(upstream) or '-'"),
    "attempts": ("attempts", False, "attempts"),
    "request_id": ("quote(request_id)", False, "escape(request_id)"),
    "upstream_status": ("or_null(upstream_status(ex))", False,
                        "or_dash(upstream_status(ex))"),
    "upstream_connect_time": ("or_null(connect_time(ex))", False,
                              "or_dash(connect_time(ex))"),
    "upstream_header_time": ("or_null(header_time(ex))", False, "or_dash(header_time(ex))"),
    "referer": ("quote_or_null(header(headers, b'referer'))", False,
                "escape_or_dash(header(headers, b'referer'))"),
    "trace_id": ("quote_or_null(trace_id(ex))", False, "escape_or_dash(trace_id(ex))"),
    "grpc_status": ("or_null(grpc_status(ex))", False, "or_dash(grpc_status(ex))"),
}  # fmt: skip

_ESCAPE: Final = re.compile(r'["\\\x00-\x1f\x7f-\xff]')

Formatter = Callable[..., str]


def _field(name: str, namespace: dict[str, object]) -> tuple[str, bool, str]:
    """``_FIELDS[name]``, or the expressions of an ``http_NAME`` field (its header name
    goes into ``namespace``, as data)."""
    if name in _FIELDS:
        return _FIELDS[name]
    key = f"_h{len(namespace)}"
    namespace[key] = name[5:].replace("_", "-").encode("ascii")
    value = f"header(headers, {key})"
    return f"quote_or_null({value})", False, f"escape_or_dash({value})"


def compile_format(spec: str | tuple[str, ...], timestamp: Callable[[float], str]) -> Formatter:
    """The line formatter for ``access_log.format``: called with ``ARGUMENTS``, it
    returns the line with its newline. ``timestamp(now)`` formats the ``time`` field."""
    namespace: dict[str, object] = {**_HELPERS, "timestamp": timestamp}
    if isinstance(spec, str):
        pieces = [(lit, None if name is None else _field(name, namespace)[2])
                  for lit, name in parse_template(spec)]  # fmt: skip
    else:
        pieces = []
        fields = [_field(name, namespace) for name in spec]
        for i, name in enumerate(spec):
            expression, quoted, _ = fields[i]
            opening = ("{" if i == 0 else ",") + json.dumps(name) + ":" + ('"' if quoted else "")
            if i and fields[i - 1][1]:
                opening = '"' + opening
            pieces.append((opening, expression))
        pieces.append(('"}' if spec and fields[-1][1] else "}", None))
    return _build(pieces, namespace)


def _build(pieces: list[tuple[str, str | None]], namespace: dict[str, object]) -> Formatter:
    """One function: literal ``_i`` then expression, for every piece, then a newline."""
    source = ""
    for i, (literal, expression) in enumerate(pieces):
        namespace[f"_{i}"] = literal
        source += f"{{_{i}}}" + (f"{{{expression}}}" if expression is not None else "")
    code = f'lambda {", ".join(ARGUMENTS)}: f"{source}\\n"'
    formatter: Formatter = eval(code, namespace)
    return formatter


def quote(value: bytes) -> str:
    """A JSON string for bytes a client chose; plain printable ASCII skips ``json.dumps``.

    (Methods need no quoting: the parser accepts only token characters there.)
    """
    return quote_text(value.decode("latin-1"))


def quote_text(text: str) -> str:
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text)


def quote_or_null(value: bytes | None) -> str:
    return "null" if value is None else quote(value)


def escape(value: bytes) -> str:
    """Text-line form of client bytes: ``"``, ``\\`` and non-printable bytes as ``\\xHH``."""
    text = value.decode("latin-1")
    return _ESCAPE.sub(lambda m: f"\\x{ord(m.group()):02X}", text)


def escape_or_dash(value: bytes | None) -> str:
    return "-" if value is None else escape(value)


def user_agent(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The ``User-Agent`` value of a parsed header list (looked up only when logged)."""
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"user-agent":
            return value
    return None


def header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    """The first value of the header ``wanted`` (lower case); several: joined by ``, ``."""
    found = [value for name, value in headers
             if len(name) == len(wanted) and name.lower() == wanted]  # fmt: skip
    return b", ".join(found) if found else None


def upstream_status(ex: Any) -> int | None:
    """The status the upstream answered with (None: the proxy answered by itself)."""
    if ex is None or ex.upstream is None or not ex.resp_started:
        return None
    return int(ex.status)


def connect_time(ex: Any) -> str | None:
    """Seconds to open the upstream connection (nginx's ``$upstream_connect_time``):
    0.000 when a pooled one was reused; None when none was used."""
    seconds = getattr(ex, "connect_seconds", None)
    if seconds is None:
        return "0.000" if upstream_status(ex) is not None else None
    return f"{seconds:.3f}"


def header_time(ex: Any) -> str | None:
    """Seconds from the start of the (last) attempt to the upstream's response head
    (nginx's ``$upstream_header_time``); None when no head came."""
    at = getattr(ex, "header_at", None)
    return None if at is None else f"{at - ex.tried_at:.3f}"


def or_null(value: object) -> object:
    return "null" if value is None else value


def or_dash(value: object) -> object:
    return "-" if value is None else value


def pool_name(pool: PoolRef | None) -> str:
    return pool.name if pool is not None else ""


def upstream_address(upstream: UpstreamRef | None) -> str:
    return upstream.address if upstream is not None else ""


def upstream_name(upstream: UpstreamRef | None) -> str:
    return upstream.name if upstream is not None else ""


def trace_id(ex: Any) -> bytes | None:
    """The trace id (32 hex digits) of the ``traceparent`` sent upstream, or None."""
    trace_id: bytes = getattr(ex, "trace_id", b"")
    return trace_id or None


def grpc_status(ex: Any) -> int | None:
    """The ``grpc-status`` a gRPC call ended with, as the client got it; None: not a
    gRPC call, or none came (the call was cut short)."""
    code: int = getattr(ex, "grpc_status", -1)
    return code if code >= 0 else None


_HELPERS: Final = {
    "quote": quote,
    "quote_text": quote_text,
    "quote_or_null": quote_or_null,
    "escape": escape,
    "escape_or_dash": escape_or_dash,
    "user_agent": user_agent,
    "header": header,
    "upstream_status": upstream_status,
    "connect_time": connect_time,
    "header_time": header_time,
    "or_null": or_null,
    "or_dash": or_dash,
    "pool_name": pool_name,
    "upstream_address": upstream_address,
    "upstream_name": upstream_name,
    "trace_id": trace_id,
    "grpc_status": grpc_status,
}
