"""The access log format's grammar: the field names and ``$field`` templates.

``access_log.format`` is a list of field names (a JSON line with those keys) or a text
template in which ``$field`` or ``${field}`` stands for a value and ``$$`` for a dollar
sign. ``http_NAME`` is any request header by name, as nginx's ``$http_NAME`` (lower
case, ``_`` for ``-``: ``http_x_custom`` is ``X-Custom``). The config validates a
format with these; ``proxy.metrics.log_format`` compiles it into a line formatter and
holds each field's value expression, for exactly the names in ``FIELDS``.
"""

from __future__ import annotations

import re
from typing import Final

#: Every field a line can hold, less the ``http_NAME`` family.
FIELDS: Final = (
    "time", "client", "method", "path", "status", "bytes_in", "bytes_out", "duration_ms",
    "host", "user_agent", "listener", "pool", "upstream", "upstream_name", "attempts",
    "request_id", "upstream_status", "upstream_connect_time", "upstream_header_time",
    "referer", "trace_id", "grpc_status",
)  # fmt: skip
#: The default line: every field up to ``request_id`` but ``upstream_name`` (the address
#: says it already unless upstreams are named); the later ones are asked for by name.
DEFAULT_FIELDS: Final = tuple(
    name for name in FIELDS[: FIELDS.index("request_id") + 1] if name != "upstream_name"
)
#: ``http_NAME``: the request header NAME (``_`` for ``-``), as nginx's ``$http_NAME``.
HEADER_FIELD: Final = re.compile(r"http_[a-z0-9_]+")

_NAMES: Final = frozenset(FIELDS)
_VARIABLE: Final = re.compile(r"\$(?:\{([a-z_][a-z0-9_]*)\}|([a-z_][a-z0-9_]*)|(\$))")


def is_field(name: str) -> bool:
    """Whether a line can hold ``name``: one of ``FIELDS`` or ``http_NAME``."""
    return name in _NAMES or HEADER_FIELD.fullmatch(name) is not None


def parse_template(template: str) -> list[tuple[str, str | None]]:
    """``"$client $status"`` -> ``[("", "client"), (" ", "status"), ("", None)]``: each
    piece's literal text before it and its field (None for trailing text). Raises
    ValueError for an unknown field or a ``$`` that starts nothing (``$$`` is a dollar
    sign)."""
    pieces: list[tuple[str, str | None]] = []
    literal, at = "", 0
    for match in _VARIABLE.finditer(template):
        literal += template[at : match.start()]
        at = match.end()
        if match.group(3):
            literal += "$"
            continue
        name = match.group(1) or match.group(2)
        if not is_field(name):
            raise ValueError(f"unknown access log field ${name}; fields: {', '.join(FIELDS)}"
                             ", http_NAME")  # fmt: skip
        pieces.append((literal, name))
        literal = ""
    rest = template[at:]
    if "$" in rest.replace("$$", ""):
        raise ValueError(f"'$' at {template.index('$', at)} starts no field; write $$ for '$'")
    pieces.append((literal + rest, None))
    return pieces
