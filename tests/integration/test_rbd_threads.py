"""The rbd driver in-process on a real Ceph cluster.

Through librbd's C calls (the default), librbd's threads never run Python:
they make no Python thread state, and requests cancelled in flight are still
collected before the image closes.  Through the bindings' own AIO calls (the
fallback), librbd's callback threads keep one Python thread state each while
the node is open (not one made and destroyed per completion), and give them
back when the node closes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest

from qmpd.block import rbd, rbd_aio
from qmpd.block.driver import NodeState
from qmpd.block.graph import BlockNode
from qmpd.block.rbd import RbdDriver
from qmpd.errors import BlockDriverError
from tests.support.ceph import POOL, CephCluster, lock_holders, open_rbd_node
from tests.support.tools import REPO, qemu_io

_api = ctypes.pythonapi
_api.PyInterpreterState_Get.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
_api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Next.restype = ctypes.c_void_p
_api.PyThreadState_Next.argtypes = [ctypes.c_void_p]


def thread_states() -> int:
    """How many thread states the interpreter has (read under the GIL:
    ``pythonapi`` calls keep it)."""
    count = 0
    state = _api.PyInterpreterState_ThreadHead(_api.PyInterpreterState_Get())
    while state:
        count += 1
        state = _api.PyThreadState_Next(state)
    return count


@contextlib.asynccontextmanager
async def rbd_node(ceph: CephCluster, cache_direct: bool = False
                   ) -> AsyncIterator[tuple[BlockNode, RbdDriver, str]]:
    """A writable rbd node on a new 16 MiB image (removed afterwards);
    ``cache_direct``: without librbd's cache."""
    image = ceph.new_image("16M")
    try:
        graph, node, driver = await open_rbd_node(ceph.blockdev(image), cache_direct)
        try:
            yield node, driver, image
        finally:
            graph.close()
    finally:
        ceph.remove_image(image)


async def test_callback_threads_keep_their_thread_state_until_close(
        ceph: CephCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rbd, "C_AIO", False)
    async with rbd_node(ceph) as (node, driver, _image):
        blocks = range(256)
        sem = asyncio.Semaphore(16)

        async def write(i: int) -> None:
            async with sem:
                await node.write(i * 4096, bytes([i % 251 + 1]) * 4096)

        async def read(i: int) -> bytes:
            async with sem:
                return await node.read(i * 4096, 4096)

        await asyncio.gather(*(write(i) for i in blocks))
        assert await asyncio.gather(*(read(i) for i in blocks)) == \
            [bytes([i % 251 + 1]) * 4096 for i in blocks]
        completions = driver._completions
        assert completions is not None
        # librbd's own threads ran the callbacks, never the event loop's.
        assert completions.pinned
        assert threading.main_thread().ident not in completions.pinned
        # Every other thread state, whichever of librbd's threads ran them.
        others = thread_states() - len(completions.pinned)
        await node.flush()
        # Pinned threads keep theirs while idle (unpinned, each callback's
        # thread state would be gone again by now).
        assert thread_states() - len(completions.pinned) == others
        await driver.close()
        assert not completions.pinned
        assert thread_states() == others


async def test_c_calls_leave_python_out_of_librbd_threads(ceph: CephCluster) -> None:
    async with rbd_node(ceph) as (node, driver, image):
        io = driver._io
        assert isinstance(io, rbd_aio.ImageAio)
        assert driver._completions is None
        # The handle is only taken from the object it was read from.
        assert rbd_aio.image_handle(driver.image, driver.ioctx, image) == io.handle
        assert rbd_aio.image_handle(driver.image, object(), image) is None
        assert rbd_aio.image_handle(driver.image, driver.ioctx, image + "x") is None
        before = thread_states()
        # Another test's threads may still be ending meanwhile: fewer is fine,
        # one more (a librbd thread running Python) is not.
        sem = asyncio.Semaphore(16)

        async def write(i: int) -> None:
            async with sem:
                # bytes, and a bytearray as the NBD server hands its payloads.
                data = bytes([i % 251 + 1]) * 4096
                await node.write(i * 4096, data if i % 2 else bytearray(data))

        async def read(i: int) -> bytes:
            async with sem:
                return await node.read(i * 4096, 4096)

        await asyncio.gather(*(write(i) for i in range(256)))
        await node.flush()
        assert await asyncio.gather(*(read(i) for i in range(256))) == \
            [bytes([i % 251 + 1]) * 4096 for i in range(256)]
        # Unaligned, and across the end: the rest reads as zeros.
        size = driver.size()
        assert await driver.read(4095, 3) == bytes([1]) + bytes([2]) * 2
        assert await driver.read(size - 2, 5) == bytes(5)
        await driver.write_zeroes(4096, 8192)
        assert await driver.read(4096, 8192) == bytes(8192)
        assert thread_states() <= before
        assert not io.pending
        await driver.close()
        assert thread_states() <= before


