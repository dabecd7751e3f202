"""The migration source's rehearsal of its switchover changes nothing.

Just before the stop, the source goes through what the downtime's
inactivation reads (drivers' checks, lock plans, an F_OFD_GETLK on the bytes
held) and encodes the downtime's events, so that the downtime runs on warm
code and data.  It must leave every node, edge, lock byte, file and
descriptor as it found them, and send no event: the snapshot compared here
covers all of them, and the negative controls show that it sees a rehearsal
that does change something.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from qmpd.block.driver import BdrvChild, ChildRole, NodeUser
from qmpd.block.file import FileDriver
from qmpd.block.locking import PERM_BASE, ImageLock, lock_byte
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.errors import BlockDriverError
from qmpd.metrics import Metrics
from qmpd.qmp.events import EventBus
from qmpd.runstate import RunState
from tests.support.block import qcow2

MiB = 1 << 20


class Exporter(NodeUser):
    """A writable user without allow-inactive (its node refuses inactivation)."""


def _locks(paths: list[Path]) -> dict[str, list[str]]:
    """Every /proc/locks line on each image's inode, without its position
    number and inode (what anyone holds on it)."""
    inodes = {}
    for path in paths:
        st = os.stat(path)
        inodes[f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"] = path.name
    out: dict[str, list[str]] = {name: [] for name in inodes.values()}
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()[1:]  # N: OFDLCK ADVISORY READ pid dev:ino start end
            if len(fields) >= 7 and fields[4] in inodes:
                out[inodes[fields[4]]].append(" ".join(fields[:4] + fields[5:]))
    return {name: sorted(lines) for name, lines in out.items()}


def snapshot(layer: BlockLayer, paths: list[Path]) -> dict[str, Any]:
    """Everything a rehearsal could change: node states and driver state,
    edge permissions, held lock bytes (ours and /proc/locks), the files'
    bytes and times, and this process's descriptors."""
    nodes: dict[str, Any] = {}
    for name, node in sorted(layer.graph.nodes.items()):
        driver = node.driver
        entry: dict[str, Any] = {
            "state": node.state, "read_only": node.read_only,
            "perms": node.cumulative_perms(),
            "parents": [(e.perm, e.shared) for e in node.parents],
            "children": {k: (e.perm, e.shared) for k, e in node.children.items()},
            "pending": driver.has_pending_writes(),
        }
        if isinstance(driver, Qcow2Driver):
            image = driver._image
            assert image is not None
            entry["image"] = (image.writable, image.idle(), image.broken)
        if isinstance(driver, FileDriver):
            entry["file"] = (driver.locks_held(), driver._gens.written, driver._gens.flushed, driver.fd)
        nodes[name] = entry
    files = {}
    for path in paths:
        st = os.stat(path)
        files[path.name] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                            hashlib.sha256(path.read_bytes()).hexdigest())
    return {"nodes": nodes, "locks": _locks(paths), "files": files,
            "fds": sorted(os.listdir("/proc/self/fd"))}


async def graph_with_every_kind_of_tree(tmp_path: Path, layer: BlockLayer) -> list[Path]:
    """Clean, dirty, in use by a writable user, read-only, raw, and one whose
    lock bytes another open file also holds (its GETLK finds someone)."""
    for name in ("clean", "dirty", "used", "other"):
        await layer.add(qcow2(tmp_path, name))
    ro = qcow2(tmp_path, "ro")
    ro["read-only"] = True
    await layer.add(ro)
    raw_path = tmp_path / "raw.img"
    raw_path.write_bytes(bytes(MiB))
    await layer.add({"driver": "raw", "node-name": "raw",
                     "file": {"driver": "file", "node-name": "raw-file",
                              "filename": str(raw_path)}})
    dirty = layer.graph.lookup("dirty")
    assert dirty is not None
    await dirty.write(0, b"\x5a" * 65536)  # left unflushed
    used = layer.graph.lookup("used")
    assert used is not None
    await layer.graph.add_user(BdrvChild(name="root", role=ChildRole.image(), child=used,
                                         user=Exporter("export", "e", writable=True)))
    return [tmp_path / f"{n}.qcow2" for n in ("clean", "dirty", "used", "other", "ro")] \
        + [raw_path]


def _drop_write_lock(driver: FileDriver) -> None:
    lock = driver.lock
    if lock is not None and lock.held:
        lock.update(lock.held & ~0b0010, ~lock.unshared & 0b1111)


def _mark_clean(driver: Qcow2Driver) -> None:
    driver.inactivate_now()  # a clean image turns read-only: a state change


def _touch_file(driver: FileDriver) -> None:
    os.pwrite(driver.fd, b"\0", 4 * MiB - 1)


#: Rehearsals with a side effect each: the snapshot must see every one.
SIDE_EFFECTS: dict[str, tuple[type, Callable[[Any], None]]] = {
    "lock": (FileDriver, _drop_write_lock),
    "state": (Qcow2Driver, _mark_clean),
    "file": (FileDriver, _touch_file),
}


