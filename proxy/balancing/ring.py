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
import struct
from bisect import bisect
from collections.abc import Sequence
from typing import Any
from zlib import crc32

POINTS_PER_WEIGHT = 160
_DIGEST_POINTS = 4  # an MD5 digest holds four 32-bit points
_FOUR_POINTS = struct.Struct("<4I").unpack
_OWNER_BITS = 16  # a mark is ``point << 16 | owner``: one sortable, bisectable int
_OWNER_MASK = (1 << _OWNER_BITS) - 1


def upstream_points(address: str, weight: float) -> list[int]:
    """The ring positions owned by ``address`` at ``weight``."""
    digests = max(1, round(POINTS_PER_WEIGHT * weight / _DIGEST_POINTS))
    points: list[int] = []
    for i in range(digests):
        digest = hashlib.md5(f"{address}-{i}".encode(), usedforsecurity=False).digest()
        points.extend(_FOUR_POINTS(digest))
    return points


def key_hash(key: bytes) -> int:
    """The ring position of a request key."""
    return crc32(key)


class HashRing:
    """Sorted marks (``point << 16 | owner``) over upstreams ranked by address.

    Ranking by address makes the ring independent of the order upstreams are listed
    in, down to which owner wins the (rare) exact collision of two points.
    """

    __slots__ = ("_marks", "_targets")

    def __init__(self, upstreams: Sequence[Any], weights: Sequence[float]) -> None:
        if len(upstreams) > _OWNER_MASK:
            raise ValueError(f"a hash ring holds at most {_OWNER_MASK} upstreams")
        ranked = sorted(zip(upstreams, weights, strict=True), key=lambda pair: pair[0].address)
        self._targets = tuple(upstream for upstream, _ in ranked)
        marks: list[int] = []
        for owner, (upstream, weight) in enumerate(ranked):
            points = upstream_points(upstream.address, weight)
            marks.extend([point << _OWNER_BITS | owner for point in points])
        marks.sort()
        self._marks = marks

    def __len__(self) -> int:
        return len(self._marks)

    def lookup(self, key: bytes) -> Any:
        """The owner of the first point clockwise from ``key``; the ring must not be empty."""
        marks = self._marks
        i = bisect(marks, crc32(key) << _OWNER_BITS | _OWNER_MASK)
        return self._targets[(marks[i] if i < len(marks) else marks[0]) & _OWNER_MASK]

    def __repr__(self) -> str:
        return f"<HashRing [{len(self._targets)} upstreams, {len(self._marks)} points]>"
