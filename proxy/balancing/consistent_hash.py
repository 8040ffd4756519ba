"""``consistent_hash``: a request key chooses its upstream on a ketama ring.

Options: ``key`` (required), one of

==================  ===========================================================
``header:NAME``     the first value of request header NAME (case-insensitive)
``cookie:NAME``     the value of cookie NAME in the first ``Cookie`` header
``query:NAME``      the raw (not percent-decoded) value of query parameter NAME
``path``            the raw path of the request target, without the query
``client_ip``       the client address as ``ip_hash`` sees it
==================  ===========================================================

A request without the key, or with an empty value, is served in round-robin turn
(nginx hashes an empty string instead, which sends every key-less request to one
upstream). Only what the key needs is read: a header key never looks at the target,
a path key never at the headers. The ring (``proxy.balancing.ring``) gives each
upstream points in proportion to its weight; an unavailable upstream is not on the
ring, so its keys go to the next upstream clockwise and nobody else's keys move.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from proxy.balancing.base import RequestView, effective_weights
from proxy.balancing.ring import HashRing

KeyFunc = Callable[[RequestView], bytes | None]
KEY_FORMS = ("header:NAME", "cookie:NAME", "query:NAME", "path", "client_ip")
_BAD_NAME_CHARS = frozenset(" \t\r\n;,=&?#\"")


def _header(name: bytes) -> KeyFunc:
    def key(request: RequestView) -> bytes | None:
        return request.header(name)

    return key


def _cookie(name: bytes) -> KeyFunc:
    prefix = name + b"="

    def key(request: RequestView) -> bytes | None:
        cookies = request.header(b"cookie")
        if cookies is None or prefix not in cookies:
            return None
        for pair in cookies.split(b";"):
            pair = pair.strip()
            if pair.startswith(prefix):
                return pair[len(prefix) :].strip(b'"')
        return None

    return key


def _query(name: bytes) -> KeyFunc:
    prefix = name + b"="

    def key(request: RequestView) -> bytes | None:
        _, mark, query = request.target.partition(b"?")
        if not mark or prefix not in query:
            return None
        for pair in query.split(b"&"):
            if pair.startswith(prefix):
                return pair[len(prefix) :]
        return None

    return key


def _path(request: RequestView) -> bytes | None:
    return request.target.partition(b"?")[0]


def _client_ip(request: RequestView) -> bytes | None:
    return request.client_ip.encode()


def parse_key(spec: str) -> KeyFunc:
    """The key extractor for a ``key`` option; ValueError with the accepted forms if bad."""
    if spec == "path":
        return _path
    if spec == "client_ip":
        return _client_ip
    kind, colon, name = spec.partition(":")
    makers = {"header": _header, "cookie": _cookie, "query": _query}
    if not colon or kind not in makers:
        raise ValueError(f"{spec!r} is not a key; use one of {', '.join(KEY_FORMS)}")
    if not name or not name.isascii() or _BAD_NAME_CHARS.intersection(name):
        raise ValueError(f"{spec!r}: the {kind} name must be a non-empty ASCII token")
    raw = name.lower().encode() if kind == "header" else name.encode()
    return makers[kind](raw)


class ConsistentHash:
    """A ketama ring keyed by ``options["key"]``; round robin for requests without one."""

    __slots__ = ("_key", "_next", "_ring", "_spec", "_targets")

    def __init__(
        self,
        upstreams: Sequence[Any],
        options: Mapping[str, Any],
        weights: Sequence[float] | None = None,
    ) -> None:
        self._spec: str = options.get("key", "")
        self._key = parse_key(self._spec)
        self._targets = tuple(upstreams)
        self._ring = HashRing(upstreams, effective_weights(upstreams, weights))
        self._next = 0

    def pick(self, request: RequestView) -> Any | None:
        if not self._targets:
            return None
        key = self._key(request)
        if key:
            return self._ring.lookup(key)
        return self._fallback()

    def _fallback(self) -> Any:
        targets = self._targets
        i = self._next
        if i >= len(targets):
            i = 0
        self._next = i + 1
        return targets[i]

    def __repr__(self) -> str:
        return f"<ConsistentHash [key {self._spec}, {self._ring!r}, fallback next {self._next}]>"
