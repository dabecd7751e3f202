"""Bounded write-back caches for qcow2 metadata (L2 slices, refcount blocks):
QEMU's ``qcow2-cache.c``.

Each cache maps the host offset of a table (or of an L2 slice) to a decoded
value.  Entries are kept in LRU order; ``capacity`` bounds the number of
entries, except that entries pinned by an operation in progress, and dirty
entries while no writer holds the image lock, are never evicted.

Write-back ordering follows QEMU's scheme (restated from its design, not its
code):

* ``depends``: before any entry of this cache is written, every dirty entry
  of the other cache is written and the file is synced (for example, an L2
  entry that points at a new cluster may only reach the disk after the
  refcount that accounts for it).
* ``depends_on_flush``: before any entry is written, the file is synced
  (data written into new clusters reaches the disk before the L2 entry that
  points at it).

Concurrency contract: reads may call :meth:`MetadataCache.get` at any time
(they only ever evict clean entries); anything that dirties an entry or
writes one back (``mark_dirty``, ``write_entry``, ``write_all``, ``flush``,
``trim``, ``set_dependency``) must run under the image's metadata lock, so
that a write-back always sees a consistent state.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class CacheEntry(Generic[T]):
    """One cached table (or slice)."""

    __slots__ = ("dirty", "key", "pins", "value")

    def __init__(self, key: int, value: T, dirty: bool = False) -> None:
        self.key = key
        self.value = value
        self.dirty = dirty
        self.pins = 0


class MetadataCache(Generic[T]):
    """An LRU write-back cache of decoded metadata tables."""

    __slots__ = ("_generation", "_load", "_loading", "_serialize", "_store", "_sync",
                 "capacity", "depends", "depends_on_flush", "entries", "hits", "misses",
                 "name")

    def __init__(
        self,
        name: str,
        capacity: int,
        load: Callable[[int], Awaitable[T]],
        store: Callable[[int, bytes], Awaitable[None]],
        serialize: Callable[[T], bytes],
        sync: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self.capacity = max(1, capacity)
        self._load = load
        self._store = store
        self._serialize = serialize
        self._sync = sync
        self.entries: OrderedDict[int, CacheEntry[T]] = OrderedDict()
        self._loading: dict[int, asyncio.Future[CacheEntry[T]]] = {}
        self.depends: MetadataCache[Any] | None = None
        self.depends_on_flush = False
        self._generation = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.entries)

    # --- lookups ---------------------------------------------------------------------

    def lookup(self, key: int) -> CacheEntry[T] | None:
        """The cached entry for ``key`` (made most recently used), or None."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
        return entry

    async def get(self, key: int) -> CacheEntry[T]:
        """The entry for ``key``, loading it from disk if needed."""
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.hits += 1
            return entry
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        self.misses += 1
        generation = self._generation
        fut: asyncio.Future[CacheEntry[T]] = asyncio.get_running_loop().create_future()
        self._loading[key] = fut
        try:
            value = await self._load(key)
        except BaseException as exc:
            if self._loading.get(key) is fut:
                del self._loading[key]
            if not fut.done():
                if isinstance(exc, asyncio.CancelledError):
                    fut.cancel()
                else:
                    fut.set_exception(exc)
                    fut.exception()  # mark retrieved: waiters, if any, re-raise it
            raise
        if self._loading.get(key) is fut:
            del self._loading[key]
        existing = self.entries.get(key)
        if existing is not None or generation != self._generation:
            # Someone created the table meanwhile (a fresh allocation) or the
            # cache was dropped: never let a stale load replace it.
            result = existing if existing is not None else CacheEntry(key, value)
        else:
            result = CacheEntry(key, value)
            self.entries[key] = result
            self._evict_clean(key)
        fut.set_result(result)
        return result

    def insert(self, key: int, value: T, dirty: bool) -> CacheEntry[T]:
        """Put a freshly created table into the cache (replacing any old entry)."""
        entry = CacheEntry(key, value, dirty)
        self.entries[key] = entry
        self.entries.move_to_end(key)
        self._evict_clean(key)
        return entry

    def drop(self, key: int) -> None:
        """Forget ``key`` (the table was freed); a dirty entry is discarded."""
        self.entries.pop(key, None)

    def clear(self) -> None:
        """Forget everything (cache invalidation); in-flight loads are not inserted."""
        self.entries.clear()
        self._loading.clear()
        self._generation += 1
        self.depends = None
        self.depends_on_flush = False

    def _evict_clean(self, keep: int) -> None:
        """Evict clean, unpinned entries (never ``keep``, the one just added)."""
        excess = len(self.entries) - self.capacity
        if excess <= 0:
            return
        victims = []
        for key, entry in self.entries.items():
            if not entry.dirty and not entry.pins and key != keep:
                victims.append(key)
                if len(victims) >= excess:
                    break
        for key in victims:
            del self.entries[key]

    # --- write-back (under the image lock) ------------------------------------------

    def mark_dirty(self, entry: CacheEntry[T]) -> None:
        entry.dirty = True

    async def set_dependency(self, dependency: MetadataCache[Any]) -> None:
        """Entries of this cache must not reach the disk before ``dependency``'s."""
        if dependency.depends is not None:
            await dependency.flush_dependency()
        if self.depends is not None and self.depends is not dependency:
            await self.flush_dependency()
        self.depends = dependency

    def set_depends_on_flush(self) -> None:
        self.depends_on_flush = True

    async def flush_dependency(self) -> None:
        dep = self.depends
        if dep is not None:
            await dep.flush()
            self.depends = None

    async def write_entry(self, entry: CacheEntry[T]) -> None:
        """Write one dirty entry back, honouring the ordering constraints."""
        if not entry.dirty:
            return
        if self.depends is not None:
            await self.flush_dependency()
        elif self.depends_on_flush:
            await self._sync()
            self.depends_on_flush = False
        if not entry.dirty:  # written meanwhile by another path
            return
        data = self._serialize(entry.value)
        entry.dirty = False
        # Pinned until the store lands: evicted before, a lock-free get would
        # load the old table from disk, and the next change would write it back.
        entry.pins += 1
        try:
            await self._store(entry.key, data)
        except BaseException:
            entry.dirty = True
            raise
        finally:
            entry.pins -= 1

    async def write_all(self) -> None:
        """Write every dirty entry back (in offset order), without a final sync."""
        dirty = sorted((e for e in self.entries.values() if e.dirty), key=lambda e: e.key)
        for entry in dirty:
            await self.write_entry(entry)

    async def flush(self) -> None:
        """Write every dirty entry back, then sync the file."""
        await self.write_all()
        await self._sync()

    async def trim(self) -> None:
        """Evict down to capacity, writing dirty victims back first."""
        while len(self.entries) > self.capacity:
            victim = None
            for entry in self.entries.values():
                if not entry.pins:
                    victim = entry
                    break
            if victim is None:
                return
            if victim.dirty:
                await self.write_entry(victim)
                if victim.dirty:
                    continue
            if self.entries.get(victim.key) is victim:
                del self.entries[victim.key]
