"""RFC 9111 for a shared cache, as pure functions of heads and times.

Theory of operation
-------------------
Nothing here does I/O or reads a clock: the cache layer passes the request and
response heads it has (``Head``: a status and ``(name, value)`` pairs of bytes, names
lower-case) and the times it recorded, and gets decisions back.

- ``Directives`` parses ``Cache-Control`` (every field line, comma-separated, names
  case-insensitive, values unquoted; a directive given twice keeps its first value).
  ``response_directives`` is what the cache goes by: a response's ``Surrogate-Control``
  directives for aiolb (untargeted, or ``;aiolb``), when it has any, replace its
  ``Cache-Control`` ones (Edge Architecture Specification 1.0, as Fastly and Varnish
  read it); the client still gets the ``Cache-Control``.
- ``storable`` answers RFC 9111 section 3 for a *shared* cache: ``no-store`` on either
  side, ``private``, a request with ``Authorization`` unless the response allows it
  (``public``, ``s-maxage``, ``must-revalidate``), ``Vary: *``, a status that is
  neither explicitly fresh nor heuristically cacheable all say no.
- ``lifetime`` is the freshness lifetime (4.2.1): ``s-maxage``, else ``max-age``, else
  ``Expires`` minus ``Date``; a heuristic lifetime (4.2.2) only when the cache is
  configured with ``default_ttl`` and the status is heuristically cacheable.
- ``current_age`` is 4.2.3's corrected age plus the time the entry has been resident.
- ``must_revalidate`` tells whether a stored response may be used without asking the
  origin (``no-cache`` on the response, or the request's ``no-cache`` / ``max-age`` /
  ``min-fresh`` and the entry's age), and ``stale_allowed`` the RFC 5861 windows
  (``stale-while-revalidate``, ``stale-if-error``) unless ``must-revalidate`` or
  ``proxy-revalidate`` forbid serving it stale.
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterable, Sequence
from typing import Final

Headers = Sequence[tuple[bytes, bytes]]

#: Statuses a cache may store with a heuristic lifetime (RFC 9110 15.1).
HEURISTIC_STATUSES: Final = frozenset((200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501))
#: Statuses this cache stores at all (206 needs range support, which it has not).
STORABLE_STATUSES: Final = frozenset(
    (200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 451, 501)
)
#: Methods whose success invalidates the stored responses of their target (4.4).
UNSAFE_METHODS: Final = frozenset((b"POST", b"PUT", b"DELETE", b"PATCH"))
#: Lifetimes are capped: nothing is considered fresh for longer than a year.
MAX_LIFETIME: Final = 365 * 86400.0
#: The device token of ``Surrogate-Control: max-age=60;aiolb``, and what the upstream
#: request says of this cache (``Surrogate-Capability: aiolb="Surrogate/1.0"``).
SURROGATE_TOKEN: Final = "aiolb"
SURROGATE_CAPABILITY: Final = (b"Surrogate-Capability", b": ", b'aiolb="Surrogate/1.0"', b"\r\n")


class Directives(dict[str, str | None]):
    """``Cache-Control`` directives: lower-case name -> value (None when it has none)."""

    @classmethod
    def of(cls, headers: Headers) -> Directives:
        found = cls()
        for name, value in headers:
            if name == b"cache-control":
                for part in _split_list(value):
                    found._take(part)
        return found

    @classmethod
    def surrogate(cls, headers: Headers) -> Directives:
        """The ``Surrogate-Control`` directives for this cache: those without a target
        and those targeted at ``SURROGATE_TOKEN`` (``max-age=60;aiolb``)."""
        found = cls()
        for name, value in headers:
            if name == b"surrogate-control":
                for part in _split_list(value):
                    part, _, target = part.partition(";")
                    if not target or target.strip().lower() == SURROGATE_TOKEN:
                        found._take(part)  # not for another device
        return found

    def _take(self, part: str) -> None:
        """One ``name[=value]`` member (a value unquoted); a name given twice keeps its
        first value."""
        key, eq, arg = part.partition("=")
        key = key.strip().lower()
        if key and key not in self:
            self[key] = arg.strip().strip('"') if eq else None

    @classmethod
    def of_request(cls, headers: Headers) -> Directives:
        """A request's directives; ``Pragma: no-cache`` counts as ``no-cache`` when
        there is no ``Cache-Control`` (HTTP/1.0 clients; RFC 7234 5.4)."""
        found = cls.of(headers)
        if not found and any(
            n == b"pragma" and b"no-cache" in v.lower() for n, v in headers
        ):
            found["no-cache"] = None
        return found

    def seconds(self, name: str) -> int | None:
        """A delta-seconds directive (``max-age=60``); None when absent or invalid."""
        value = self.get(name)
        if value is None or not value.isdigit():
            return None
        return int(value)


def response_directives(headers: Headers, surrogate: bool) -> Directives:
    """The directives a cache goes by for a response: with ``surrogate`` (the cache
    reads ``Surrogate-Control``), its directives for this cache when there are any;
    else ``Cache-Control``'s."""
    if surrogate:
        found = Directives.surrogate(headers)
        if found:
            return found
    return Directives.of(headers)


