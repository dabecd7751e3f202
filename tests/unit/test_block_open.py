"""blockdev-add of a format over an inline file: one I/O-thread job for both
nodes, with the errors (and their order) of opening them one after another."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from qmpd.block.driver import BlockDriverError
from qmpd.block.file import FileDriver
from qmpd.block.mounts import MountWatch
from qmpd.block.qcow2.create import create_image
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.errors import GenericError

MiB = 1 << 20


def count_jobs(block: BlockLayer) -> list[str]:
    """The names of the blocking calls the I/O pool runs from now on."""
    jobs: list[str] = []
    run = block.graph.io.run

    async def counting(fn: Callable[..., Any], *args: Any) -> Any:
        jobs.append(getattr(fn, "__qualname__", repr(fn)))
        return await run(fn, *args)

    block.graph.io.run = counting  # type: ignore[method-assign]
    return jobs


def qcow2(path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": "q", **extra,
            "file": {"driver": "file", "node-name": "f", "filename": str(path)}}


def fs_type(path: Path) -> str:
    res = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True,
                         check=True)
    return res.stdout.strip()


def on_tmpfs(path: Path) -> bool:
    return fs_type(path) == "tmpfs"


#: Local disk filesystems, as ``stat -f -c %T`` names them (ext2/3/4 is "ext2/ext3").
DISK_FILESYSTEMS = {"ext2/ext3", "xfs", "btrfs", "f2fs"}


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a local disk filesystem: pytest's, or one in /var/tmp."""
    if fs_type(tmp_path) in DISK_FILESYSTEMS:
        yield tmp_path
        return
    if not os.path.isdir("/var/tmp") or fs_type(Path("/var/tmp")) not in DISK_FILESYSTEMS:
        pytest.skip("neither the temporary directory nor /var/tmp is on a local disk")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as where:
        yield Path(where)


