"""Token buckets for ``rate_limit``: the arithmetic, and two tables that keep buckets.

Theory of operation
-------------------
A bucket holds up to ``size`` tokens and gains ``rate`` tokens a second; a request
takes one or is refused. ``take`` is the whole rule as one pure function of the
bucket's state and the time: it returns the tokens *left* after the take, negative
when the request is refused (``-left / rate`` seconds until it would pass). The Redis
store runs the same rule in Lua (``proxy.filters.redis_store``).

A bucket that has filled up again is the same as no bucket, so a table forgets full
buckets at no cost to accuracy; that bounds memory whatever keys clients send.

- ``LocalBuckets``: a dict in one process (``workers: 1``). When it holds ``limit``
  buckets, the full ones are dropped, then (under an attack of many keys) the oldest.
- ``SharedBuckets``: with ``workers`` > 1, one table in shared memory (a ``memfd`` the
  supervisor creates and hands every worker), so that a limit holds for the instance
  as a whole. A key hashes (blake2b, the same in every process) to a group of 8 slots
  of ``(fingerprint, tokens, stamp, full_at)``; a POSIX record lock on the group's
  bytes (``fcntl.lockf``, released by the kernel if a worker dies holding it) makes
  each take atomic across processes. A slot is free when empty or full again; a
  group with no free slot gives up the one closest to full. ``time.monotonic`` is
  one clock for every process of the machine.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
from typing import Final

#: Buckets a table keeps (about 4 MiB shared, 32 bytes a slot).
SLOTS: Final = 131072
GROUP: Final = 8  # slots per group (one lock)
_SLOT: Final = struct.Struct("<Qddd")  # fingerprint, tokens, stamp, full_at
_GROUP_BYTES: Final = GROUP * _SLOT.size
_GROUP_STRUCT: Final = struct.Struct("<" + "Qddd" * GROUP)


def take(
    tokens: float, stamp: float, now: float, rate: float, size: float
) -> tuple[float, float, float]:
    """One request against a bucket that held ``tokens`` at ``stamp``: ``(left, held,
    stamp)``, ``left`` >= 0 when it passes (the tokens then left), < 0 when refused;
    ``held`` the tokens the bucket holds afterwards, as of the returned ``stamp``. A
    ``now`` before ``stamp`` (another process read the clock later but took the bucket
    first) counts as ``stamp``: the bucket's time never goes back, or the time between
    would be refilled twice."""
    if now > stamp:
        tokens = min(size, tokens + (now - stamp) * rate)
        stamp = now
    left = tokens - 1.0
    return left, left if left >= 0 else tokens, stamp


class LocalBuckets:
    """Buckets of one process, by key."""

    __slots__ = ("_buckets", "limit")

    def __init__(self, limit: int = SLOTS) -> None:
        self._buckets: dict[bytes, list[float]] = {}
        self.limit = limit

    def take(self, key: bytes, rate: float, size: float, now: float) -> float:
        """Take a token from ``key``'s bucket (made full if new); the tokens left (< 0:
        refused)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.limit:
                self._trim(now)
            self._buckets[key] = [size - 1.0, now, rate, size]
            return size - 1.0
        left, bucket[0], bucket[1] = take(bucket[0], bucket[1], now, rate, size)
        bucket[2], bucket[3] = rate, size
        return left

    def _trim(self, now: float) -> None:
        """Forget the buckets that are full again, then the oldest half if none was."""
        buckets = self._buckets
        full = [k for k, (t, s, r, size) in buckets.items() if t + (now - s) * r >= size]
        for key in full:
            del buckets[key]
        if len(buckets) >= self.limit:
            for key in list(buckets)[: len(buckets) // 2]:
                del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)

    def __repr__(self) -> str:
        return f"<LocalBuckets [{len(self._buckets)} of {self.limit}]>"


class SharedBuckets:
    """Buckets in shared memory, for every worker of an instance (see the module)."""

    __slots__ = ("_groups", "_map", "fd", "forced")

    def __init__(self, fd: int | None = None, slots: int = SLOTS) -> None:
        """A new table (``fd`` None: the supervisor's), or the one behind ``fd``."""
        if fd is None:
            fd = os.memfd_create("aiolb-rate-limit", os.MFD_CLOEXEC)
            os.ftruncate(fd, (slots // GROUP) * _GROUP_BYTES)
        self.fd = fd
        size = os.fstat(fd).st_size
        self._groups = size // _GROUP_BYTES
        self._map = mmap.mmap(fd, size)
        self.forced = 0  # live buckets given up for lack of room (this process)

    def take(self, key: bytes, rate: float, size: float, now: float) -> float:
        digest = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") or 1
        offset = (digest >> 17) % self._groups * _GROUP_BYTES
        fd = self.fd
        fcntl.lockf(fd, fcntl.LOCK_EX, _GROUP_BYTES, offset, os.SEEK_SET)
        try:
            return self._take(digest, offset, rate, size, now)
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, _GROUP_BYTES, offset, os.SEEK_SET)

    def _take(self, digest: int, offset: int, rate: float, size: float, now: float) -> float:
        values = _GROUP_STRUCT.unpack_from(self._map, offset)
        free = closest = -1
        soonest = float("inf")
        for i in range(GROUP):
            mark, tokens, stamp, full_at = values[4 * i : 4 * i + 4]
            if mark == digest:
                left, held, stamp = take(tokens, stamp, now, rate, size)
                self._store(offset, i, digest, held, stamp, rate, size)
                return left
            if free < 0 and (mark == 0 or full_at <= now):
                free = i
            elif full_at < soonest:
                closest, soonest = i, full_at
        if free < 0:
            free = closest
            self.forced += 1
        self._store(offset, free, digest, size - 1.0, now, rate, size)
        return size - 1.0

    def _store(
        self, offset: int, i: int, digest: int, held: float, now: float, rate: float, size: float
    ) -> None:
        full_at = now + (size - held) / rate
        _SLOT.pack_into(self._map, offset + i * _SLOT.size, digest, held, now, full_at)

    def close(self) -> None:
        self._map.close()

    def __repr__(self) -> str:
        return f"<SharedBuckets fd {self.fd} [{self._groups * GROUP} slots]>"
