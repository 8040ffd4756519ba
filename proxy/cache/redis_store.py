"""The Redis store: stored responses shared by every worker and instance on one Redis.

Layout, under ``key_prefix`` (``h``: the SHA-1 of the cache key; ``v``: of a variant):

- ``{p}k:h``: the cache key and the ``Vary`` names of its newest response, one per line
  (what a lookup needs first, and what ``purge`` by prefix reads);
- ``{p}s:h``: the set of variants stored for the key;
- ``{p}m:h:v``: an entry's head and times (JSON, ``Entry.meta``); ``{p}b:h:v``: its body.

A lookup is one round trip for a key that does not vary (the names and the entry of
the empty variant are fetched in one pipeline), two for one that does. A body is
written as it streams from the upstream: each chunk is APPENDed to a key of its own
(``{p}t:h:v:n``) by a writer that keeps only what Redis has not yet taken, so a
large body is never held whole (a writer that Redis falls ``MAX_BACKLOG`` behind gives
up: the response goes on uncached); ``commit`` renames it into place with the head, in one
transaction, and gives every key a TTL (the entry's lifetime plus ``keep_stale``). A
response cut short is never committed: its temporary key expires.

Redis failing (refused, slow beyond ``timeout``, an error) never fails a request: the
operation reports a miss or gives up storing, and the store's ``RedisCircuit`` counts
it, logs the start of the outage once and skips Redis for ``RETRY_AFTER``; then the
next request tries again, and a success logs the recovery.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from proxy.cache.entry import Entry
from proxy.cache.policy import variant
from proxy.redis_client import RedisCircuit, redis_client

log = logging.getLogger("aiolb")

#: A lookup fetches a body's first this many bytes with its head, in one round trip...
FIRST_PART: Final = 1024 * 1024
#: ...and gives the rest of a larger one time for at least this many bytes a second.
BULK_RATE: Final = 50 * 1024 * 1024
#: redis-py's read timeout for the cache's client (operations have their own).
READ_BACKSTOP: Final = 30.0
#: Invalidations remembered (for writes begun before them) before old ones are dropped.
FORGOTTEN_MAX: Final = 4096
#: A temporary body key outlives an unfinished write by this long at most.
TEMP_TTL: Final = 300
#: A body writer holds the upstream back (``hold(True)``) when Redis is this far behind
#: it, and lets it go on once Redis is within ``RESUME_AT``.
HOLD_AT: Final = 4 * 1024 * 1024
RESUME_AT: Final = 1024 * 1024
#: A writer gives up when Redis falls this far behind all the same (nothing to hold
#: back): the response goes on uncached rather than held in memory.
MAX_BACKLOG: Final = 32 * 1024 * 1024


def _digest(data: bytes) -> str:
    return hashlib.sha1(data, usedforsecurity=False).hexdigest()


class RedisStore(RedisCircuit):
    """Cache entries in Redis (redis-py's asyncio client, hiredis when installed)."""

    def __init__(
        self, url: str, key_prefix: str, keep_stale: float, timeout: float = 0.25
    ) -> None:
        self.url = url
        self.prefix = key_prefix
        self.keep_stale = keep_stale
        self.timeout = timeout
        # each operation has its own deadline (a large body's by its size): the socket's
        # read timeout is only a backstop
        self.client: Any = redis_client(url, timeout, read_timeout=READ_BACKSTOP)
        super().__init__()
        self._temp = itertools.count()
        #: whole entries being written (``put``), by key: this process serves them from
        #: here until Redis has them, so a hit right after a store finds what it stored
        self.pending: dict[bytes, list[Entry]] = {}
        #: keys being removed (``forget``): misses here until Redis has dropped them
        self.removing: dict[bytes, int] = {}
        #: key -> when (monotonic) it was last invalidated: a write begun before that is
        #: not committed, or removed again when it committed meanwhile
        self.forgotten: dict[bytes, float] = {}

    # -- health (RedisCircuit) ----------------------------------------------------------

    def outage_began(self, what: str, exc: BaseException) -> None:
        log.warning("cache store %s: %s failed (%s); requests bypass the cache until it "
                    "answers again", self.url, what, exc or type(exc).__name__)  # fmt: skip

    def outage_ended(self) -> None:
        log.warning("cache store %s answers again; caching resumed", self.url)

    # -- keys --------------------------------------------------------------------------

    def _keys(self, key: bytes) -> tuple[str, str, str]:
        """(names key, variants set key, the key's hash)."""
        h = _digest(key)
        return f"{self.prefix}k:{h}", f"{self.prefix}s:{h}", h

    def _entry_keys(self, h: str, v: str) -> tuple[str, str]:
        """(meta key, body key) of the variant ``v`` of the key hashed ``h``."""
        return f"{self.prefix}m:{h}:{v}", f"{self.prefix}b:{h}:{v}"

    # -- reading -----------------------------------------------------------------------

    async def get(self, key: bytes, request: Sequence[tuple[bytes, bytes]]) -> Entry | None:
        """The entry for ``key`` matching ``request``'s variant; None on a miss or when
        Redis fails."""
        if key in self.removing:
            return None
        for waiting in self.pending.get(key, ()):
            if (variant(request, waiting.vary) if waiting.vary else ()) == waiting.variant:
                return waiting
        started = time.monotonic()
        if started < self.down_until:  # skipped for a while after an error
            return None
        try:
            entry = await self._get(key, request)
        except Exception as exc:
            self.failed("a lookup", exc)
            return None
        self.worked(started)
        return entry

    async def _get(self, key: bytes, request: Sequence[tuple[bytes, bytes]]) -> Entry | None:
        """The lookup: within twice ``timeout`` for the names, the head and a body's first
        ``FIRST_PART`` bytes; the rest of a larger body gets time by its size."""
        names_key, _, h = self._keys(key)
        meta_key, body_key = self._entry_keys(h, _digest(b""))
        async with asyncio.timeout(self.timeout * 2):
            pipe = self.client.pipeline(transaction=False)
            pipe.get(names_key)
            _first_part(pipe, meta_key, body_key)
            record, meta, there, body, size = await pipe.execute()
            if record is None:
                return None
            stored_key, *names = bytes(record).split(b"\n")
            if stored_key != key:  # a SHA-1 collision: not ours
                return None
            vary = tuple(names)
            values = variant(request, vary) if vary else ()
            if vary:
                meta_key, body_key = self._entry_keys(h, _digest(b"\n".join(values)))
                pipe = self.client.pipeline(transaction=False)
                meta, there, body, size = await _first_part(pipe, meta_key, body_key).execute()
        if meta is None or not there:
            return None
        if size > len(body):  # a large body: the rest, at no less than BULK_RATE
            async with asyncio.timeout(self.timeout * 2 + size / BULK_RATE):
                rest = await self.client.getrange(body_key, len(body), -1)
            if len(body) + len(rest) != size:  # replaced meanwhile: not this entry's
                return None
            body = bytes(body) + bytes(rest)
        return Entry.restore(key, vary, values, json.loads(meta), bytes(body))

    # -- writing -----------------------------------------------------------------------

    def writer(self, key: bytes, vary: tuple[bytes, ...], values: tuple[bytes, ...],
               hold: Callable[[bool], None] | None = None) -> BodyWriter:  # fmt: skip
        """A writer for the body of ``key``'s response of this variant, as it streams
        (``hold``: stops and restarts what it streams from, see ``BodyWriter``)."""
        temp = f"{self.prefix}t:{_digest(key)}:{next(self._temp)}:{id(self):x}"
        return BodyWriter(self, key, vary, values, temp, hold)

    async def put(self, entry: Entry) -> None:
        """Store a whole entry (a 304's refresh, or a body already in memory); until
        Redis has it, ``get`` in this process finds it in ``pending``."""
        waiting = self.pending.setdefault(entry.key, [])
        waiting[:] = [e for e in waiting if e.variant != entry.variant] + [entry]
        try:
            writer = self.writer(entry.key, entry.vary, entry.variant)
            writer.append(entry.body)
            await writer.commit(entry)
        finally:
            waiting = self.pending.get(entry.key, [])
            if entry in waiting:
                waiting.remove(entry)
            if not waiting:
                self.pending.pop(entry.key, None)

    def forget(self, key: bytes) -> asyncio.Task[int]:
        """``remove`` in a task, ``key`` missing in this process from now on (not only
        once the task has run): an invalidation is seen by the very next request."""
        self.pending.pop(key, None)
        self.removing[key] = self.removing.get(key, 0) + 1
        now = time.monotonic()
        if len(self.forgotten) >= FORGOTTEN_MAX:  # keep the recent ones
            self.forgotten = {k: t for k, t in self.forgotten.items() if now - t < TEMP_TTL}
        self.forgotten[key] = now

        async def run() -> int:
            try:
                return await self.remove(key)
            finally:
                left = self.removing.get(key, 1) - 1
                if left:
                    self.removing[key] = left
                else:
                    self.removing.pop(key, None)

        return asyncio.get_running_loop().create_task(run())

    async def remove(self, key: bytes) -> int:
        """Drop every variant of ``key``; how many there were (0 when Redis fails)."""
        if not self.available:
            return 0
        names_key, set_key, h = self._keys(key)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout * 2):
                members = await self.client.smembers(set_key)
                keys = [names_key, set_key]
                for v in members:
                    keys += self._entry_keys(h, v.decode())
                await self.client.delete(*keys)
        except Exception as exc:
            self.failed("an invalidation", exc)
            return 0
        self.worked(started)
        return len(members)

    async def purge(self, prefix: bytes) -> int:
        """Drop every entry whose cache key starts with ``prefix``; how many."""
        return await self.purge_matching(lambda key: key.startswith(prefix))

    async def purge_matching(self, matches: Callable[[bytes], bool]) -> int:
        """Drop every entry whose cache key ``matches`` (a scan of the key records)."""
        found = 0
        async for name in self.client.scan_iter(match=f"{self.prefix}k:*", count=500):
            record = await self.client.get(name)
            key = bytes(record).split(b"\n", 1)[0] if record is not None else None
            if key is not None and matches(key):
                found += await self.remove(key)
        return found

    async def close(self) -> None:
        await self.client.aclose()


