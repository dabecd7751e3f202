"""What reads or rewrites a node's metadata outside its requests waits for an
activation's reload of the node (or one below it), as requests do: an
inactivation's write-back, a persistent bitmap's removal and a job's
backing-file rewrite would write an image's header and directories from the
tables being replaced, and a mirror's host-file span would be mapped through
them.  In process, on real images; the
node is held as an activation holds it (``hold_requests``)."""

from __future__ import annotations

import asyncio
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import qmpd.block.qcow2.driver as qcow2_driver
from qmpd.block.core import BlockLayer
from qmpd.block.driver import BlockNode, NodeState
from qmpd.commands.bitmaps import block_dirty_bitmap_add
from qmpd.jobs.commit import CommitJob
from qmpd.jobs.stream import StreamJob
from tests.support.block import mirror_until_ready, qcow2
from tests.support.tools import qemu_img, qemu_io

MiB = 1 << 20
#: QCOW2_EXT_MAGIC_BITMAPS, the header extension of persistent bitmaps.
BITMAPS_EXT = 0x23852875


def header(path: Path) -> tuple[bytes, set[int]]:
    """The backing file name in the image's header, and its extensions' magics."""
    raw = path.read_bytes()[:65536]
    offset, length = struct.unpack_from(">QI", raw, 8)
    version = struct.unpack_from(">I", raw, 4)[0]
    pos = struct.unpack_from(">I", raw, 100)[0] if version >= 3 else 72
    magics = set()
    while pos + 8 <= len(raw):
        magic, size = struct.unpack_from(">II", raw, pos)
        if magic == 0:
            break
        magics.add(magic)
        pos += 8 + -(-size // 8) * 8
    return raw[offset:offset + length], magics


async def still_waiting(task: asyncio.Task[Any]) -> bool:
    await asyncio.sleep(0.2)
    return not task.done()


async def completes_after_the_reload(job: StreamJob | CommitJob, top: BlockNode,
                                     old: Path, new: Path | None) -> None:
    """``job``'s completion while ``top`` is held: neither its header (which
    names ``old``) nor the graph changes before the release; then the header
    names ``new``."""
    path = Path(top.driver.filename())
    await top.driver.change_backing_file(str(old), "qcow2")
    below = top.backing
    top.hold_requests()
    try:
        prepare = asyncio.create_task(job.prepare())
        assert await still_waiting(prepare)
        assert header(path)[0] == str(old).encode()
        assert top.backing is below
    finally:
        top.release_requests()
    await asyncio.wait_for(prepare, 10)
    assert header(path)[0] == (str(new).encode() if new is not None else b"")


async def test_a_stream_rewrites_the_backing_name_after_the_reload(
        layer: BlockLayer, tmp_path: Path) -> None:
    base = await layer.add(qcow2(tmp_path, "base"))
    top = await layer.add({**qcow2(tmp_path, "top"), "backing": "base"})
    job = StreamJob("j", layer, top, base, None, "report", 0, True, True)
    await completes_after_the_reload(job, top, tmp_path / "base.qcow2", None)


async def test_a_commit_rewrites_the_backing_name_after_the_reload(
        layer: BlockLayer, tmp_path: Path) -> None:
    base = await layer.add(qcow2(tmp_path, "base"))
    mid = await layer.add({**qcow2(tmp_path, "mid"), "backing": "base"})
    top = await layer.add({**qcow2(tmp_path, "top"), "backing": "mid"})
    job = CommitJob("j", layer, top, mid, base, None, "report", 0, True, True)
    await completes_after_the_reload(job, top, tmp_path / "mid.qcow2", tmp_path / "base.qcow2")


async def test_a_persistent_bitmap_leaves_the_image_after_the_reload(
        layer: BlockLayer, tmp_path: Path) -> None:
    node = await layer.add(qcow2(tmp_path, "disk"))
    path = tmp_path / "disk.qcow2"
    layer.bitmaps.add({"node": "disk", "name": "b", "persistent": True}).commit()
    await node.driver.store_persistent_bitmaps()
    assert BITMAPS_EXT in header(path)[1]
    node.hold_requests()
    try:
        remove = asyncio.create_task(layer.bitmaps.remove({"node": "disk", "name": "b"}))
        assert await still_waiting(remove)
        assert BITMAPS_EXT in header(path)[1]
    finally:
        node.release_requests()
    (await asyncio.wait_for(remove, 10)).commit()
    assert BITMAPS_EXT not in header(path)[1]
    assert "b" not in node.dirty_bitmaps


async def test_a_persistent_bitmap_is_added_after_the_reload(
        layer: BlockLayer, tmp_path: Path) -> None:
    """block-dirty-bitmap-add (persistent) during a real activation, stopped
    while its qcow2 reload is in an I/O thread (the image is not there then:
    the add would fail with 'No medium found')."""
    node = await layer.add(qcow2(tmp_path, "disk"), inactive=True)
    file = node.file
    assert file is not None
    file.driver.reads_cached = lambda: False  # type: ignore[method-assign]
    gate = asyncio.Event()
    pool_run = layer.graph.io.run

    async def gated(fn: Callable[..., Any], *args: Any) -> Any:
        if node.reloading is not None:  # the reload's blocking part
            await gate.wait()
        return await pool_run(fn, *args)

    layer.graph.io.run = gated  # type: ignore[method-assign]
    activation = asyncio.create_task(layer.set_active("disk", True))
    try:
        async with asyncio.timeout(10):
            while node.reloading is None:
                await asyncio.sleep(0.01)
        ctx: Any = SimpleNamespace(services=SimpleNamespace(block=layer))
        add = asyncio.create_task(block_dirty_bitmap_add(
            ctx, {"node": "disk", "name": "b", "persistent": True}))
        assert await still_waiting(add)
    finally:
        gate.set()
    await asyncio.wait_for(activation, 10)
    await asyncio.wait_for(add, 10)
    assert node.dirty_bitmaps["b"].persistent


async def test_a_mirror_maps_no_span_through_a_source_being_reloaded(
        layer: BlockLayer, tmp_path: Path) -> None:
    """Between two qcow2 files a mirror copies host-file spans, mapped through
    the source's tables; while a node below the source reloads, it reads the
    data through the nodes instead."""
    size = 8 * MiB
    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", src, str(size))
    qemu_img("create", "-q", "-f", "qcow2", tgt, str(size))
    qemu_io("-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", src, check=True)
    source = await layer.add({"driver": "qcow2", "node-name": "src",
                              "file": {"driver": "file", "filename": str(src)}})
    await layer.add({"driver": "qcow2", "node-name": "tgt",
                     "file": {"driver": "file", "filename": str(tgt)}})
    spans: list[str] = []
    pool_run = layer.graph.io.run

    async def counted(fn: Callable[..., Any], *args: Any) -> Any:
        if fn.__name__ == "_copy_span":
            spans.append(fn.__name__)
        return await pool_run(fn, *args)

    layer.graph.io.run = counted  # type: ignore[method-assign]
    file = source.file
    assert file is not None
    file.hold_requests()  # the file node below the source is mid-reload
    try:
        await mirror_until_ready(layer)
    finally:
        file.release_requests()
        await layer.close_all()
    assert spans == []
    qemu_img("compare", "-q", "-f", "qcow2", "-F", "qcow2", src, tgt)


@pytest.mark.parametrize("which", ["all", "node"])
async def test_an_inactivation_waits_for_the_reload(
        layer: BlockLayer, tmp_path: Path, which: str) -> None:
    """The migration's inactivate_all and blockdev-set-active: the drivers
    write back (and store bitmaps) only once the reload is over."""
    node = await layer.add(qcow2(tmp_path, "disk"))
    await node.write(0, b"a" * 65536)  # something to write back
    node.hold_requests()
    try:
        inactivation = asyncio.create_task(
            layer.inactivate_all() if which == "all" else layer.set_active("disk", False))
        assert await still_waiting(inactivation)
        assert node.state is NodeState.ACTIVE
    finally:
        node.release_requests()
    await asyncio.wait_for(inactivation, 10)
    assert node.state is NodeState.INACTIVE
    assert await node.read(0, 65536) == b"a" * 65536


async def test_an_inactive_reads_refresh_overtaken_by_an_activation_keeps_nothing(
        layer: BlockLayer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read of an inactive qcow2 node reloads its metadata first; when an
    activation reloaded meanwhile (after the source's last write), the read's
    older copy replaced the activation's, as a writable image: the source's
    new cluster read as zeros and the next allocation leaked clusters."""
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "16M")
    node = await layer.add({"driver": "qcow2", "node-name": "disk",
                            "file": {"driver": "file", "node-name": "disk-file",
                                     "filename": str(path)}}, inactive=True)
    real = qcow2_driver.read_metadata_blocking
    read_done, go_on = threading.Event(), threading.Event()

    def slow_after_reading(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)  # what the image held at this moment ...
        if not read_done.is_set():
            read_done.set()
            go_on.wait(10)  # ... handed back late, as over a slow network
        return out

    monkeypatch.setattr(qcow2_driver, "read_metadata_blocking", slow_after_reading)
    read = asyncio.create_task(node.read(0, 512))
    assert await asyncio.get_running_loop().run_in_executor(None, read_done.wait, 10)
    # The source's last write: a new L2 table and cluster for 4M.
    qemu_io("--image-opts", "-c", "write -P 0xaa 4M 64k",
            f"driver=qcow2,file.driver=file,file.filename={path},file.locking=off", check=True)
    activation = asyncio.create_task(layer.activate_all())
    await asyncio.sleep(0.2)
    go_on.set()
    await asyncio.wait_for(activation, 10)
    await asyncio.wait_for(read, 10)
    assert node.state is NodeState.ACTIVE
    assert await node.read(4 * MiB, 4) == b"\xaa" * 4
    await node.write(4 * MiB + 65536, b"d" * 4096)
    await node.flush()
    await layer.close_all()
    assert "Pattern verification failed" not in qemu_io(
        "-f", "qcow2", "-c", "read -P 0xaa 4M 64k", str(path)).stdout
    qemu_img("check", str(path))


async def test_a_read_through_a_filter_waits_for_its_childs_own_activation(
        layer: BlockLayer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read through an inactive throttle node refreshes its qcow2 child;
    when the child alone is activated meanwhile, the read went on to the
    child's driver in the middle of its reload (No medium found)."""
    opts = qcow2(tmp_path, "disk")
    opts["file"]["drop-cache"] = True  # the reload runs in an I/O thread (as on NFS)
    await layer.add(opts, inactive=True)
    layer.graph.objects.add_object({"qom-type": "throttle-group", "id": "tg"})
    top = await layer.add({"driver": "throttle", "node-name": "top", "file": "disk",
                           "throttle-group": "tg"}, inactive=True)
    real = qcow2_driver.read_metadata_blocking
    loads: list[int] = []
    first_in = threading.Event()
    release_first, release_second = threading.Event(), threading.Event()

    def gated(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        loads.append(1)
        if len(loads) == 1:  # the read's refresh
            first_in.set()
            release_first.wait(10)
        elif len(loads) == 2:  # the activation's reload
            release_second.wait(10)
        return out

    monkeypatch.setattr(qcow2_driver, "read_metadata_blocking", gated)
    read = asyncio.ensure_future(top.read(0, 512))
    assert await asyncio.get_running_loop().run_in_executor(None, first_in.wait, 10)
    activation = asyncio.ensure_future(layer.set_active("disk", True))
    async with asyncio.timeout(10):
        while len(loads) < 2:
            await asyncio.sleep(0.01)
    release_first.set()
    await asyncio.sleep(0.2)
    assert not read.done(), "the read did not wait for the child's reload"
    release_second.set()
    await asyncio.wait_for(activation, 10)
    assert await asyncio.wait_for(read, 10) == bytes(512)
