"""A route's conditions beyond host and path prefix, compiled once per config.

Theory of operation
-------------------
``Conditions`` is built from a route's ``match`` (``proxy.config.listeners.MatchSpec``)
when the router is built: methods become a frozenset of bytes, regexes are compiled
once (as bytes patterns, checked safe by ``proxy.config.routing.safe_regex``: at most
quadratic, and a quadratic one is tried only on values up to ``QUADRATIC_LIMIT``), and the
checks are put in order of cost: the method, the exact path, headers by exact value or
presence, query parameters, then the regexes. A lookup makes one ``Facts`` for the
request, which reads the header map and the query parameters only when a check first
asks for them, once for all the routes it tries. A router whose routes have no such
conditions never builds any of this (``Router``'s plain loop).

Headers are looked up by lower-case name; repeated lines are joined with ``, ``
(RFC 9110 5.3). Query parameters are percent-decoded (``+`` is a space, as an HTML
form sends it); the first occurrence of a repeated one counts, and a pair that is not
valid percent-encoding is skipped (absent), never an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Final, Protocol
from urllib.parse import unquote_to_bytes

from proxy.config.routing import QUADRATIC_LIMIT, degree

#: A ``%`` not followed by two hex digits: the pair is not valid percent-encoding.
_BAD_ESCAPE: Final = re.compile(rb"%(?![0-9A-Fa-f]{2})")


class Subject(Protocol):
    """What the conditions read of a request (an ``Exchange``)."""

    method: bytes
    headers: list[tuple[bytes, bytes]]


class Facts:
    """One request as the conditions see it; the header map and the query parsed on
    first use, then shared by every route the lookup tries."""

    __slots__ = ("_headers", "_query", "method", "path", "query", "raw_headers")

    def __init__(self, subject: Subject, target: bytes) -> None:
        self.method = subject.method
        path, _, query = target.partition(b"?")
        self.path = path
        self.query = query
        self.raw_headers = subject.headers
        self._headers: dict[bytes, bytes] | None = None
        self._query: dict[bytes, bytes] | None = None

    def headers(self) -> dict[bytes, bytes]:
        found = self._headers
        if found is None:
            found = self._headers = {}
            for name, value in self.raw_headers:
                key = name.lower()
                seen = found.get(key)
                found[key] = value if seen is None else seen + b", " + value
        return found

    def params(self) -> dict[bytes, bytes]:
        found = self._query
        if found is None:
            found = self._query = parse_query(self.query)
        return found


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """The decoded parameters of a query string, the first occurrence of each; pairs
    that are not valid percent-encoding are skipped."""
    out: dict[bytes, bytes] = {}
    if not query:
        return out
    for pair in query.split(b"&"):
        if not pair:
            continue
        if b"%" in pair and _BAD_ESCAPE.search(pair) is not None:
            continue
        name, _, value = pair.replace(b"+", b" ").partition(b"=")
        if b"%" in name:
            name = unquote_to_bytes(name)
        if b"%" in value:
            value = unquote_to_bytes(value)
        if name not in out:
            out[name] = value
    return out


Check = Callable[[Facts], bool]


def _methods(allowed: frozenset[bytes]) -> Check:
    return lambda facts: facts.method in allowed


def _path(path: bytes) -> Check:
    return lambda facts: facts.path == path


def _limit(pattern: str) -> int:
    """The longest value ``pattern`` is tried on: a quadratic one (``degree`` 2) only
    on values up to ``QUADRATIC_LIMIT``, so a hostile value costs at most a few ms."""
    return QUADRATIC_LIMIT if degree(pattern) > 1 else 1 << 62


def _path_regex(pattern: str) -> Check:
    search = re.compile(pattern.encode()).search
    limit = _limit(pattern)
    return lambda facts: len(facts.path) <= limit and search(facts.path) is not None


def _header_value(name: bytes, value: bytes) -> Check:
    return lambda facts: facts.headers().get(name) == value


def _header_present(name: bytes, present: bool) -> Check:
    return lambda facts: (name in facts.headers()) is present


def _header_regex(name: bytes, pattern: str) -> Check:
    search = re.compile(pattern.encode()).search
    limit = _limit(pattern)

    def check(facts: Facts) -> bool:
        value = facts.headers().get(name)
        return value is not None and len(value) <= limit and search(value) is not None

    return check


def _query(name: bytes, value: bytes) -> Check:
    return lambda facts: facts.params().get(name) == value


#: What a header condition may be: an exact value, ``("regex", pattern)`` or
#: ``("present", bool)``.
HeaderRule = str | tuple[str, str | bool]


class Conditions:
    """A route's extra conditions; ``matches`` is true when every one holds."""

    __slots__ = ("_checks", "_text")

    def __init__(
        self,
        methods: Iterable[str] | None = None,
        headers: Mapping[str, HeaderRule] | None = None,
        query: Mapping[str, str] | None = None,
        path: str | None = None,
        path_regex: str | None = None,
    ) -> None:
        """Compile the conditions, cheapest first: methods, the exact path, headers by
        value or presence, query parameters, then the regexes."""
        cheap: list[Check] = []
        costly: list[Check] = []
        text: list[str] = []
        if methods is not None:
            cheap.append(_methods(frozenset(m.encode() for m in methods)))
            text.append("methods")
        if path is not None:
            cheap.append(_path(path.encode()))
            text.append("path")
        for name, rule in (headers or {}).items():
            key = name.lower().encode()
            if isinstance(rule, str):
                cheap.append(_header_value(key, rule.encode("latin-1", "replace")))
            elif rule[0] == "present":
                cheap.append(_header_present(key, bool(rule[1])))
            else:
                costly.append(_header_regex(key, str(rule[1])))
            text.append(f"header {name}")
        for name, value in (query or {}).items():
            cheap.append(_query(name.encode(), value.encode()))
            text.append(f"query {name}")
        if path_regex is not None:
            costly.insert(0, _path_regex(path_regex))
            text.append("path_regex")
        self._checks = tuple(cheap + costly)
        self._text = ", ".join(text)

    def matches(self, facts: Facts) -> bool:
        for check in self._checks:  # noqa: SIM110 (a loop: all() builds a generator)
            if not check(facts):
                return False
        return True

    def __repr__(self) -> str:
        return f"<Conditions [{self._text}]>"
