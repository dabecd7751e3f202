"""Inactivation of the whole graph (the migration source's switchover), on real images.

Trees with nothing to write back are inactivated one after another in the
caller's task, trees with something to write or sync in tasks of their own;
whichever way a tree goes, the result must be the same: data on disk, write
locks dropped, a refusal that names its node and leaves its tree whole.
"""

from __future__ import annotations

import asyncio
import fcntl
import gc
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from qmpd.block.driver import BdrvChild, BlockNode, ChildRole, NodeState, NodeUser, Perm
from qmpd.block.locking import (
    PERM_BASE,
    SHARED_BASE,
    ImageLock,
    byte_is_locked_by_others,
    lock_byte,
)
from qmpd.errors import BlockDriverError
from qmpd.metrics import Metrics
from qmpd.migration.manager import MigrationManager
from qmpd.qmp.events import EventBus
from qmpd.runstate import RunState
from qmpd.vm import VirtualMachine
from tests.support.block import qcow2
from tests.support.tools import QEMU_IO, qemu_img, qemu_io, require_tool

MiB = 1 << 20


def tree_nodes(layer: BlockLayer, name: str) -> list[BlockNode]:
    node = layer.graph.lookup(name)
    assert node is not None and node.file is not None
    return [node, node.file]


def holds_write(layer: BlockLayer, name: str) -> bool:
    file = tree_nodes(layer, name)[1]
    return bool(file.cumulative_perms()[0] & Perm.WRITE)


async def test_pending_writes_hint_follows_writes_and_flushes(
    tmp_path: Path, layer: BlockLayer
) -> None:
    node = await layer.add(qcow2(tmp_path, "a"))
    file = node.file
    assert file is not None
    assert not node.driver.has_pending_writes() and not file.driver.has_pending_writes()
    await node.write(0, b"\x11" * 65536)  # allocates: L2 and refcount updates
    assert node.driver.has_pending_writes() or file.driver.has_pending_writes()
    await node.flush()
    assert not node.driver.has_pending_writes() and not file.driver.has_pending_writes()

    raw_path = tmp_path / "b.raw"
    raw_path.write_bytes(bytes(MiB))
    raw = await layer.add({"driver": "raw", "node-name": "b",
                           "file": {"driver": "file", "node-name": "b-file",
                                    "filename": str(raw_path)}})
    assert raw.file is not None
    await raw.write(0, b"\x22" * 4096)
    assert not raw.driver.has_pending_writes()  # its file child speaks for it
    assert raw.file.driver.has_pending_writes()
    await raw.flush()
    assert not raw.file.driver.has_pending_writes()


@pytest.mark.parametrize("dirty", [(), ("t1",), ("t0", "t2"), ("t0", "t1", "t2", "t3")])
async def test_inactivate_all_writes_back_and_drops_the_write_locks(
    tmp_path: Path, layer: BlockLayer, dirty: tuple[str, ...]
) -> None:
    require_tool(QEMU_IO)
    names = [f"t{i}" for i in range(4)]
    for name in names:
        await layer.add(qcow2(tmp_path, name))
    for i, name in enumerate(names):
        node, file = tree_nodes(layer, name)
        await node.write(0, bytes([0x40 + i]) * 65536)
        if name not in dirty:
            await node.flush()
        pending = node.driver.has_pending_writes() or file.driver.has_pending_writes()
        assert pending == (name in dirty)
    # t3 ends with only data in the page cache (a rewrite of allocated clusters:
    # no metadata changes), which must be synced too.
    node, file = tree_nodes(layer, "t3")
    await node.write(0, bytes([0x43]) * 65536)
    assert file.driver.has_pending_writes()
    await layer.inactivate_all()
    for i, name in enumerate(names):
        assert [n.state for n in tree_nodes(layer, name)] == [NodeState.INACTIVE] * 2
        assert not holds_write(layer, name)
        assert not any(n.driver.has_pending_writes() for n in tree_nodes(layer, name))
        # Another process may now write the image (no write lock is left), and
        # finds what was written, metadata included, on disk.
        path = tmp_path / f"{name}.qcow2"
        res = qemu_io("-f", "qcow2", "-c", f"read -P {0x40 + i} 0 64k",
                      "-c", "write -P 0x7f 1M 4k", str(path))
        assert res.returncode == 0 and "Pattern verification failed" not in res.stdout, res
        qemu_img("check", str(path))


