"""activate_all (the migration destination's handover) and the lock bytes, on real files."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpd.block.common import ChildRole
from qmpd.block.core import BlockLayer
from qmpd.block.driver import BdrvChild, NodeState, NodeUser, Perm
from qmpd.block.locking import _F_OFD_SETLK, _FLOCK, ImageLock, LockError
from qmpd.block.qcow2.create import create_image
from qmpd.errors import BlockDriverError, QMPError
from qmpd.jobs.block_job import JobNodeUser
from tests.support.block import held_io, qcow2
from tests.support.tools import held_bytes, qemu_img, qemu_io

MiB = 1 << 20


async def test_activate_all_leaves_each_node_whole_and_names_the_failure(
    tmp_path: Path, layer: BlockLayer, caplog: pytest.LogCaptureFixture
) -> None:
    good = await layer.add(qcow2(tmp_path, "good"), inactive=True)
    broken = await layer.add(qcow2(tmp_path, "broken"), inactive=True)
    # A raw node over another qcow2 that breaks: three levels, the top one
    # must not be tried over its failed child.
    under = qcow2(tmp_path, "under")
    top = await layer.add({"driver": "raw", "node-name": "top", "file": under}, inactive=True)
    late = await layer.add(qcow2(tmp_path, "late"), inactive=True)
    for name in ("broken", "under"):
        with open(tmp_path / f"{name}.qcow2", "r+b") as f:  # the new owner broke it
            f.write(b"XXXX")
    reads_before = late.file.stats.rd_operations if late.file else 0
    with caplog.at_level(logging.ERROR), pytest.raises(BlockDriverError) as exc:
        await layer.activate_all()
    # The first failure from the oldest root, with the node's name in the log.
    assert exc.value.desc.startswith("Could not reopen qcow2 layer: ")
    assert broken.state is NodeState.INACTIVE
    assert broken.activation_error == exc.value.desc
    assert f"activation of node broken failed: {exc.value.desc}" in caplog.text
    assert "activation of node under failed" in caplog.text
    under_node = layer.graph.lookup("under")
    assert under_node is not None and under_node.state is NodeState.INACTIVE
    assert top.state is NodeState.INACTIVE and top.activation_error is None
    # The others are active all the way down and usable.
    for node in (good, late):
        assert node.state is NodeState.ACTIVE and node.file is not None
        assert node.file.state is NodeState.ACTIVE
        assert node.stats.invalidations == 1
        await node.write(0, b"w" * 512)
        assert await node.read(0, 512) == b"w" * 512
    # Header, L1 table and refcount table, counted on the file child.
    assert late.file is not None and late.file.stats.rd_operations >= reads_before + 3
    assert held_bytes(str(tmp_path / "good.qcow2")) == {100, 101, 103, 201, 203}
    # Repaired, a second activate_all finishes the job.
    for name in ("broken", "under"):
        with open(tmp_path / f"{name}.qcow2", "r+b") as f:
            f.write(b"QFI\xfb")
    await layer.activate_all()
    assert all(node.active for node in layer.graph.all_nodes())
    assert broken.activation_error is None


async def test_a_parent_refused_its_locks_leaves_its_file_node_holding_its_own(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """A file node takes its locks with its parent's permissions; when the
    parent is refused them (another process does not share write), the file
    node still ends active with the bytes of its own activation, as if it had
    taken them before its parent was tried."""
    good = await layer.add(qcow2(tmp_path, "good"), inactive=True)
    refused = await layer.add(qcow2(tmp_path, "refused"), inactive=True)
    other = os.open(tmp_path / "refused.qcow2", os.O_RDWR)
    try:
        take(other, 201)  # someone who does not share write
        with pytest.raises(BlockDriverError) as exc:
            await layer.activate_all()
        assert exc.value.desc == 'Failed to get "write" lock'
        assert refused.state is NodeState.INACTIVE and refused.file is not None
        assert refused.file.state is NodeState.ACTIVE
        assert held_bytes(tmp_path / "refused.qcow2") == {100, 201}
        assert good.active and held_bytes(tmp_path / "good.qcow2") == {100, 101, 103, 201, 203}
    finally:
        os.close(other)
    await layer.activate_all()
    assert refused.active and held_bytes(tmp_path / "refused.qcow2") == {100, 101, 103, 201, 203}


async def test_cancelled_activation_leaves_nodes_whole(
    tmp_path: Path, layer: BlockLayer
) -> None:
    nodes = [await layer.add(qcow2(tmp_path, f"c{i}"), inactive=True) for i in range(6)]
    task = asyncio.create_task(layer.activate_all())
    # Cancelled once the file nodes' wave has begun, the qcow2 ones' not done.
    while not any(node.file is not None and node.file.active for node in nodes):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for node in layer.graph.all_nodes():
        if node.active:
            assert node.stats.invalidations == 1 and node.activation_error is None
        else:
            assert node.state is NodeState.INACTIVE
    assert any(not node.active for node in nodes)
    # Nothing half-done: activating again finishes it, and the images read.
    await layer.activate_all()
    for node in nodes:
        assert node.active and node.stats.invalidations == 1
        assert await node.read(0, 512) == bytes(512)


async def test_an_activation_cut_short_says_so(
    tmp_path: Path, layer: BlockLayer, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose activation is cancelled during its reload stays inactive
    with the reason recorded (readiness and the failed-activation metric
    report a node by it) and logged: never an empty one."""
    options = qcow2(tmp_path, "img")
    options["file"]["cache"] = {"direct": True}  # the reload waits for the disk
    node = await layer.add(options, inactive=True)
    task = asyncio.create_task(layer.activate_all())
    while not (node.active and node.reloading is not None):
        assert not task.done()
        await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert node.state is NodeState.INACTIVE
    assert node.activation_error == "CancelledError"
    assert "activation of node img failed: CancelledError" in caplog.text
    await layer.activate_all()
    assert node.active and node.activation_error is None