class BodyWriter:
    """Streams one response body into Redis: ``append`` as chunks arrive (never
    waits), ``commit`` once the body is complete, ``abort`` when it is not. When Redis
    falls ``HOLD_AT`` behind, ``hold(True)`` stops the upstream (back-pressure, as a
    slow client's does) and ``hold(False)`` restarts it once Redis has caught up."""

    __slots__ = ("backlog", "failed", "held", "hold", "key", "pending", "size", "started",
                 "store", "task", "temp", "values", "vary")  # fmt: skip

    def __init__(self, store: RedisStore, key: bytes, vary: tuple[bytes, ...],
                 values: tuple[bytes, ...], temp: str,
                 hold: Callable[[bool], None] | None = None) -> None:  # fmt: skip
        self.hold = hold
        self.held = False
        self.store = store
        self.key = key
        self.vary = vary
        self.values = values
        self.temp = temp
        self.started = time.monotonic()
        self.pending: list[bytes] = []
        self.backlog = 0  # bytes of ``pending``
        self.size = 0
        self.failed = False
        self.task: asyncio.Task[None] | None = None

    def append(self, chunk: bytes | memoryview) -> None:
        if self.failed:
            return
        self.pending.append(bytes(chunk))
        self.size += len(chunk)
        self.backlog += len(chunk)
        if self.backlog > HOLD_AT and not self.held and self.hold is not None:
            self.held = True
            self.hold(True)
        elif self.backlog > MAX_BACKLOG:  # held back, and still far behind: not stored
            self.abort()
            return
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send what is pending, one pipeline per batch, until nothing is."""
        client = self.store.client
        try:
            while self.pending:
                batch, size = self.pending, self.backlog
                self.pending, self.backlog = [], 0
                pipe = client.pipeline(transaction=False)
                for chunk in batch:
                    pipe.append(self.temp, chunk)
                pipe.expire(self.temp, TEMP_TTL)
                async with asyncio.timeout(self.store.timeout * 4 + size / BULK_RATE):
                    await pipe.execute()
                if self.held and self.backlog < RESUME_AT:
                    self.release()
        except Exception as exc:
            self.failed = True
            self.pending, self.backlog = [], 0
            self.store.failed("storing a body", exc)
            self.release()
        finally:
            self.task = None

    def release(self) -> None:
        """Let the upstream go on, if this writer held it back."""
        if self.held:
            self.held = False
            if self.hold is not None:
                self.hold(False)

    async def commit(self, entry: Entry) -> bool:
        """The body is complete: put it in place with ``entry``'s head. False when it
        could not be stored."""
        self.release()  # the body is all here: nothing more to hold back
        self.hold = None
        while self.task is not None and not self.failed:
            await self.task
        if self.pending and not self.failed:
            await self._flush()
        if self.failed or self.invalidated():
            return False
        store = self.store
        names_key, set_key, h = store._keys(self.key)
        v = _digest(b"\n".join(self.values))
        meta_key, body_key = store._entry_keys(h, v)
        ttl = max(1, int(entry.lifetime + store.keep_stale + 1))
        record = b"\n".join((self.key, *self.vary))
        started = time.monotonic()
        try:
            async with asyncio.timeout(store.timeout * 4):
                pipe = store.client.pipeline(transaction=True)
                if self.size:
                    pipe.rename(self.temp, body_key)
                else:
                    pipe.set(body_key, b"")
                pipe.set(meta_key, json.dumps(entry.meta()), ex=ttl)
                pipe.expire(body_key, ttl)
                pipe.set(names_key, record, ex=ttl)
                pipe.sadd(set_key, v).expire(set_key, ttl)
                await pipe.execute()
        except Exception as exc:
            store.failed("storing a response", exc)
            return False
        store.worked(started)
        if self.invalidated():  # while the transaction was on its way: not stored after all
            await store.remove(self.key)
            return False
        return True

    def invalidated(self) -> bool:
        """An unsafe request invalidated this key after this response was requested."""
        when = self.store.forgotten.get(self.key)
        return when is not None and when >= self.started

    def abort(self) -> None:
        """The body was cut short or grew too large: nothing is committed (the
        temporary key expires by itself)."""
        self.failed = True
        self.pending = []
        self.backlog = 0
        self.release()
        self.hold = None


def _first_part(pipe: Any, meta_key: str, body_key: str) -> Any:
    """Queue what a lookup needs of one entry: its head, whether its body is there
    (GETRANGE answers "" for a missing key too), the body's first part and its size."""
    return pipe.get(meta_key).exists(body_key).getrange(body_key, 0, FIRST_PART - 1).strlen(
        body_key)