class Exporter(NodeUser):
    """A writable user without allow-inactive: its node refuses inactivation."""


@pytest.mark.parametrize("dirty", [(), ("t1",), ("t3",), ("t0", "t1", "t2", "t3")])
async def test_refused_trees_stay_whole_and_the_first_refusal_is_raised(
    tmp_path: Path, layer: BlockLayer, dirty: tuple[str, ...]
) -> None:
    names = [f"t{i}" for i in range(4)]
    for name in names:
        await layer.add(qcow2(tmp_path, name))
    for name in ("t1", "t3"):  # two trees refuse: t1 was created first
        node = tree_nodes(layer, name)[0]
        await layer.graph.add_user(BdrvChild(name="root", role=ChildRole.image(), child=node,
                                             user=Exporter("export", f"e-{name}",
                                                           writable=True)))
    for name in dirty:
        await tree_nodes(layer, name)[0].write(0, b"\x33" * 65536)
    with pytest.raises(BlockDriverError) as exc:
        await layer.inactivate_all()
    assert str(exc.value) == "Node 't1' is in use by export 'e-t1'"
    for name in names:
        states = [n.state for n in tree_nodes(layer, name)]
        if name in ("t1", "t3"):
            assert states == [NodeState.ACTIVE] * 2 and holds_write(layer, name)
        else:
            assert states == [NodeState.INACTIVE] * 2 and not holds_write(layer, name)


async def test_flush_all_syncs_dirty_trees_and_keeps_them_active(
    tmp_path: Path, layer: BlockLayer
) -> None:
    names = [f"t{i}" for i in range(3)]
    for name in names:
        await layer.add(qcow2(tmp_path, name))
    await tree_nodes(layer, "t1")[0].write(0, b"\x44" * 65536)
    await layer.flush_all()
    for name in names:
        node, file = tree_nodes(layer, name)
        assert node.active and file.active and holds_write(layer, name)
        assert not node.driver.has_pending_writes() and not file.driver.has_pending_writes()


# --- the migration source, with qcow2 images (one of them dirty) -----------------------


class Sink:
    pretty = False

    def __init__(self) -> None:
        self.names: list[str] = []

    def send_event(self, plain: bytes, pretty: bytes | None) -> None:
        import json

        msg = json.loads(plain)
        data = msg.get("data") or {}
        self.names.append(msg["event"] + (f":{data['status']}" if "status" in data else ""))


async def side(state: RunState, options: list[dict[str, Any]]
               ) -> tuple[BlockLayer, MigrationManager, VirtualMachine, Sink]:
    metrics = Metrics()
    bus = EventBus(metrics)
    block = BlockLayer(metrics)
    vm = VirtualMachine(bus, state, autostart=True, block=block, metrics=metrics)
    manager = MigrationManager(events=bus, vm=vm, block=block, metrics=metrics,
                               request_exit=lambda status: None)
    sink = Sink()
    bus.subscribe(sink)
    for opts in options:
        await block.add(opts, inactive=state == RunState.INMIGRATE)
    manager.set_capabilities([{"capability": "events", "state": True}])
    return block, manager, vm, sink


async def test_source_hands_over_what_it_wrote(tmp_path: Path) -> None:
    options = [qcow2(tmp_path, f"t{i}") for i in range(3)]
    src_block, src, src_vm, src_events = await side(RunState.RUNNING, options)
    dst_block, dst, dst_vm, dst_events = await side(RunState.INMIGRATE, options)
    try:
        # t1 is left dirty (unflushed metadata and data), the others clean.
        await tree_nodes(src_block, "t0")[0].write(0, b"\x50" * 65536)
        await tree_nodes(src_block, "t0")[0].flush()
        await tree_nodes(src_block, "t1")[0].write(MiB, b"\x51" * 65536)
        a, b = socket.socketpair()
        src.fds.add("mig", a.detach())
        dst.fds.add("mig", b.detach())
        await dst.migrate_incoming("fd:mig")
        src.migrate({"uri": "fd:mig"})
        assert src.outgoing.task is not None and dst.incoming.task is not None
        await asyncio.wait_for(src.outgoing.task, 10)
        await asyncio.wait_for(dst.incoming.task, 10)
        assert src_events.names[-3:] == ["STOP", "MIGRATION_PASS", "MIGRATION:completed"]
        assert dst_events.names[-2:] == ["RESUME", "MIGRATION:completed"]
        assert src_vm.state == RunState.POSTMIGRATE and dst_vm.state == RunState.RUNNING
        for name in ("t0", "t1", "t2"):
            assert not holds_write(src_block, name) and holds_write(dst_block, name)
            assert all(not n.active for n in tree_nodes(src_block, name))
        dst_t0, dst_t1 = tree_nodes(dst_block, "t0")[0], tree_nodes(dst_block, "t1")[0]
        assert await dst_t0.read(0, 65536) == b"\x50" * 65536
        assert await dst_t1.read(MiB, 65536) == b"\x51" * 65536
        assert gc.isenabled()  # paused for the switchover only
    finally:
        for block in (src_block, dst_block):
            await block.close_all()
            block.graph.close()