async def test_cancelled_requests_are_collected_before_close(ceph: CephCluster) -> None:
    async with rbd_node(ceph) as (node, driver, _image):
        io = driver._io
        assert isinstance(io, rbd_aio.ImageAio)
        tasks = [asyncio.ensure_future(node.write(i * 65536, bytes([7]) * 65536))
                 for i in range(32)]
        await asyncio.sleep(0)
        assert io.pending
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # librbd still completes them, and the loop still collects them.
        await io.drain(30)
        assert not io.pending
        assert await driver.read(0, 4096) in (bytes(4096), bytes([7]) * 4096)
        await driver.close()
        assert io.fd == -1


class Completions:
    """What read_many/write_many callbacks delivered, by request."""

    def __init__(self) -> None:
        self.results: dict[int, tuple[object, BaseException | None]] = {}
        self.all_done = asyncio.get_running_loop().create_future()
        self.expected = 0

    def done(self, key: int) -> Callable[[object, BaseException | None], None]:
        self.expected += 1

        def deliver(value: object, error: BaseException | None) -> None:
            assert key not in self.results
            self.results[key] = (value, error)
            if len(self.results) == self.expected and not self.all_done.done():
                self.all_done.set_result(None)
        return deliver


async def test_requests_started_without_a_coroutine(ceph: CephCluster) -> None:
    """read_many/write_many (the NBD server's path for rbd): librbd's completions
    call back from the loop, after the call returned, with the node's
    bookkeeping done; what cannot go that way is refused, having done nothing."""
    async with rbd_node(ceph) as (node, driver, _image):
        writes = Completions()
        data = [bytearray([i % 251 + 1]) * 4096 for i in range(256)]
        assert node.write_many([(i * 4096, data[i], False, writes.done(i))
                                for i in range(256)]) == 256
        assert not writes.results  # never before the call returned
        assert node.plain_writes == 256 and driver.driver_metrics()["requests_in_flight"] == 256
        await asyncio.wait_for(writes.all_done, 60)
        assert all(result == (None, None) for result in writes.results.values())
        assert node.plain_writes == 0 and driver.driver_metrics()["requests_in_flight"] == 0
        assert node.stats.wr_operations == 256
        reads = Completions()
        assert node.read_many([(i * 4096, 4096, reads.done(i)) for i in range(256)]) == 256
        assert not reads.results  # never before the call returned
        await asyncio.wait_for(reads.all_done, 60)
        assert [reads.results[i] for i in range(256)] == \
            [(bytes([i % 251 + 1]) * 4096, None) for i in range(256)]
        assert node.stats.rd_operations == 256 and node.stats.rd_bytes == 256 * 4096
        # Ranges past the image's end are the awaited path's: the reads
        # before one are started, it and those after it are not.
        nothing, some = Completions(), Completions()
        assert driver.read_many([(driver.size() - 512, 1024, nothing.done(1))], node.stats) == 0
        assert node.read_many([(8192, 512, some.done(0)), (4096, 512, some.done(1)),
                               (driver.size(), 512, nothing.done(2)),
                               (0, 512, nothing.done(3))]) == 2
        await asyncio.wait_for(some.all_done, 60)
        assert some.results == {0: (bytes([3]) * 512, None), 1: (bytes([2]) * 512, None)}
        await asyncio.sleep(0.1)
        assert not nothing.results and node.plain_writes == 0
        assert node.stats.rd_operations == 258
        wrote = Completions()
        assert node.write_many([(0, bytearray([1]) * 512, False, wrote.done(0)),
                                (driver.size(), bytearray(512), False, nothing.done(4)),
                                (512, bytearray(512), False, nothing.done(5))]) == 1
        assert node.plain_writes == 1
        await asyncio.wait_for(wrote.all_done, 60)
        await asyncio.sleep(0.1)
        assert wrote.results == {0: (None, None)} and not nothing.results
        assert node.plain_writes == 0 and node.stats.wr_operations == 257


