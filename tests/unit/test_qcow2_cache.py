"""The qcow2 metadata cache: LRU bounds, pinning, write-back order and dependencies."""

from __future__ import annotations

import asyncio

import pytest

from qmpd.block.qcow2.cache import MetadataCache


class Disk:
    """Records loads, stores and syncs in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []
        self.data: dict[int, bytes] = {}
        self.load_delay = 0.0

    def cache(self, name: str, capacity: int) -> MetadataCache[bytearray]:
        async def load(key: int) -> bytearray:
            self.log.append((name, "load", key))
            if self.load_delay:
                await asyncio.sleep(self.load_delay)
            return bytearray(self.data.get(key, b"\0"))

        async def store(key: int, data: bytes) -> None:
            self.log.append((name, "store", key))
            self.data[key] = data

        async def sync() -> None:
            self.log.append(("file", "sync", 0))

        return MetadataCache(name, capacity, load, store, bytes, sync)


async def test_lru_eviction_of_clean_entries() -> None:
    disk = Disk()
    c = disk.cache("l2", 2)
    for key in (1, 2, 3):
        await c.get(key)
    assert list(c.entries) == [2, 3]
    await c.get(2)  # now most recently used
    await c.get(4)
    assert list(c.entries) == [2, 4]
    assert c.misses == 4 and c.hits == 1


async def test_dirty_and_pinned_entries_survive_reader_eviction() -> None:
    disk = Disk()
    c = disk.cache("l2", 2)
    e1 = await c.get(1)
    c.mark_dirty(e1)
    e2 = await c.get(2)
    e2.pins += 1
    await c.get(3)
    # 1 is dirty and 2 pinned: the cache overflows instead of losing them
    assert set(c.entries) == {1, 2, 3}
    e2.pins -= 1
    await c.trim()
    assert len(c) == 2
    assert ("l2", "store", 1) in disk.log
    assert 1 not in c.entries


async def test_newly_loaded_entry_is_not_evicted_at_once() -> None:
    disk = Disk()
    c = disk.cache("rc", 1)
    e = await c.get(1)
    c.mark_dirty(e)
    e2 = await c.get(2)
    assert c.entries.get(2) is e2  # the only clean one, but it is the one just loaded


async def test_dependency_order() -> None:
    """L2 depends on refcounts: refcount blocks written and synced before L2 entries."""
    disk = Disk()
    l2 = disk.cache("l2", 8)
    rc = disk.cache("rc", 8)
    r = await rc.get(100)
    rc.mark_dirty(r)
    await l2.set_dependency(rc)
    e = await l2.get(7)
    l2.mark_dirty(e)
    disk.log.clear()
    await l2.flush()
    assert disk.log == [("rc", "store", 100), ("file", "sync", 0), ("l2", "store", 7),
                        ("file", "sync", 0)]
    assert l2.depends is None


async def test_depends_on_flush() -> None:
    disk = Disk()
    l2 = disk.cache("l2", 8)
    e = await l2.get(7)
    l2.mark_dirty(e)
    l2.set_depends_on_flush()
    disk.log.clear()
    await l2.write_all()
    assert disk.log == [("file", "sync", 0), ("l2", "store", 7)]
    assert not l2.depends_on_flush


async def test_dependency_cycle_is_broken_by_flushing() -> None:
    """rc depends on l2; making l2 depend on rc first writes l2's pending state."""
    disk = Disk()
    l2 = disk.cache("l2", 8)
    rc = disk.cache("rc", 8)
    e = await l2.get(1)
    l2.mark_dirty(e)
    await rc.set_dependency(l2)
    r = await rc.get(2)
    rc.mark_dirty(r)
    disk.log.clear()
    await l2.set_dependency(rc)
    # rc's dependency (l2) is flushed, then rc may be written later
    assert disk.log == [("l2", "store", 1), ("file", "sync", 0)]
    assert rc.depends is None and l2.depends is rc


async def test_concurrent_loads_are_shared() -> None:
    disk = Disk()
    disk.load_delay = 0.01
    c = disk.cache("l2", 4)
    a, b = await asyncio.gather(c.get(5), c.get(5))
    assert a is b
    assert [x for x in disk.log if x[1] == "load"] == [("l2", "load", 5)]


async def test_clear_discards_inflight_loads() -> None:
    disk = Disk()
    disk.load_delay = 0.01
    c = disk.cache("l2", 4)
    task = asyncio.create_task(c.get(5))
    await asyncio.sleep(0)
    c.clear()
    await task
    assert 5 not in c.entries


async def test_insert_replaces_stale_load() -> None:
    disk = Disk()
    disk.load_delay = 0.01
    c = disk.cache("l2", 4)
    task = asyncio.create_task(c.get(5))
    await asyncio.sleep(0)
    fresh = c.insert(5, bytearray(b"new"), dirty=True)
    got = await task
    assert got is fresh and c.entries[5] is fresh


async def test_store_failure_keeps_entry_dirty() -> None:
    async def load(key: int) -> bytearray:
        return bytearray(1)

    async def store(key: int, data: bytes) -> None:
        raise OSError(5, "EIO")

    async def sync() -> None:
        return None

    c: MetadataCache[bytearray] = MetadataCache("l2", 2, load, store, bytes, sync)
    e = await c.get(1)
    c.mark_dirty(e)
    with pytest.raises(OSError):
        await c.flush()
    assert e.dirty


async def test_an_entry_being_written_back_is_not_evicted_nor_reloaded_stale() -> None:
    """A lock-free read that evicted an entry whose store had not landed yet
    made the next read load the old table from disk; the next change then
    wrote that stale table back (QEMU clears the dirty flag only once the
    write is done, and looks entries up under the lock)."""
    disk: dict[int, bytes] = {1: b"\x00"}
    loads: list[int] = []
    landed = asyncio.Event()

    async def load(key: int) -> bytearray:
        loads.append(key)
        return bytearray(disk.get(key, b"\0"))

    async def store(key: int, data: bytes) -> None:
        await landed.wait()  # a slow metadata write (O_DIRECT, NFS)
        disk[key] = data

    async def sync() -> None:
        return None

    c: MetadataCache[bytearray] = MetadataCache("l2", 2, load, store, bytes, sync)
    e1 = await c.get(1)
    e1.value[0] = 0xAA
    c.mark_dirty(e1)
    flush = asyncio.create_task(c.flush())
    await asyncio.sleep(0)
    await c.get(2)
    await c.get(3)  # over capacity: a clean entry goes, never the one being stored
    assert c.entries.get(1) is e1
    assert (await c.get(1)).value[0] == 0xAA
    landed.set()
    await flush
    assert disk[1] == b"\xaa"
    assert loads == [1, 2, 3]