async def test_activate_all_waits_for_an_activation_under_way(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """activate_all (a migration's handover, cont) while blockdev-set-active
    of one node is reloading it: it waits for that reload instead of taking
    the node as done (and returning, or reloading a parent over it, before
    its driver has re-read what it caches)."""
    options = qcow2(tmp_path, "img")
    options["file"]["cache"] = {"direct": True}  # the reload waits for the disk
    node = await layer.add(options, inactive=True)
    one = asyncio.create_task(layer.set_active("img", True))
    while not (node.active and node.reloading is not None):
        assert not one.done()
        await asyncio.sleep(0)
    await layer.activate_all()
    assert node.reloading is None and node.stats.invalidations == 1
    await asyncio.wait_for(one, 10)
    assert node.active and node.stats.invalidations == 1


async def test_requests_during_an_activation_wait_for_the_reload(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """While an activation has marked a node active (to take its locks) but its
    driver is still reloading what it caches, requests wait for the reload
    instead of meeting a half-reloaded driver: qcow2 without its tables
    (ENOMEDIUM), or a cache from before the new owner's writes.  The fast
    paths decline meanwhile (they fall back to the waiting ones)."""
    options = qcow2(tmp_path, "img")
    options["file"]["cache"] = {"direct": True}  # the reload waits for the disk
    node = await layer.add(options, inactive=True)
    assert await node.read(0, 512) == bytes(512)
    # The source writes while this side is inactive.
    qemu_io("-f", "qcow2", str(tmp_path / "img.qcow2"), "-c", "write -P 0x5a 0 64k",
            check=True)
    task = asyncio.create_task(layer.activate_all())
    while not (node.active and node.stats.invalidations == 0):  # marked, not reloaded
        assert not task.done(), "no window: the reload did not wait"
        await asyncio.sleep(0)
    assert node.read_now(0, 512) is None
    assert not node.write_now(0, b"x" * 512)
    reads = [asyncio.create_task(node.read(0, 512)) for _ in range(3)]
    write = asyncio.create_task(node.write(65536, b"\x6b" * 512))
    status = asyncio.create_task(node.block_status(0, 65536))
    assert await asyncio.gather(*reads) == [b"\x5a" * 512] * 3
    await write
    assert (await status).data
    await task
    assert node.active and node.stats.invalidations == 1
    assert await node.read(65536, 512) == b"\x6b" * 512
    await node.flush()
    qemu_img("check", str(tmp_path / "img.qcow2"), "-U")


async def test_a_parent_request_waits_for_its_child_reload(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """A raw node reaches its qcow2 child's driver directly: while the child
    reloads, a read of the parent (not begun yet, inactive) waits too."""
    under = qcow2(tmp_path, "under")
    under["file"]["cache"] = {"direct": True}
    top = await layer.add({"driver": "raw", "node-name": "top", "file": under}, inactive=True)
    child = layer.graph.lookup("under")
    assert child is not None
    qemu_io("-f", "qcow2", str(tmp_path / "under.qcow2"), "-c", "write -P 0x5a 0 64k",
            check=True)
    task = asyncio.create_task(layer.activate_all())
    while not (child.active and child.stats.invalidations == 0):
        assert not task.done(), "no window: the reload did not wait"
        await asyncio.sleep(0)
    assert not top.active
    assert await top.read(0, 512) == b"\x5a" * 512
    await task
    assert top.active and top.reloading is None and child.reloading is None


async def test_activate_all_reloads_shared_children_once(
    tmp_path: Path, layer: BlockLayer
) -> None:
    base = await layer.add(qcow2(tmp_path, "base") | {"read-only": True}, inactive=True)
    tops = []
    for i in range(3):
        options = qcow2(tmp_path, f"top{i}") | {"backing": "base"}
        tops.append(await layer.add(options, inactive=True))
    await layer.activate_all()
    assert base.stats.invalidations == 1
    assert all(top.active and top.stats.invalidations == 1 for top in tops)


async def test_a_header_reaching_past_the_first_read_is_read_whole(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """The header is read in one small read; extensions or a backing file name
    further into the first cluster make the loader read all of it."""
    path = tmp_path / "far.qcow2"
    create_image(str(path), 4 * MiB)
    data = bytearray(path.read_bytes())
    start = int.from_bytes(data[100:104], "big")
    ext = (0x12345678).to_bytes(4, "big") + (5000).to_bytes(4, "big") + bytes(5000)
    ext += (0xE2792ACA).to_bytes(4, "big") + (5).to_bytes(4, "big") + b"qcow2" + bytes(3)
    ext += bytes(8)
    name = b"base-image-far-away.qcow2"
    data[start:start + len(ext)] = ext
    data[12000:12000 + len(name)] = name
    data[8:16] = (12000).to_bytes(8, "big")
    data[16:20] = len(name).to_bytes(4, "big")
    path.write_bytes(data)
    options = {"driver": "qcow2", "node-name": "far", "backing": None,
               "file": {"driver": "file", "filename": str(path)}}
    node = await layer.add(options, inactive=True)
    assert node.driver.raw_backing_file_name() == name.decode()
    assert node.driver.backing_format() == "qcow2"
    await layer.activate_all()
    assert node.active
    assert node.driver.raw_backing_file_name() == name.decode()
    assert node.driver.backing_format() == "qcow2"


# --- lock bytes ------------------------------------------------------------------------


@pytest.fixture
def image_fds(tmp_path: Path) -> Iterator[tuple[str, int, int]]:
    path = str(tmp_path / "locked.img")
    Path(path).write_bytes(bytes(4096))
    ours = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDWR)  # another open file: its OFD locks conflict
    yield path, ours, other
    os.close(ours)
    os.close(other)


def take(fd: int, offset: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, offset, 1, 0))


READ_WRITE = Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE
SHARES = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED


def test_locks_in_runs_leave_the_bytes_qemu_takes(image_fds: tuple[str, int, int]) -> None:
    path, ours, _ = image_fds
    lock = ImageLock(ours)
    lock.update(Perm.CONSISTENT_READ, Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED)
    assert held_bytes(path) == {100, 203}
    lock.update(READ_WRITE, SHARES)
    assert held_bytes(path) == {100, 101, 103, 201, 203}
    lock.update(Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE, 0)
    assert held_bytes(path) == {100, 101, 102, 103, 200, 201, 202, 203}
    lock.update(Perm.WRITE_UNCHANGED, Perm.CONSISTENT_READ | Perm.RESIZE)
    assert held_bytes(path) == {102, 201, 202}
    lock.release()
    assert held_bytes(path) == set()


def test_a_byte_inside_the_tested_span_that_does_not_matter(
    image_fds: tuple[str, int, int]
) -> None:
    path, ours, other = image_fds
    # Someone writes unchanged data (102) and shares everything: a writer that
    # unshares write and resize (101 and 103 tested as one span) still gets in.
    take(other, 102)
    lock = ImageLock(ours)
    lock.update(READ_WRITE, SHARES)
    assert held_bytes(path) == {100, 101, 102, 103, 201, 203}
    lock.release()


@pytest.mark.parametrize(("byte", "message"), [
    (200, 'Failed to get "consistent read" lock'),
    (201, 'Failed to get "write" lock'),
    (203, 'Failed to get "resize" lock'),
    (101, 'Failed to get shared "write" lock'),
    (103, 'Failed to get shared "resize" lock'),
])
def test_conflicts_give_qemus_texts_and_change_nothing(
    image_fds: tuple[str, int, int], byte: int, message: str
) -> None:
    path, ours, other = image_fds
    take(other, byte)
    lock = ImageLock(ours)
    with pytest.raises(LockError) as exc:
        lock.update(READ_WRITE, SHARES)
    assert str(exc.value) == message
    assert held_bytes(path) == {byte}
    assert (lock.held, lock.unshared) == (0, 0)


def test_the_first_conflict_in_qemus_order_is_named(image_fds: tuple[str, int, int]) -> None:
    _, ours, other = image_fds
    for byte in (203, 101, 201):
        take(other, byte)
    with pytest.raises(LockError) as exc:
        ImageLock(ours).update(READ_WRITE, SHARES)
    assert str(exc.value) == 'Failed to get "write" lock'


def _reftable_on_disk(path: Path) -> list[int]:
    """The refcount table as the file holds it (header fields at 48 and 56)."""
    data = path.read_bytes()
    offset = int.from_bytes(data[48:56], "big")
    clusters = int.from_bytes(data[56:60], "big")
    cluster_size = 1 << int.from_bytes(data[20:24], "big")
    raw = data[offset:offset + clusters * cluster_size]
    return [int.from_bytes(raw[i:i + 8], "big") for i in range(0, len(raw), 8)]


async def test_activation_rereads_the_refcount_table_into_the_dropped_ones_memory(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """Issue 10: the dropped image's refcount table takes the one read at
    activation (no new pages); what it holds is what the disk says now, not
    what it held, and a table of another size gets memory of its own."""
    path = tmp_path / "small.qcow2"
    # 512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB,
    # so a few hundred KiB written by another process add reftable entries.
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64",
             path, "16M")
    node = await layer.add({"driver": "qcow2", "node-name": "small",
                            "file": {"driver": "file", "filename": str(path)}}, inactive=True)
    image = node.driver._image  # type: ignore[attr-defined]
    old = image.refs.reftable
    before = list(old)
    # The source writes while this side is inactive (it holds no write lock).
    qemu_io("-f", "qcow2", "-c", "write -P 0x5a 0 384k", path, check=True)
    expected = _reftable_on_disk(path)
    assert len(expected) == len(before)
    assert expected != before  # the test means something: new refcount blocks
    await layer.activate_all()
    new = node.driver._image.refs.reftable  # type: ignore[attr-defined]
    assert new is old  # the same memory ...
    assert list(new) == expected  # ... holding the table read now, in host order
    assert await node.read(0, 4096) == b"\x5a" * 4096
    # A write allocating more refcount blocks works on the table read.
    await node.write(1 << 20, b"w" * 65536)
    await node.flush()
    # A table that grew on disk (another size) is read into a table of its own.
    await layer.inactivate_all()
    stale = node.driver._image.refs.reftable  # type: ignore[attr-defined]
    await layer.close_all()
    layer.graph.close()
    qemu_img("check", path)
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 2M 3M", path, check=True)
    grown = _reftable_on_disk(path)
    assert len(grown) != len(stale)
    second = BlockLayer()
    try:
        again = await second.add({"driver": "qcow2", "node-name": "small",
                                  "file": {"driver": "file", "filename": str(path)}},
                                 inactive=True)
        spare = again.driver._image.refs.reftable  # type: ignore[attr-defined]
        spare.extend([0] * 8)  # another size than the table on disk
        await second.activate_all()
        table = again.driver._image.refs.reftable  # type: ignore[attr-defined]
        assert table is not spare and list(table) == grown
        assert await again.read(2 << 20, 4096) == b"\x33" * 4096
    finally:
        await second.close_all()
        second.graph.close()
    qemu_img("check", path)


@pytest.mark.parametrize("parent", ["raw", "throttle"])
async def test_a_read_through_a_parent_of_an_inactive_qcow2_node_sees_the_owners_writes(
        tmp_path: Path, layer: BlockLayer, parent: str) -> None:
    """raw and throttle pass reads to their child's driver, past the child's
    node: the inactive qcow2 child's metadata was not reloaded, and the read
    answered from the tables of when it was opened."""
    options = qcow2(tmp_path, "disk")
    path = options["file"]["filename"]
    await layer.add(options, inactive=True)
    top_options: dict[str, object] = {"driver": parent, "node-name": "top", "file": "disk"}
    if parent == "throttle":
        layer.graph.objects.add_object({"qom-type": "throttle-group", "id": "tg"})
        top_options["throttle-group"] = "tg"
    top = await layer.add(top_options, inactive=True)
    assert await top.read(2 * MiB, 4) == bytes(4)
    # The image's owner (the source host) writes: a new L2 entry and cluster.
    qemu_io("--image-opts", "-c", "write -P 0x33 2M 4k",
            f"driver=qcow2,file.driver=file,file.filename={path},file.locking=off", check=True)
    assert top.state is NodeState.INACTIVE
    assert await top.read(2 * MiB, 4) == b"\x33" * 4


async def test_a_failed_re_read_of_an_early_activated_node_leaves_it_for_cont(
        tmp_path: Path, layer: BlockLayer) -> None:
    """A destination's node activated early is re-read when the migration
    completes; a failed re-read left it active on no metadata, and cont
    (activate_all) skipped it as active: unusable until deleted."""
    node = await layer.add(qcow2(tmp_path, "d"))
    path = tmp_path / "d.qcow2"
    await node.write(0, b"\x01" * 4096)
    good = path.read_bytes()[:4]
    with open(path, "r+b") as f:  # the source's last state, unreadable for a moment
        f.write(b"XXXX")
    with pytest.raises(BlockDriverError):
        await layer.graph.reload_active([node])
    assert node.state is NodeState.INACTIVE and node.file is not None
    assert node.file.state is NodeState.ACTIVE  # re-read fine: stays as it was
    with open(path, "r+b") as f:
        f.write(good)
    await layer.activate_all()  # cont
    assert node.state is NodeState.ACTIVE
    await node.write(4096, b"\x02" * 4096)
    assert await node.read(0, 8192) == b"\x01" * 4096 + b"\x02" * 4096


async def test_the_re_read_of_an_early_activated_node_waits_for_the_writes_under_way(
        tmp_path: Path, layer: BlockLayer) -> None:
    path = tmp_path / "d.raw"
    path.write_bytes(bytes(4 * MiB))
    node = await layer.add({"driver": "raw", "node-name": "d",
                            "file": {"driver": "file", "node-name": "d-file",
                                     "filename": str(path)}})
    async with held_io(layer):
        write = asyncio.ensure_future(node.write(0, b"\x5a" * 2 * MiB))
        await asyncio.sleep(0.05)
        reload = asyncio.ensure_future(layer.graph.reload_active([node]))
        await asyncio.sleep(0.2)
        assert not reload.done(), "re-read with a write under way"
        assert node.state is NodeState.ACTIVE and node.stats.invalidations == 0
        with pytest.raises(BlockDriverError, match="inactive"):
            await node.write(3 * MiB, b"\xa5" * 4096)
    await asyncio.wait_for(write, 10)
    await asyncio.wait_for(reload, 10)
    assert node.state is NodeState.ACTIVE and node.quiesce_counter == 0
    await node.write(3 * MiB, b"\xa5" * 4096)
    assert path.read_bytes()[:2 * MiB] == b"\x5a" * 2 * MiB


@pytest.mark.parametrize("how", ["inactivate_all", "set_active"])
async def test_an_inactivated_node_with_users_lets_its_locks_go(
        tmp_path: Path, layer: BlockLayer, how: str) -> None:
    """A file node used straight by an export (allow-inactive) kept its write
    lock once inactive: its users' permissions were refreshed after it turned
    inactive, when the file driver no longer changes locks.  QEMU's users give
    theirs up first (blk_root_inactivate): the node holds no lock bytes."""
    path = tmp_path / "f.img"
    path.write_bytes(bytes(MiB))
    node = await layer.add({"driver": "file", "node-name": "f0", "filename": str(path)})
    export = NodeUser("export", "e0", writable=True, allow_inactive=True)
    await layer.graph.add_user(BdrvChild(name="root", role=ChildRole.image(), child=node,
                                         user=export))
    assert held_bytes(path) == {100, 101, 203}
    await node.write(0, b"x" * 4096)
    if how == "inactivate_all":
        await layer.inactivate_all()
    else:
        await layer.set_active("f0", False)
    assert node.state is NodeState.INACTIVE
    assert held_bytes(path) == set()
    # The destination's qcow2-style use (write and resize) is not refused.
    qemu_img("resize", "-f", "raw", str(path), "2M")
    await layer.set_active("f0", True)
    assert held_bytes(path) == {100, 101, 203}


async def test_inactivate_all_after_a_failed_re_read_lets_the_child_go_too(
        tmp_path: Path, layer: BlockLayer) -> None:
    """A destination whose re-read failed inactivates everything, so that
    nothing is held while nothing may run: the failed qcow2 node was left
    inactive over an active file child, which inactivate_all (from the roots)
    never reached, with its write locks."""
    node = await layer.add(qcow2(tmp_path, "d"))
    twin = await layer.add(qcow2(tmp_path, "twin"))
    path = tmp_path / "d.qcow2"
    await node.write(0, b"\x01" * 4096)
    await twin.write(0, b"\x01" * 4096)
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(BlockDriverError):
        await layer.graph.reload_active([node])
    await layer.inactivate_all()
    assert node.file is not None and node.file.state is NodeState.INACTIVE
    # What an inactivation that went well leaves (the shared read byte).
    assert held_bytes(path) == held_bytes(tmp_path / "twin.qcow2") == {100}


async def test_a_used_node_that_must_reopen_read_only_drops_its_locks_too(
        tmp_path: Path, layer: BlockLayer) -> None:
    path = tmp_path / "f.img"
    path.write_bytes(bytes(MiB))
    node = await layer.add({"driver": "file", "node-name": "f0", "filename": str(path),
                            "auto-read-only": True})
    export = NodeUser("export", "e0", writable=True, allow_inactive=True)
    await layer.graph.add_user(BdrvChild(name="root", role=ChildRole.image(), child=node,
                                         user=export))
    assert held_bytes(path)
    await layer.inactivate_all()
    assert node.state is NodeState.INACTIVE
    assert held_bytes(path) == set()


async def test_users_that_conflict_meet_at_activation(
        tmp_path: Path, layer: BlockLayer) -> None:
    """Users ask nothing of an inactive node, so two that conflict can both
    be added to it; activation checks them against each other, as QEMU's
    re-activation of its BlockBackends' permissions does."""
    path = tmp_path / "f.img"
    path.write_bytes(bytes(MiB))
    node = await layer.add({"driver": "file", "node-name": "f0", "filename": str(path)},
                           inactive=True)
    for user in (NodeUser("export", "e0", writable=True, allow_inactive=True),
                 JobNodeUser(kind="mirror job", id="j", writable=True,
                             perm=Perm.WRITE | Perm.RESIZE,
                             shared=Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)):
        await layer.graph.add_user(BdrvChild(name="u", role=ChildRole(0), child=node,
                                             user=user))
    with pytest.raises(QMPError, match="write"):
        await layer.set_active("f0", True)
    assert node.state is NodeState.INACTIVE
    assert held_bytes(path) == set()