@pytest.mark.parametrize("side_effect", [None, *SIDE_EFFECTS])
async def test_rehearsing_the_inactivation_changes_nothing(
    tmp_path: Path, layer: BlockLayer, monkeypatch: pytest.MonkeyPatch,
    side_effect: str | None,
) -> None:
    paths = await graph_with_every_kind_of_tree(tmp_path, layer)
    other = os.open(tmp_path / "other.qcow2", os.O_RDONLY)
    try:
        lock_byte(other, PERM_BASE)  # another holder of a byte the node holds too
        rehearsed: list[str] = []
        real = ImageLock.rehearse_let_go

        def counted(lock: ImageLock, bits: int) -> None:
            rehearsed.append(str(lock.fd))
            real(lock, bits)

        monkeypatch.setattr(ImageLock, "rehearse_let_go", counted)
        if side_effect is not None:  # the negative control: a rehearsal that does something
            cls, effect = SIDE_EFFECTS[side_effect]
            original = cls.rehearse_inactivation

            def with_side_effect(driver: Any) -> None:
                original(driver)
                effect(driver)

            monkeypatch.setattr(cls, "rehearse_inactivation", with_side_effect)
        before = snapshot(layer, paths)
        layer.rehearse_inactivation()  # the source's call: the first few nodes
        layer.graph.rehearse_inactivation(runs=3, few=len(layer.graph.nodes))
        after = snapshot(layer, paths)
        if side_effect is None:
            assert after == before
            # It did rehearse: the lock plans of the clean, used, other and ro
            # trees' files and of the raw file (the dirty one has a write back
            # to do, whose checks come first).
            assert len(set(rehearsed)) == 5
        else:
            assert after != before
    finally:
        os.close(other)


async def test_the_inactivation_after_a_rehearsal_is_the_usual_one(
    tmp_path: Path, layer: BlockLayer
) -> None:
    """Rehearsed or not, the inactivation refuses the tree in use and drops
    every other tree's write locks (compared with a layer never rehearsed)."""
    results = []
    for rehearse in (False, True):
        block = BlockLayer()
        try:
            (tmp_path / str(rehearse)).mkdir()
            paths = await graph_with_every_kind_of_tree(tmp_path / str(rehearse), block)
            if rehearse:
                block.rehearse_inactivation()
            with pytest.raises(BlockDriverError) as exc:
                await block.inactivate_all()
            state = snapshot(block, paths)
            for entry in state["nodes"].values():
                entry.pop("file", None)  # descriptor numbers differ
            results.append((str(exc.value), state["nodes"], state["locks"]))
        finally:
            await block.close_all()
            block.graph.close()
    assert results[0][0] == "Node 'used' is in use by export 'e'"
    assert results[0] == results[1]


def test_rehearsed_events_are_encoded_as_emitted_and_sent_nowhere() -> None:
    metrics = Metrics()
    bus = EventBus(metrics)
    sent: list[bytes] = []

    class Sink:
        pretty = False

        def send_event(self, plain: bytes, pretty: bytes | None) -> None:
            sent.append(plain)

    bus.subscribe(Sink())
    before = metrics.events.labels("MIGRATION")._value.get()
    rehearsed = bus.rehearse("MIGRATION", {"status": "completed"})
    assert sent == [] and metrics.events.labels("MIGRATION")._value.get() == before
    bus.emit("MIGRATION", {"status": "completed"})
    assert len(sent) == 1
    strip = [json.loads(m) for m in (rehearsed, sent[0])]
    for msg in strip:
        del msg["timestamp"]
    assert strip[0] == strip[1]
    assert rehearsed.split(b'"event"', 1)[1] == sent[0].split(b'"event"', 1)[1]


@pytest.mark.parametrize("pause", [False, True])
async def test_the_source_rehearses_before_its_stop_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pause: bool
) -> None:
    """The rehearsal comes after the write-back, before the STOP, with the
    VM still running; held before the switchover (the wait would cool
    everything again) there is none.  Events and hand-over are the usual."""
    from tests.unit.test_graph_inactivation import holds_write, side

    options = [qcow2(tmp_path, f"t{i}") for i in range(2)]
    src_block, src, src_vm, src_events = await side(RunState.RUNNING, options)
    dst_block, dst, _, dst_events = await side(RunState.INMIGRATE, options)
    if pause:
        src.set_capabilities([{"capability": "pause-before-switchover", "state": True}])
    calls: list[tuple[RunState, list[str], bool]] = []
    real = src_block.rehearse_inactivation

    def watched() -> None:
        calls.append((src_vm.state, list(src_events.names),
                      all(node.active for node in src_block.graph.all_nodes())))
        real()

    monkeypatch.setattr(src_block, "rehearse_inactivation", watched)
    try:
        a, b = socket.socketpair()
        src.fds.add("mig", a.detach())
        dst.fds.add("mig", b.detach())
        await dst.migrate_incoming("fd:mig")
        src.migrate({"uri": "fd:mig"})
        if pause:
            while src.outgoing.status.value != "pre-switchover":
                await asyncio.sleep(0.01)
            src.continue_("pre-switchover")
        assert src.outgoing.task is not None and dst.incoming.task is not None
        await asyncio.wait_for(src.outgoing.task, 10)
        await asyncio.wait_for(dst.incoming.task, 10)
        if pause:
            assert calls == []
            assert src_events.names[-5:] == ["STOP", "MIGRATION:pre-switchover",
                                             "MIGRATION:device", "MIGRATION_PASS",
                                             "MIGRATION:completed"]
        else:
            assert calls == [(RunState.RUNNING,
                              ["MIGRATION:setup", "MIGRATION_PASS", "MIGRATION:active"], True)]
            assert src_events.names[-3:] == ["STOP", "MIGRATION_PASS", "MIGRATION:completed"]
        assert dst_events.names[-2:] == ["RESUME", "MIGRATION:completed"]
        for name in ("t0", "t1"):
            assert not holds_write(src_block, name) and holds_write(dst_block, name)
    finally:
        for block in (src_block, dst_block):
            await block.close_all()
            block.graph.close()