def _split_list(value: bytes) -> Iterable[str]:
    """The comma-separated members of a field value, keeping commas inside quotes."""
    text = value.decode("latin-1")
    if '"' not in text:
        yield from (part.strip() for part in text.split(",") if part.strip())
        return
    part, quoted = "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            if part.strip():
                yield part.strip()
            part = ""
        else:
            part += char
    if part.strip():
        yield part.strip()


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of ``name`` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def http_date(value: bytes | None) -> float | None:
    """An HTTP-date as a Unix time; None when absent or not a date (RFC 9110 5.6.7)."""
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
    except (ValueError, IndexError):
        return None
    if parsed is None:
        return None
    try:
        return float(email.utils.mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def vary_names(headers: Headers) -> tuple[bytes, ...] | None:
    """The request header names ``Vary`` lists, lower-case and sorted; None for ``*``."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"vary":
            for part in value.split(b","):
                token = part.strip().lower()
                if token == b"*":
                    return None
                if token:
                    names.add(token)
    return tuple(sorted(names))


def variant(request: Headers, names: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The values of ``names`` in ``request``, normalised (whitespace, joined lines):
    two requests with the same variant are served the same stored response."""
    values = []
    for name in names:
        found = [b" ".join(v.split()) for k, v in request if k == name]
        values.append(b", ".join(found))
    return tuple(values)


def storable(
    method: bytes,
    status: int,
    request_cc: Directives,
    response_cc: Directives,
    response: Headers,
    authorized: bool,
    heuristic: bool,
) -> str | None:
    """Why this response must not be stored (RFC 9111 3), or None when it may be.

    ``authorized``: the request carried ``Authorization``; ``heuristic``: the cache
    gives heuristically cacheable responses a default lifetime."""
    if method != b"GET":
        return "method"
    if status not in STORABLE_STATUSES:
        return "status"
    if "no-store" in request_cc or "no-store" in response_cc:
        return "no-store"
    if "private" in response_cc:
        return "private"
    if authorized and not (
        "public" in response_cc or "s-maxage" in response_cc or "must-revalidate" in response_cc
    ):
        return "authorization"
    if vary_names(response) is None:
        return "vary"
    explicit = (
        "public" in response_cc
        or "no-cache" in response_cc
        or response_cc.seconds("s-maxage") is not None
        or response_cc.seconds("max-age") is not None
        or header(response, b"expires") is not None
    )
    if not explicit and not (heuristic and status in HEURISTIC_STATUSES):
        return "no freshness"
    return None


def lifetime(
    status: int, response_cc: Directives, response: Headers, default_ttl: float | None
) -> float:
    """Seconds the response is fresh for, from when it was generated (RFC 9111 4.2.1)."""
    for name in ("s-maxage", "max-age"):
        seconds = response_cc.seconds(name)
        if seconds is not None:
            return min(float(seconds), MAX_LIFETIME)
        if name in response_cc:  # present but invalid: stale (4.2.1)
            return 0.0
    expires = header(response, b"expires")
    if expires is not None:
        when = http_date(expires)
        date = http_date(header(response, b"date"))
        if when is None or date is None:  # "0" and other invalid dates: already expired
            return 0.0 if when is None else max(0.0, when - (date or when))
        return min(max(0.0, when - date), MAX_LIFETIME)
    if default_ttl is not None and status in HEURISTIC_STATUSES:
        return default_ttl
    return 0.0


def initial_age(response: Headers, request_time: float, response_time: float) -> float:
    """The corrected initial age of a response received at ``response_time`` for a
    request sent at ``request_time`` (RFC 9111 4.2.3; Unix times). An ``Age`` that is
    not one non-negative integer (several lines, a list in one line, a fraction, a
    sign, anything else) makes the response as old as can be: it is never served as
    fresh. RFC 9111 5.1 would take a list's first member; a list means intermediaries
    disagree about the age, and erring towards the upstream never serves one too old."""
    date = http_date(header(response, b"date"))
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    ages = [value for name, value in response if name == b"age"]
    age = 0.0
    if ages:
        value = ages[0].strip()
        if len(ages) > 1 or not value.isdigit():
            return MAX_LIFETIME * 2
        age = float(value)
    corrected = age + (response_time - request_time)
    return max(apparent, corrected)


def current_age(
    response: Headers, request_time: float, response_time: float, now: float
) -> float:
    """The age at ``now`` of a response stored at ``response_time`` (RFC 9111 4.2.3)."""
    return initial_age(response, request_time, response_time) + (now - response_time)


def must_revalidate(
    request_cc: Directives, response_cc: Directives, age: float, fresh_for: float
) -> bool:
    """May a stored response of ``age`` seconds, fresh for ``fresh_for``, be used only
    after the origin confirms it? The response's ``no-cache``; the request's
    ``no-cache``, ``max-age`` and ``min-fresh``; and staleness, unless the request's
    ``max-stale`` accepts it (RFC 9111 4.2.4, 5.2.1)."""
    if "no-cache" in response_cc or "no-cache" in request_cc:
        return True
    max_age = request_cc.seconds("max-age")
    if max_age is not None and age > max_age:
        return True
    min_fresh = request_cc.seconds("min-fresh")
    if min_fresh is not None and fresh_for - age < min_fresh:
        return True
    return age >= fresh_for and not _max_stale_allows(request_cc, response_cc, age - fresh_for)


def _max_stale_allows(request_cc: Directives, response_cc: Directives, stale_for: float) -> bool:
    """The request's ``max-stale`` accepts this much staleness (never against the
    response's ``must-revalidate``/``proxy-revalidate``/``s-maxage``)."""
    if "max-stale" not in request_cc or _no_stale(response_cc):
        return False
    limit = request_cc.seconds("max-stale")
    return limit is None or stale_for <= limit


def _no_stale(response_cc: Directives) -> bool:
    return (
        "must-revalidate" in response_cc
        or "proxy-revalidate" in response_cc
        or "s-maxage" in response_cc
        or "no-cache" in response_cc
    )


def stale_allowed(response_cc: Directives, directive: str, stale_for: float) -> bool:
    """May a response stale for ``stale_for`` seconds be served under RFC 5861's
    ``directive`` (``stale-while-revalidate`` or ``stale-if-error``)?"""
    if _no_stale(response_cc):
        return False
    window = response_cc.seconds(directive)
    return window is not None and stale_for <= window
