"""A ketama hash ring: the shared core of ``consistent_hash`` and ``ip_hash``.

Theory of operation. Each upstream owns ``POINTS_PER_WEIGHT * weight`` points on a
circle of 2**32 positions (rounded to a multiple of 4). As in libketama, the points
come from MD5 digests of ``"<address>-<i>"``, four 32-bit little-endian points per
digest, so an upstream's points depend only on its own address and weight. A key
belongs to the first point clockwise from the key's hash: one bisection, O(log n).

Consequences that the tests pin down:

- removing an upstream moves only the keys it owned (to the next points clockwise,
  which is also "the next upstream on the ring" when one is unavailable: the pool
  builds the ring from available upstreams only);
- adding one to N moves about 1/(N+1) of the keys, all of them to the new one;
- shares follow weights to within a few percent (160 points per unit of weight);
- a slow-start ramp grows an upstream's points from a prefix of its final set, so
  keys only ever move *to* the upstream that is ramping up.

Keys are hashed with CRC32, as nginx's ``hash ... consistent`` does: fast, the same
in every worker process and across restarts (Python's ``hash()`` is neither).
"""

from __future__ import annotations

import hashlib
from bisect import bisect
from collections.abc import Sequence
from typing import Any
from zlib import crc32

POINTS_PER_WEIGHT = 160
_DIGEST_POINTS = 4  # an MD5 digest holds four 32-bit points


def upstream_points(address: str, weight: float) -> list[int]:
    """The ring positions owned by ``address`` at ``weight``."""
    digests = max(1, round(POINTS_PER_WEIGHT * weight / _DIGEST_POINTS))
    points: list[int] = []
    for i in range(digests):
        digest = hashlib.md5(f"{address}-{i}".encode(), usedforsecurity=False).digest()
        points.extend(int.from_bytes(digest[j : j + 4], "little") for j in range(0, 16, 4))
    return points


def key_hash(key: bytes) -> int:
    """The ring position of a request key."""
    return crc32(key)


class HashRing:
    """Sorted points and, in the same order, the upstream index owning each one."""

    __slots__ = ("_owners", "_points", "_targets")

    def __init__(self, upstreams: Sequence[Any], weights: Sequence[float]) -> None:
        self._targets = tuple(upstreams)
        pairs: list[tuple[int, str, Any]] = []
        for upstream, weight in zip(upstreams, weights, strict=True):
            address = upstream.address
            pairs.extend((p, address, upstream) for p in upstream_points(address, weight))
        pairs.sort(key=lambda pair: (pair[0], pair[1]))  # collisions: the same owner anywhere
        self._points = [p for p, _, _ in pairs]
        self._owners = tuple(u for _, _, u in pairs)

    def __len__(self) -> int:
        return len(self._points)

    def lookup(self, key: bytes) -> Any:
        """The owner of the first point clockwise from ``key``; the ring must not be empty."""
        i = bisect(self._points, crc32(key))
        return self._owners[i if i < len(self._owners) else 0]

    def __repr__(self) -> str:
        return f"<HashRing [{len(self._targets)} upstreams, {len(self._points)} points]>"