async def test_fua_write_started_without_a_coroutine_is_flushed(ceph: CephCluster) -> None:
    """A FUA write through write_many calls back once librbd has flushed it:
    another client sees it at once, while a later write without FUA stays in
    librbd's writeback cache (the tests' client configuration keeps dirty
    data for 600 s)."""
    async with rbd_node(ceph) as (node, driver, image):
        fua, plain = Completions(), Completions()
        assert node.write_many([(0, bytearray([0x5A]) * 4096, True, fua.done(0))]) == 1
        await asyncio.wait_for(fua.all_done, 60)
        assert fua.results == {0: (None, None)}
        assert node.write_many([(4096, bytearray([0xA5]) * 4096, False, plain.done(0))]) == 1
        await asyncio.wait_for(plain.all_done, 60)
        assert plain.results == {0: (None, None)}
        assert node.stats.wr_operations == 2 and driver.driver_metrics()["requests_in_flight"] == 0
        exported = ceph.root / f"{image}.seen"
        await asyncio.to_thread(ceph.rbd, "export", "--no-progress", f"rbd/{image}",
                                str(exported))
        seen = exported.read_bytes()
        assert seen[:4096] == bytes([0x5A]) * 4096
        assert seen[4096:8192] == bytes(4096)


def requests(driver: RbdDriver) -> float:
    return driver.driver_metrics()["requests"]


async def test_a_flush_with_nothing_to_write_back_is_skipped(ceph: CephCluster) -> None:
    """As QEMU's block layer (write generations): a flush goes to librbd only
    when a write completed since the last one, whichever path the write took;
    an inactivation after a flush sends none."""
    async with rbd_node(ceph) as (node, driver, _image):
        assert not driver.has_pending_writes()
        await node.write(0, bytes([1]) * 4096)
        assert driver.has_pending_writes()
        before = requests(driver)
        await node.flush()
        await node.flush()
        assert requests(driver) == before + 1 and not driver.has_pending_writes()
        written = Completions()
        assert node.write_many([(4096, bytearray([2]) * 4096, False, written.done(0))]) == 1
        await asyncio.wait_for(written.all_done, 60)
        assert driver.has_pending_writes()
        await node.flush()
        assert requests(driver) == before + 3 and not driver.has_pending_writes()
        fua = Completions()  # its own flush covers it
        assert node.write_many([(8192, bytearray([3]) * 4096, True, fua.done(0))]) == 1
        await asyncio.wait_for(fua.all_done, 60)
        assert fua.results == {0: (None, None)}
        assert requests(driver) == before + 5 and not driver.has_pending_writes()
        await node.flush()
        await node.graph.inactivate_all()
        assert requests(driver) == before + 5 and driver.stats.lock_releases == 1


async def test_a_flush_covers_the_writes_in_flight(ceph: CephCluster) -> None:
    """A flush that comes while a write is in flight (not yet completed) is
    not skipped: once it completes, another client reads the write (librbd's
    writeback cache would otherwise keep it for 600 s)."""
    async with rbd_node(ceph) as (node, _driver, image):
        await node.write(0, bytes([1]) * 4096)
        await node.flush()
        written = Completions()
        assert node.write_many([(4096, bytearray([0x77]) * 4096, False, written.done(0))]) == 1
        await node.flush()
        await asyncio.wait_for(written.all_done, 60)
        assert written.results == {0: (None, None)}
        exported = ceph.root / f"{image}.seen"
        await asyncio.to_thread(ceph.rbd, "export", "--no-progress", f"rbd/{image}",
                                str(exported))
        assert exported.read_bytes()[4096:8192] == bytes([0x77]) * 4096


#: Another client that holds an image's exclusive lock in exclusive mode
#: (librbd does not hand it over on request) until its stdin has a line.
_LOCK_HOLDER = textwrap.dedent("""
    import sys
    from qmpd.block import ceph
    rados, rbd = ceph.bindings()
    cluster = rados.Rados(conffile=sys.argv[1])
    cluster.connect()
    ioctx = cluster.open_ioctx(sys.argv[2])
    image = rbd.Image(ioctx, sys.argv[3])
    image.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
    print("held", flush=True)
    sys.stdin.readline()
    image.lock_release()
    image.close()
    ioctx.close()
    cluster.shutdown()
""")


