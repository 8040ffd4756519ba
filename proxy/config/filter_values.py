"""The values filter options hold: rates, header names and templates, address ranges.

Header values may use the request variables ``${client_ip}``, ``${request_id}`` and
``${host}`` (``$${`` is a literal ``${``); the loader leaves those names alone under
``filters`` and expands every other ``${VAR}`` from the environment as elsewhere.
``header_template`` splits a value into its text and variables, once, when the config
is validated; ``proxy.filters.headers`` fills them in per request.
"""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Annotated, Final, NamedTuple

from pydantic import BeforeValidator, PlainSerializer

from proxy.config import source
from proxy.config.base import Kind
from proxy.config.values import format_duration, parse_duration

#: What ``${NAME}`` may name in a header value (the request's own values); the loader
#: leaves them alone under ``filters``.
REQUEST_VARIABLES: tuple[str, ...] = source.REQUEST_VARIABLES
_TEMPLATE = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A character no header value or URL may hold.
CONTROL_CHARACTER: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class Rate(NamedTuple):
    """``requests`` per ``period`` seconds (``100/s``: ``Rate(100, 1)``)."""

    requests: float
    period: float

    @property
    def per_second(self) -> float:
        return self.requests / self.period

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.period) or format_duration(self.period)
        count = int(self.requests) if self.requests == int(self.requests) else self.requests
        return f"{count}/{unit}"


_RATE_HELP = "use requests per period such as 100/s, 600/m, 5/10s"


def parse_rate(value: object) -> Rate:
    """``100/s``, ``10/m``, ``1000/h``, ``5/10s`` (nginx's ``r/s`` spelling too)."""
    if isinstance(value, Rate | tuple) and len(value) == 2:  # the dumped form
        return Rate(float(value[0]), float(value[1]))
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"invalid rate {value!r}; {_RATE_HELP}")
    count_text, _, period_text = value.strip().partition("/")
    count_text = count_text.strip().removesuffix("r")
    period_text = period_text.strip()
    try:
        count = float(count_text)
        period = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(period_text) or parse_duration(
            period_text
        )
    except ValueError:
        raise ValueError(f"invalid rate {value!r}; {_RATE_HELP}") from None
    if not (count > 0 and math.isfinite(count) and period > 0):
        raise ValueError(f"invalid rate {value!r}; count and period must be > 0")
    return Rate(count, period)


#: Requests per period: ``100/s``, ``600/m``, ``5/10s``.
RateValue = Annotated[
    Rate, BeforeValidator(parse_rate), PlainSerializer(str), Kind("rate")
]


def check_header_name(name: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    return name


def header_template(value: str) -> list[tuple[bool, str]]:
    """``value`` as pieces ``(is_variable, text)``; ValueError for an unknown variable or
    a character a header value cannot hold."""
    if CONTROL_CHARACTER.search(value):
        raise ValueError(f"header value {value!r} holds a control character")
    pieces: list[tuple[bool, str]] = []
    at = 0
    for match in _TEMPLATE.finditer(value):
        escaped, name = match.groups()
        pieces.append((False, value[at : match.start()]))
        if escaped:
            pieces.append((False, match.group(0)[1:]))
        elif name in REQUEST_VARIABLES:
            pieces.append((True, name))
        else:
            known = ", ".join(f"${{{v}}}" for v in REQUEST_VARIABLES)
            raise ValueError(f"unknown variable ${{{name}}}; use {known}")
        at = match.end()
    pieces.append((False, value[at:]))
    return [piece for piece in pieces if piece[0] or piece[1]]


def _cidr(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"invalid address range {value!r}; use 10.0.0.0/8, 192.0.2.7 or ::1/128")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(
            f"invalid address range {value!r}; use 10.0.0.0/8, 192.0.2.7 or ::1/128"
        ) from None


#: An address range: ``10.0.0.0/8``, ``2001:db8::/32``; a bare address is one host.
Cidr = Annotated[str, BeforeValidator(_cidr), Kind("address range")]


def check_path(value: str) -> str:
    """``value`` if it is a path (``/``, printable ASCII, no spaces); else ValueError."""
    if not value.startswith("/") or not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"must be a path starting with '/', got {value!r}")
    return value