async def test_a_source_writes_back_before_it_stops(tmp_path: Path) -> None:
    """What the source's images have to write back is written before the STOP
    (the guest still running), only for the trees that have something to
    write; the switchover then finds nothing, and the destination reads it."""
    options = [qcow2(tmp_path, f"t{i}") for i in range(3)]
    src_block, src, src_vm, src_events = await side(RunState.RUNNING, options)
    dst_block, dst, _, _ = await side(RunState.INMIGRATE, options)
    at_stop: dict[str, tuple[bool, int]] = {}

    class StopWatch(Sink):
        def send_event(self, plain: bytes, pretty: bytes | None) -> None:
            if b'"STOP"' in plain:
                for name in ("t0", "t1", "t2"):
                    node, file = tree_nodes(src_block, name)
                    at_stop[name] = (node.driver.has_pending_writes()
                                     or file.driver.has_pending_writes(),
                                     node.stats.flush_operations)

    src_vm.events.subscribe(StopWatch())
    try:
        await tree_nodes(src_block, "t1")[0].write(MiB, b"\x52" * 65536)  # t1 dirty
        a, b = socket.socketpair()
        src.fds.add("mig", a.detach())
        dst.fds.add("mig", b.detach())
        await dst.migrate_incoming("fd:mig")
        src.migrate({"uri": "fd:mig"})
        assert src.outgoing.task is not None and dst.incoming.task is not None
        await asyncio.wait_for(src.outgoing.task, 10)
        await asyncio.wait_for(dst.incoming.task, 10)
        assert src_events.names[-3:] == ["STOP", "MIGRATION_PASS", "MIGRATION:completed"]
        assert at_stop == {"t0": (False, 0), "t1": (False, 1), "t2": (False, 0)}
        assert await tree_nodes(dst_block, "t1")[0].read(MiB, 65536) == b"\x52" * 65536
        for name in ("t0", "t1", "t2"):
            assert not holds_write(src_block, name) and holds_write(dst_block, name)
    finally:
        for block in (src_block, dst_block):
            await block.close_all()
            block.graph.close()


async def test_inactivation_only_lets_go_of_lock_bytes(tmp_path: Path, layer: BlockLayer) -> None:
    """Dropping permissions checks nothing (as QEMU's raw_handle_perm_lock): even a
    peer that refuses to share consistent read does not stop the inactivation."""
    opts = qcow2(tmp_path, "t0")
    await layer.add(opts)
    peer = os.open(opts["file"]["filename"], os.O_RDONLY)
    try:
        assert byte_is_locked_by_others(peer, PERM_BASE + 1)  # our write byte
        lock_byte(peer, SHARED_BASE + 0)  # the peer does not share consistent read
        await layer.inactivate_all()
        assert [n.state for n in tree_nodes(layer, "t0")] == [NodeState.INACTIVE] * 2
        assert byte_is_locked_by_others(peer, PERM_BASE + 0)  # consistent read is kept
        for bit in (1, 3):  # write and resize, held and unshared, are let go
            assert not byte_is_locked_by_others(peer, PERM_BASE + bit)
            assert not byte_is_locked_by_others(peer, SHARED_BASE + bit)
    finally:
        os.close(peer)


