"""The memory store: stored responses in LRU order, bounded by bytes.

``entries`` is an ordered dict keyed by (cache key, variant) in least-recently-used
order (a hit moves its entry to the end); ``keys`` maps each cache key to the ``Vary``
names of its newest response and the variants stored for it. Get, put, evict and
remove are O(1) (remove: O(variants of the key)); ``purge`` by prefix scans the keys.
``size`` counts the heads, bodies and keys held (``Entry.size``); storing past
``max_size`` evicts from the least recently used end until it fits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from proxy.cache.entry import Entry
from proxy.cache.policy import variant

Slot = tuple[bytes, tuple[bytes, ...]]


class _Key:
    __slots__ = ("variants", "vary")

    def __init__(self, vary: tuple[bytes, ...]) -> None:
        self.vary = vary
        self.variants: set[tuple[bytes, ...]] = set()


class MemoryStore:
    __slots__ = ("entries", "evictions", "keys", "max_size", "size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self.evictions = 0
        self.entries: OrderedDict[Slot, Entry] = OrderedDict()
        self.keys: dict[bytes, _Key] = {}

    def get(self, key: bytes, request: Sequence[tuple[bytes, bytes]]) -> Entry | None:
        """The entry stored for ``key`` that matches ``request``'s variant (made the
        most recently used), or None."""
        known = self.keys.get(key)
        if known is None:
            return None
        slot = (key, variant(request, known.vary) if known.vary else ())
        entry = self.entries.get(slot)
        if entry is not None:
            self.entries.move_to_end(slot)
        return entry

    def put(self, entry: Entry) -> None:
        """Store ``entry`` (replacing its key's entry of the same variant, and all of
        the key's variants when the ``Vary`` names changed), then evict the least
        recently used until ``size`` fits. An entry larger than the store is not kept."""
        if entry.size > self.max_size:
            return
        known = self.keys.get(entry.key)
        if known is not None and known.vary != entry.vary:
            self.remove(entry.key)
        self._drop((entry.key, entry.variant))  # the one it replaces
        known = self.keys.get(entry.key)
        if known is None:
            known = self.keys[entry.key] = _Key(entry.vary)
        self.entries[(entry.key, entry.variant)] = entry
        known.variants.add(entry.variant)
        self.size += entry.size
        while self.size > self.max_size:
            slot = next(iter(self.entries))
            self._drop(slot)
            self.evictions += 1

    def remove(self, key: bytes) -> int:
        """Drop every variant of ``key``; how many there were."""
        known = self.keys.get(key)
        if known is None:
            return 0
        count = len(known.variants)
        for values in list(known.variants):
            self._drop((key, values))
        return count

    def purge(self, prefix: bytes) -> int:
        """Drop every entry whose key starts with ``prefix``; how many."""
        return self.purge_matching(lambda key: key.startswith(prefix))

    def purge_matching(self, matches: Callable[[bytes], bool]) -> int:
        """Drop every entry whose key ``matches``; how many."""
        return sum(self.remove(key) for key in [k for k in self.keys if matches(k)])

    def _drop(self, slot: Slot) -> None:
        entry = self.entries.pop(slot, None)
        if entry is None:
            return
        self.size -= entry.size
        known = self.keys[slot[0]]
        known.variants.discard(slot[1])
        if not known.variants:
            del self.keys[slot[0]]

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"<MemoryStore [{len(self.entries)} entries, {self.size}/{self.max_size} bytes]>"
