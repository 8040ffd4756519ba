"""``consistent_hash``: a request key chooses its upstream on a ketama ring.

Option: ``key`` (required): ``header:NAME``, ``cookie:NAME``, ``query:NAME``, ``path`` or
``client_ip`` (the syntax is ``proxy.config.keys``; ``key_reader`` reads one from a
request, for this balancer and for the ``rate_limit`` and ``sticky`` filters).

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
from proxy.config.keys import parse_key

KeyFunc = Callable[[RequestView], bytes | None]


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


def key_reader(spec: str) -> KeyFunc:
    """The function that reads key ``spec`` from a request; ValueError if ``spec`` is
    not a key (``proxy.config.keys.parse_key``)."""
    kind, name = parse_key(spec)
    if kind == "path":
        return _path
    if kind == "client_ip":
        return _client_ip
    if kind == "header":
        return _header(name.lower().encode())
    return _cookie(name.encode()) if kind == "cookie" else _query(name.encode())


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
        self._key = key_reader(self._spec)
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