@pytest.mark.parametrize(("before", "after"), [
    ((0b1011, 0b1010), (0b0001, 0b0000)),  # inactivation: write and resize go
    ((0b1111, 0b1111), (0b0010, 0b0100)),  # bytes kept between the ones let go
    ((0b1111, 0b0110), (0b0000, 0b0000)),  # everything goes
    ((0b0101, 0b1001), (0b0100, 0b1000)),
    ((0b1011, 0b0001), (0b0001, 0b0000)),  # one unlock spanning both sets
    ((0b1011, 0b1011), (0b0001, 0b0001)),  # a kept byte between the sets' dropped ones
    ((0b0001, 0b1010), (0b0001, 0b0000)),  # only unshared bytes go
])
def test_letting_go_leaves_exactly_the_kept_bytes(
    tmp_path: Path, before: tuple[int, int], after: tuple[int, int]
) -> None:
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR)
    peer = os.open(path, os.O_RDONLY)
    try:
        lock = ImageLock(fd)
        lock.update(Perm(before[0]), Perm(~before[1] & 0xF))
        lock.update(Perm(after[0]), Perm(~after[1] & 0xF))
        assert (lock.held, lock.unshared) == after
        for base, bits in ((PERM_BASE, after[0]), (SHARED_BASE, after[1])):
            seen = [byte_is_locked_by_others(peer, base + i) for i in range(4)]
            assert seen == [bool(bits >> i & 1) for i in range(4)]
    finally:
        os.close(peer)
        os.close(fd)


def test_a_reused_unlock_plan_lets_go_of_each_files_own_bytes(tmp_path: Path) -> None:
    """The unlock requests made for one change of sets serve every later lock
    making the same change: on another file, and step by step down to nothing."""
    steps = [(0b1011, 0b1010), (0b1001, 0b1000), (0b0001, 0b0000), (0b0000, 0b0000)]
    fds = []
    try:
        for name in ("a", "b"):
            path = tmp_path / name
            path.write_bytes(bytes(4096))
            fds.append((os.open(path, os.O_RDWR), os.open(path, os.O_RDONLY)))
        for fd, peer in fds:
            lock = ImageLock(fd)
            for held, unshared in steps:
                lock.update(Perm(held), Perm(~unshared & 0xF))
                assert (lock.held, lock.unshared) == (held, unshared)
                for base, bits in ((PERM_BASE, held), (SHARED_BASE, unshared)):
                    seen = [byte_is_locked_by_others(peer, base + i) for i in range(4)]
                    assert seen == [bool(bits >> i & 1) for i in range(4)]
    finally:
        for pair in fds:
            for fd in pair:
                os.close(fd)


async def test_refused_switchover_resumes_with_the_collector_running(tmp_path: Path) -> None:
    options = [qcow2(tmp_path, f"t{i}") for i in range(2)]
    src_block, src, src_vm, src_events = await side(RunState.RUNNING, options)
    try:
        node = tree_nodes(src_block, "t1")[0]
        await src_block.graph.add_user(BdrvChild(name="root", role=ChildRole.image(),
                                                 child=node, user=Exporter("export", "w0",
                                                                           writable=True)))
        a, b = socket.socketpair()
        src.fds.add("mig", a.detach())
        src.migrate({"uri": "fd:mig"})
        assert src.outgoing.task is not None
        await asyncio.wait_for(src.outgoing.task, 10)
        b.close()
        assert src_events.names[-4:] == ["STOP", "MIGRATION_PASS", "MIGRATION:failed", "RESUME"]
        assert src_vm.state == RunState.RUNNING
        assert all(n.active for name in ("t0", "t1") for n in tree_nodes(src_block, name))
        assert gc.isenabled()
    finally:
        await src_block.close_all()
        src_block.graph.close()


async def test_a_file_to_reopen_takes_the_waiting_path(tmp_path: Path, layer: BlockLayer) -> None:
    """auto-read-only: dropping write reopens the file read-only (I/O in a thread),
    so that tree finishes asynchronously; the clean trees beside it without waiting,
    and every tree ends inactive without write locks."""
    for name in ("t0", "t1", "t2"):
        opts = qcow2(tmp_path, name)
        if name == "t1":
            opts["file"]["auto-read-only"] = True
        await layer.add(opts)
    file = tree_nodes(layer, "t1")[1]
    assert file.driver.fd >= 0 and os.O_RDWR & fcntl_flags(file.driver.fd)
    assert not file.driver.set_perm_now(0, 0b1111)  # would reopen: must wait
    await layer.inactivate_all()
    for name in ("t0", "t1", "t2"):
        assert [n.state for n in tree_nodes(layer, name)] == [NodeState.INACTIVE] * 2
        assert not holds_write(layer, name)
        peer = os.open(tree_nodes(layer, name)[1].driver.path, os.O_RDONLY)
        try:
            assert byte_is_locked_by_others(peer, PERM_BASE + 0)
            assert not byte_is_locked_by_others(peer, PERM_BASE + 1)
            assert not byte_is_locked_by_others(peer, SHARED_BASE + 1)
        finally:
            os.close(peer)
    assert not os.O_RDWR & fcntl_flags(file.driver.fd)  # reopened read-only


