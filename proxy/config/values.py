"""Parsers for the scalar values a config holds: durations, sizes and addresses.

Each parser takes what YAML produced (a number or a string) and returns the canonical
value or raises ``ValueError`` with a short message that the loader shows the user as
it is (after ``FILE:LINE: key.path:``). The models of ``proxy.config`` attach
them to fields; nothing here knows about pydantic.
"""

from __future__ import annotations

import ipaddress
import math
import re
from urllib.parse import urlsplit

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h)")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h))+")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_HELP = "use seconds or a string such as 250ms, 5s, 1.5s, 1m, 1h, 1m30s"

_SIZE = re.compile(rf"({_NUMBER})\s*([kmg](?:i?b)?|b)?", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
}  # fmt: skip


def parse_duration(value: object) -> float:
    """Seconds, as a finite float, from a number of seconds or a duration string.

    Strings are a number with a unit, ``ms``, ``s``, ``m`` or ``h`` (``250ms``, ``5s``,
    ``1.5s``, ``1m``, ``1h``), several such parts added up (``1m30s``), or a bare number
    of seconds (``"5"``). The sign is the field's business: timeouts require ``> 0``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"invalid duration {value!r}; {_DURATION_HELP}")
    seconds = float(value) if not isinstance(value, str) else _duration_seconds(value)
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {value!r}; must be finite")
    return seconds


def _duration_seconds(text: str) -> float:
    compact = text.strip().lower()
    if re.fullmatch(_NUMBER, compact):
        return float(compact)
    if not _DURATION.fullmatch(compact):
        raise ValueError(f"invalid duration {text!r}; {_DURATION_HELP}")
    parts = _DURATION_PART.findall(compact)
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """The shortest duration string ``parse_duration`` reads back as ``seconds``:
    ``0.25`` -> ``250ms``, ``30.0`` -> ``30s``, ``300.0`` -> ``5m``, ``1.5`` -> ``1.5s``."""
    if seconds == 0:
        return "0s"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    milliseconds = seconds * 1000
    if 0 < seconds < 1 and milliseconds == int(milliseconds):
        return f"{int(milliseconds)}ms"
    return f"{_decimal(seconds)}s"


def _decimal(number: float) -> str:
    """A float in plain decimal notation (``repr`` may use an exponent)."""
    text = repr(number)
    return text if "e" not in text else f"{number:.15f}".rstrip("0").rstrip(".")


def format_size(size: int) -> str | int:
    """``65536`` -> ``64KiB``, ``1048576`` -> ``1MiB``; other sizes stay a byte count."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return size


def parse_size(value: object) -> object:
    """A byte count from a size string; anything else but a bool is returned unchanged.

    The rule: a number, optionally followed by a unit, case-insensitive. ``k``, ``m``,
    ``g`` and ``KiB``, ``MiB``, ``GiB`` are powers of 1024 (nginx's ``8k`` means 8192);
    ``KB``, ``MB``, ``GB`` are powers of 1000 (SI); ``B`` or no unit means bytes. So
    ``64KiB`` = ``64k`` = 65536, ``10MB`` = 10000000, ``1g`` = 1073741824. Fractions are
    allowed and rounded down to whole bytes (``1.5k`` = 1536). The field checks the
    type and range of what is returned (an int, a number, or a rejected bool).
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}; use bytes or e.g. 64KiB, 8k, 10MB")
    if not isinstance(value, str):
        return value
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"invalid size {value!r}; use bytes or e.g. 64KiB, 8k, 1MiB, 10MB")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[(unit or "").lower()])


def split_host_port(text: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``, for addresses the proxy binds.

    IPv6 literals are bracketed and returned bare: ``"[::1]:8080"`` -> ``("::1", 8080)``.
    The port is 0..65535 (0 asks the system for a free port). Raises ``ValueError``.
    """
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {text!r}")
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"port must be a number 0..65535, got {port!r}")
    return _check_host(host, text), int(port)


def _check_host(host: str, text: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"invalid IPv6 address in {text!r}") from None
    if ":" in host:
        raise ValueError(f"IPv6 addresses need brackets, e.g. [::1]:8080, got {text!r}")
    if not host.isprintable() or any(c.isspace() or c in "/[]@" for c in host):
        raise ValueError(f"invalid host in {text!r}")
    return host


def format_address(host: str, port: int) -> str:
    """``("::1", 80)`` -> ``"[::1]:80"``; ``("a.example", 80)`` -> ``"a.example:80"``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_dns_url(url: str) -> bool:
    """``dns://name:port``: an upstream set that follows what ``name`` resolves to."""
    return url.strip()[:6].lower() == "dns://"


def is_https_url(url: str) -> bool:
    """``https://host:port``: an upstream the proxy talks TLS to."""
    return url.strip()[:8].lower() == "https://"


def parse_upstream_url(url: str) -> tuple[str, int]:
    """``"http://host:port"`` -> ``(host, port)``; ``"http://host"`` means port 80,
    ``"https://host"`` port 443.

    ``dns://name:port`` parses the same way (see ``is_dns_url``): one upstream per
    address ``name`` resolves to, on ``port``.

    A trailing ``/`` is allowed; any other path, a query, a fragment or credentials are
    refused: a url names a server, routes choose paths. The host comes back lower-case,
    IPv6 literals without brackets. Raises ``ValueError`` saying what is wrong.
    """
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid upstream url {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "dns") or not parts.hostname:
        raise ValueError(
            f"expected http://host:port, https://host:port or dns://name:port, got {url!r}"
        )
    if parts.path not in ("", "/"):
        raise ValueError(f"must be {scheme}://host:port without a path, got {url!r}")
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"must be just {scheme}://host:port, got {url!r}")
    if port == 0:
        raise ValueError(f"upstream port must be 1..65535, got {url!r}")
    if port is None:
        port = 443 if scheme == "https" else 80
    return parts.hostname, port