def evict(path: Path) -> None:
    """Out of the page cache: written back, then dropped (clean pages go)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("where", ["tmp", "shm"])
async def test_qcow2_over_file_opens_in_one_job(tmp_path: Path, layer: BlockLayer,
                                                where: str) -> None:
    base = tmp_path
    if where == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        base = Path(os.environ.get("TMPDIR_SHM", "/dev/shm")) / f"qmpd-open-{os.getpid()}"
        base.mkdir(exist_ok=True)
    path = base / "a.qcow2"
    try:
        create_image(str(path), 64 * MiB)
        jobs = count_jobs(layer)
        node = await layer.add(qcow2(path))
        # On a local filesystem, with only local mounts, the open runs on the
        # loop (the image was just written: its pages are cached): no job.
        quick = fs_type(path) in DISK_FILESYSTEMS | {"tmpfs"} and MountWatch().all_local()
        assert len(jobs) == (0 if quick else 1), jobs
        drv = node.driver
        assert isinstance(drv, Qcow2Driver) and drv.image is not None
        file = layer.graph.lookup("f")
        assert file is not None and isinstance(file.driver, FileDriver)
        assert file.driver.fd >= 0 and file.driver.lock is not None
        # The reads of the job are counted on the file node, as before.
        assert file.stats.rd_operations >= 2 and file.stats.rd_bytes > 0
        await node.write(0, b"x" * 512)
        assert await node.read(0, 512) == b"x" * 512
        assert [n.node_name for n in layer.graph.newest_first()] == ["q", "f"]
    finally:
        await layer.close_all()
        if where == "shm":
            path.unlink(missing_ok=True)
            base.rmdir()


async def test_metadata_not_in_the_page_cache_is_read_in_an_io_thread(
        disk_dir: Path, layer: BlockLayer) -> None:
    if not MountWatch().all_local():
        pytest.skip("a remote filesystem is mounted: every open goes to an I/O thread")
    path = disk_dir / "a.qcow2"
    create_image(str(path), 64 * MiB)
    evict(path)
    jobs = count_jobs(layer)
    node = await layer.add(qcow2(path))
    # The file opened on the loop; its header was not cached, so the
    # metadata was read in one I/O-thread job, not on the loop.
    assert jobs == ["read_metadata_blocking"], jobs
    drv = node.driver
    assert isinstance(drv, Qcow2Driver) and drv.image is not None
    await node.write(0, b"x" * 512)
    assert await node.read(0, 512) == b"x" * 512
    await layer.close_all()
    # Cached now: the same open takes no job at all.
    jobs.clear()
    node = await layer.add(qcow2(path))
    assert jobs == [], jobs
    assert await node.read(0, 512) == b"x" * 512


async def test_missing_file_is_reported_before_a_bad_format_option(
        tmp_path: Path, layer: BlockLayer) -> None:
    before = open_fds()
    with pytest.raises(BlockDriverError) as exc:
        await layer.add(qcow2(tmp_path / "none.qcow2", **{"cache-clean-interval": -1}))
    assert str(exc.value) == (
        f"Could not open '{tmp_path / 'none.qcow2'}': No such file or directory")
    assert layer.graph.nodes == {}
    assert open_fds() == before


@pytest.mark.parametrize(("extra", "message"), [
    ({"cache-clean-interval": -1}, "Cache clean interval too big"),
    ({"l2-cache-entry-size": 100}, "L2 cache entry size must be a power of two between "
                                   "512 and the cluster size (65536)"),
    ({"cache-size": 1, "l2-cache-size": 1, "refcount-cache-size": 1},
     "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"),
])
async def test_bad_option_closes_the_file(tmp_path: Path, layer: BlockLayer,
                                          extra: dict[str, Any], message: str) -> None:
    path = tmp_path / "a.qcow2"
    create_image(str(path), 64 * MiB)
    before = open_fds()
    with pytest.raises(BlockDriverError) as exc:
        await layer.add(qcow2(path, **extra))
    assert str(exc.value) == message
    assert layer.graph.nodes == {}
    assert open_fds() == before
    # and the image can be opened (and locked) again at once
    await layer.add(qcow2(path))


async def test_static_option_error_comes_before_a_format_error(
        tmp_path: Path, layer: BlockLayer) -> None:
    path = tmp_path / "raw.img"
    path.write_bytes(bytes(1 * MiB))
    before = open_fds()
    with pytest.raises(BlockDriverError) as exc:
        await layer.add(qcow2(path, **{"cache-clean-interval": -1}))
    assert str(exc.value) == "Cache clean interval too big"
    with pytest.raises(BlockDriverError) as exc:
        await layer.add(qcow2(path))
    assert str(exc.value) == "Image is not in qcow2 format"
    assert layer.graph.nodes == {}
    assert open_fds() == before


async def test_metadata_errors_keep_their_texts(tmp_path: Path, layer: BlockLayer) -> None:
    before = open_fds()
    path = tmp_path / "short.qcow2"
    create_image(str(path), 64 * MiB)
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(BlockDriverError) as exc:
        await layer.add(qcow2(path))
    assert str(exc.value) == "qcow2 header too short"
    # an option error found from the header (in the I/O thread, raised on the loop)
    v2 = tmp_path / "v2.qcow2"
    create_image(str(v2), 64 * MiB, version=2)
    with pytest.raises(BlockDriverError) as exc:
        await layer.add(qcow2(v2, **{"lazy-refcounts": True}))
    assert str(exc.value) == ("Lazy refcounts require a qcow2 image with at least "
                              "qemu 1.1 compatibility level")
    assert layer.graph.nodes == {}
    assert open_fds() == before


async def test_format_over_a_named_file_or_with_backing_opens_as_before(
        tmp_path: Path, layer: BlockLayer) -> None:
    path = tmp_path / "a.qcow2"
    create_image(str(path), 64 * MiB)
    await layer.add({"driver": "file", "node-name": "f", "filename": str(path)})
    jobs = count_jobs(layer)
    node = await layer.add({"driver": "qcow2", "node-name": "q", "file": "f"})
    assert len(jobs) == 1, jobs  # the metadata only (the file is open)
    assert node.file is layer.graph.lookup("f")
    # an inline backing keeps the file's open before the backing's
    with pytest.raises(BlockDriverError) as exc:
        await layer.add({"driver": "qcow2", "node-name": "q2",
                         "file": {"driver": "file", "filename": str(tmp_path / "none")},
                         "backing": {"driver": "qcow2", "file": {
                             "driver": "file", "filename": str(tmp_path / "none2")}}})
    assert "none'" in str(exc.value)
    with pytest.raises(GenericError) as gexc:
        await layer.add({"driver": "qcow2", "node-name": "q3",
                         "file": {"driver": "file", "filename": str(path)},
                         "backing": "nosuch"})
    assert "nosuch" in str(gexc.value)


async def test_missing_inactive_file_is_reported_before_the_attach_error(
        tmp_path: Path, layer: BlockLayer) -> None:
    with pytest.raises(BlockDriverError) as exc:
        await layer.add({"driver": "qcow2", "node-name": "q", "file": {
            "driver": "file", "filename": str(tmp_path / "none"), "active": False}})
    assert "No such file or directory" in str(exc.value)
    path = tmp_path / "a.qcow2"
    create_image(str(path), 64 * MiB)
    with pytest.raises(GenericError) as gexc:
        await layer.add({"driver": "qcow2", "node-name": "q", "file": {
            "driver": "file", "node-name": "f", "filename": str(path), "active": False}})
    assert str(gexc.value) == "Inactive 'f' can't be a file child of active 'q'"
    assert layer.graph.nodes == {}