async def test_a_tree_that_fails_leaves_every_node_whole(tmp_path: Path, layer: BlockLayer) -> None:
    """t1's file must reopen read-only to let go of write, and its image is gone:
    that fails with a message naming the image.  Every node is then whole: the
    other trees inactive without write bytes, t1's file still active with them
    (its qcow2 node inactive, its image clean); activation takes all back."""
    for name in ("t0", "t1", "t2"):
        opts = qcow2(tmp_path, name)
        if name == "t1":
            opts["file"]["auto-read-only"] = True
        await layer.add(opts)
    gone = tmp_path / "t1.qcow2"
    peers = {name: os.open(tmp_path / f"{name}.qcow2", os.O_RDONLY) for name in ("t0", "t1", "t2")}
    try:
        gone.rename(tmp_path / "moved.qcow2")
        with pytest.raises(BlockDriverError, match=f"Could not open '{gone}'"):
            await layer.inactivate_all()
        for name, peer in peers.items():
            node, file = tree_nodes(layer, name)
            writes = byte_is_locked_by_others(peer, PERM_BASE + 1)
            assert byte_is_locked_by_others(peer, PERM_BASE + 0)
            assert writes == (file.state is NodeState.ACTIVE) == (name == "t1"), name
            assert node.state is NodeState.INACTIVE, name
            assert holds_write(layer, name) == (name == "t1")
        (tmp_path / "moved.qcow2").rename(gone)
        await layer.activate_all()
        for name, peer in peers.items():
            assert [n.state for n in tree_nodes(layer, name)] == [NodeState.ACTIVE] * 2
            assert byte_is_locked_by_others(peer, PERM_BASE + 1)
            assert byte_is_locked_by_others(peer, SHARED_BASE + 1)
    finally:
        for peer in peers.values():
            os.close(peer)


def fcntl_flags(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_drivers_locking_without_waiting_say_so() -> None:
    """A driver overriding set_perm overrides set_perm_now too: the graph's
    synchronous path calls only the latter, so forgetting it is refused."""
    from qmpd.block.driver import BlockDriver
    from qmpd.block.registry import load_all

    with pytest.raises(TypeError, match="overrides set_perm but not set_perm_now"):
        class Forgetful(BlockDriver):
            async def set_perm(self, perm: Perm, shared: Perm) -> None:
                return None

    class Both(BlockDriver):
        async def set_perm(self, perm: Perm, shared: Perm) -> None:
            return None

        def set_perm_now(self, perm: int, shared: int) -> bool:
            return False

    load_all()  # every shipped driver's class was made, so passed the check


async def test_trees_rehearsed_before_a_graph_change_are_worked_out_again(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """The rehearsal keeps the trees for the switchover; a node added, removed
    or given a new parent after it must still be inactivated (or left alone)."""
    for name in ("a", "b", "c"):
        await layer.add(qcow2(tmp_path, name))
    layer.graph.rehearse_inactivation()
    await layer.add(qcow2(tmp_path, "late"))  # a new tree
    await layer.delete("b")  # a tree gone
    # "c" stops being a root: a raw node over it.
    await layer.add({"driver": "raw", "node-name": "top", "file": "c"})
    await layer.inactivate_all()
    for name in ("a", "late", "c"):
        assert [n.state for n in tree_nodes(layer, name)] == [NodeState.INACTIVE] * 2, name
        assert not holds_write(layer, name)
    top = layer.graph.lookup("top")
    assert top is not None and top.state is NodeState.INACTIVE
    assert layer.graph.lookup("b") is None
    await layer.activate_all()
    layer.graph.rehearse_inactivation()
    await layer.inactivate_all()
    assert all(n.state is NodeState.INACTIVE for n in layer.graph.nodes.values())