async def test_an_activated_node_reads_before_it_holds_the_lock(ceph: CephCluster) -> None:
    """An activation does not wait for the exclusive lock: the node reads at
    once and takes the lock in the background, writes waiting for it.  With
    the lock held elsewhere in exclusive mode the activation still succeeds
    and reads work, a write fails with librbd's error, and once the lock is
    free the next write takes it (the attempt is made again)."""
    async with rbd_node(ceph) as (node, driver, image):
        await node.write(0, bytes([0x11]) * 4096)
        await node.graph.inactivate_all()
        assert not node.active and lock_holders(ceph, image) == []
        holder = subprocess.Popen(
            [sys.executable, "-c", _LOCK_HOLDER, str(ceph.client_conf), POOL, image],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert await asyncio.to_thread(holder.stdout.readline) == "held\n"
            await node.graph.activate_all()
            assert node.active
            assert await node.read(0, 4096) == bytes([0x11]) * 4096
            with pytest.raises(BlockDriverError) as refused:
                await node.write(4096, bytes([0x22]) * 4096)
            assert refused.value.errno == errno.EROFS, refused.value
            assert "exclusive lock" in str(refused.value)
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert await asyncio.to_thread(holder.wait, 30) == 0
        finally:
            if holder.poll() is None:
                holder.kill()
        await node.write(4096, bytes([0x22]) * 4096)
        assert await node.read(0, 8192) == bytes([0x11]) * 4096 + bytes([0x22]) * 4096
        assert len(lock_holders(ceph, image)) == 1
        assert driver.stats.lock_acquisitions == 2  # at the open, and on the retry


async def test_requests_during_the_reload_wait_for_it(ceph: CephCluster) -> None:
    """While the activation has marked the node active but librbd's cache is
    still being dropped (in an I/O thread), requests without a coroutine are
    declined and awaited ones wait: none is served from the cache of before
    the new owner's writes."""
    async with rbd_node(ceph) as (node, driver, image):
        await node.write(0, bytes([1]) * 4096)
        await node.graph.inactivate_all()
        assert await node.read(0, 4096) == bytes([1]) * 4096
        await asyncio.to_thread(
            qemu_io, "-f", "raw", "-c", "write -P 0x42 0 4k", ceph.spec(image), timeout=60)
        task = asyncio.ensure_future(node.graph.activate_all())
        while not (node.active and node.stats.invalidations == 0):
            assert not task.done(), "no window: the reload did not wait"
            await asyncio.sleep(0)
        nothing = Completions()
        assert node.read_many([(0, 4096, nothing.done(1))]) == 0
        assert node.write_many([(4096, bytearray(4096), False, nothing.done(2))]) == 0
        assert await node.read(0, 4096) == bytes([0x42]) * 4096
        await task
        assert node.stats.invalidations == 1 and driver.stats.cache_invalidations == 1
        assert not nothing.results


async def test_a_write_before_the_reload_takes_the_lock_first(ceph: CephCluster) -> None:
    """From an inactivation on, a write takes the exclusive lock (in exclusive
    mode) before it goes to librbd: also one that comes while an activation
    has marked the node active but its reload has not run yet.  Otherwise
    the write reaches librbd without it: refused (EROFS) by an image this
    client once locked explicitly, or, on one it never locked (opened
    inactive), locked by librbd itself in its cooperative mode, which hands
    the lock to the next client that asks."""
    async with rbd_node(ceph) as (node, driver, image):
        await node.write(0, bytes([1]) * 4096)
        await node.graph.inactivate_all()
        node.set_state(NodeState.ACTIVE)  # the activation's first step, before the reload
        await node.write(4096, bytes([2]) * 4096)
        assert driver.stats.lock_acquisitions == 2
        other = await asyncio.to_thread(
            qemu_io, "-f", "raw", "-c", "write -P 0x42 0 4k", ceph.spec(image), timeout=60)
        assert "Read-only file system" in other.stdout + other.stderr, other.stdout
        assert await node.read(0, 8192) == bytes([1]) * 4096 + bytes([2]) * 4096


async def test_requests_without_a_coroutine_fail_cleanly(ceph: CephCluster) -> None:
    """With the OSD stopped, both calls back report librbd's error (after the
    client's OSD timeout) as a BlockDriverError, and the node's counts settle
    (without librbd's cache, which would take the write)."""
    async with rbd_node(ceph, cache_direct=True) as (node, driver, _image):
        ceph.stop_osd()
        try:
            failed = Completions()
            assert node.write_many([(0, bytes([5]) * 4096, False, failed.done(0))]) == 1
            assert node.read_many([(1 << 20, 4096, failed.done(1))]) == 1
            await asyncio.wait_for(failed.all_done, 60)
        finally:
            ceph.ensure_running()
        for key in (0, 1):
            value, error = failed.results[key]
            assert value is None and isinstance(error, BlockDriverError), failed.results
            assert error.errno in (errno.EIO, errno.ETIMEDOUT), error
        assert node.plain_writes == 0 and driver.driver_metrics()["requests_in_flight"] == 0
        assert driver.stats.errors == 2
        assert node.stats.wr_operations == 0 and node.stats.rd_operations == 0


async def test_plugged_requests_go_to_librbd_at_the_unplug(ceph: CephCluster) -> None:
    """io_plug (QEMU's bdrv_io_plug): what a plugged node is asked to write or
    read reaches librbd only at the outermost io_unplug, all of it one right
    after the other (librbd's thread is woken once, not per request), and
    completes as usual."""
    async with rbd_node(ceph) as (node, driver, _image):
        io = driver._io
        assert isinstance(io, rbd_aio.ImageAio)
        writes = Completions()
        node.io_plug()
        node.io_plug()
        for i in range(8):
            assert node.write_many([(i * 4096, bytearray([i + 1]) * 4096, False, writes.done(i))]) == 1
        assert len(io.held) == 8 and not io.pending
        assert driver.driver_metrics()["requests_in_flight"] == 8
        node.io_unplug()
        await asyncio.sleep(0.2)
        assert len(io.held) == 8 and not io.pending and not writes.results
        node.io_unplug()
        assert not io.held and len(io.pending) == 8 and node.io_plugged == 0
        # One batch: submitted together (one timestamp for all).
        assert len({entry[3] for entry in io.pending.values()}) == 1
        await asyncio.wait_for(writes.all_done, 60)
        assert all(result == (None, None) for result in writes.results.values())
        reads = Completions()
        node.io_plug()
        for i in range(8):
            assert node.read_many([(i * 4096, 4096, reads.done(i))]) == 1
        future = asyncio.ensure_future(node.read(8 * 4096, 4096))
        await asyncio.sleep(0)  # the awaited path is held too
        assert len(io.held) == 9 and not reads.results
        node.io_unplug()
        await asyncio.wait_for(reads.all_done, 60)
        assert [reads.results[i] for i in range(8)] == \
            [(bytes([i + 1]) * 4096, None) for i in range(8)]
        assert await asyncio.wait_for(future, 60) == bytes(4096)
        assert driver.driver_metrics()["requests_in_flight"] == 0
        assert node.stats.wr_operations == 8 and node.stats.rd_operations == 9


class SlowResize:
    """An open ``rbd.Image`` whose resizes take half a second more (an OSD
    round trip that takes a while); ``order`` records resizes and the close."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.order: list[str] = []
        self._started = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    async def resizing(self) -> None:
        """Until a resize has begun."""
        while not self._started.is_set():
            await asyncio.sleep(0.01)

    def resize(self, size: int) -> None:
        self._started.set()
        time.sleep(0.5)
        self.real.resize(size)  # type: ignore[attr-defined]
        self.order.append("resized")

    def close(self) -> None:
        self.order.append("close")
        self.real.close()  # type: ignore[attr-defined]


async def another_client_writes(ceph: CephCluster, image: str) -> None:
    """qemu-io writes 0x42 to the first 4 KiB of ``image`` (as the next owner would)."""
    other = await asyncio.to_thread(
        qemu_io, "-f", "raw", "-c", "write -P 0x42 0 4k", ceph.spec(image), timeout=60)
    assert other.returncode == 0 and "wrote 4096/4096" in other.stdout, other.stderr


async def test_an_inactive_node_takes_no_lock_for_a_write(ceph: CephCluster) -> None:
    """A write that reaches the driver of an inactive node (a parent's driver
    calls its child's directly) is refused; it must not take the exclusive
    lock, which the destination of a handover takes next."""
    async with rbd_node(ceph) as (node, driver, image):
        await node.graph.inactivate_all()
        assert lock_holders(ceph, image) == []
        for request in (driver.write(0, b"\x77" * 4096), driver.truncate(32 << 20),
                        driver.write_zeroes(0, 4096)):
            with pytest.raises(BlockDriverError, match=r"^Block node is inactive$"):
                await request
        assert lock_holders(ceph, image) == []
        await another_client_writes(ceph, image)
        assert driver.size() == 16 << 20


async def test_a_resize_under_way_ends_before_the_lock_is_released(ceph: CephCluster) -> None:
    """A write past the end grows the image first; an inactivation that comes
    meanwhile waits for that resize, and the write then fails (the node is no
    longer active) instead of reaching librbd after the release, which would
    take the lock back from under the next owner."""
    async with rbd_node(ceph) as (node, driver, image):
        await driver.truncate((16 << 20) + 512)  # the end is not a whole 4 KiB block
        real = driver.image
        slow = driver.image = SlowResize(real)
        write = asyncio.ensure_future(driver.write((16 << 20) + 512, b"\xab" * 4096))
        await slow.resizing()
        await node.graph.inactivate_all()
        driver.image = real
        with pytest.raises(BlockDriverError, match=r"^Block node is inactive$"):
            await write
        assert lock_holders(ceph, image) == []
        await another_client_writes(ceph, image)


async def test_an_inactive_node_reads_what_the_owner_wrote(ceph: CephCluster) -> None:
    """Reads of an inactive node (a destination's, before the handover) go
    past librbd's cache, and see the size the owner gave the image: the
    client configuration of these tests caches in writeback mode."""
    async with rbd_node(ceph) as (node, driver, image):
        await node.write(0, b"\x01" * 4096)
        await node.graph.inactivate_all()
        assert await node.read(0, 4096) == b"\x01" * 4096  # now in librbd's cache
        await another_client_writes(ceph, image)
        await asyncio.to_thread(ceph.rbd, "resize", "--size", "32M", f"{POOL}/{image}")
        assert await node.read(0, 4096) == b"\x42" * 4096
        assert driver.size() == 32 << 20


_CLOSE_RACE = textwrap.dedent("""
    import asyncio, json, os, signal, sys, time
    from qmpd.block import rbd
    from tests.support.ceph import open_rbd_node

    async def main(options, osd):
        graph, node, driver = await open_rbd_node(options, cache_direct=True)
        rbd.DRAIN_TIMEOUT = 0.3
        results = {}
        os.kill(osd, signal.SIGSTOP)
        try:
            node.write_many([(i * 65536, bytes([i + 1]) * 65536, False,
                              lambda v, e, i=i: results.__setitem__(i, repr(e)))
                             for i in range(8)])

            def blocker():  # the OSD answers while the loop is busy: during the close
                os.kill(osd, signal.SIGCONT)
                time.sleep(3)

            asyncio.get_running_loop().call_later(1.0, blocker)
            await driver.close()
        finally:
            os.kill(osd, signal.SIGCONT)
        graph.close()
        print(json.dumps(results))

    asyncio.run(main(json.loads(sys.argv[1]), int(sys.argv[2])))
""")


async def test_requests_that_complete_during_the_close_keep_their_results(
        ceph: CephCluster) -> None:
    """Requests still in flight when the drain gives up (the OSD stalled) and
    completed while the image closes: nothing polls the closed image for them
    (that crashed the daemon), and each gets its own result, not EIO.  In a
    child process, so that a crash fails this test alone."""
    assert ceph.osd is not None
    image = ceph.new_image("16M")
    try:
        child = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", _CLOSE_RACE, json.dumps(ceph.blockdev(image)),
                             str(ceph.osd.pid)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert child.returncode == 0, child.stderr[-2000:]
        assert json.loads(child.stdout) == {str(i): "None" for i in range(8)}
        out = ceph.root / f"{image}.raw"
        await asyncio.to_thread(ceph.rbd, "export", "--no-progress", f"{POOL}/{image}", str(out))
        data = out.read_bytes()
        out.unlink()
        assert [data[i * 65536] for i in range(8)] == [i + 1 for i in range(8)]
    finally:
        ceph.remove_image(image)


async def test_the_close_waits_for_a_thread_still_using_the_image(ceph: CephCluster) -> None:
    """A resize whose caller was cancelled goes on in its I/O thread: the
    close waits until that thread is done with the image before librbd's
    close frees it."""
    async with rbd_node(ceph) as (_node, driver, _image):
        slow = driver.image = SlowResize(driver.image)
        truncate = asyncio.ensure_future(driver.truncate(32 << 20))
        await slow.resizing()
        truncate.cancel()
        await driver.close()
        assert slow.order == ["resized", "close"]
