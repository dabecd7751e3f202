"""A persistent qcow2 bitmap across a handover on shared storage (qmpd ->
qmpd, QEMU -> qmpd, qmpd -> QEMU with ``qemu-system-x86_64 -M none``;
issue 11: the source stores it when it inactivates, the destination
loads it when it activates and records its writes; at the end the image
holds one consistent bitmap with both sides' writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    create_qcow2,
    image_check,
    need_qemu,
    short_dir,
    start,
)
from tests.interop.test_qcow2_bitmaps import dirty_map, info_bitmaps, model
from tests.interop.test_qcow2_common import run

pytestmark = pytest.mark.qemu

KiB = 1 << 10
MiB = 1 << 20


@pytest.fixture
def work() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.mark.parametrize("in_stream", [False, True], ids=["stored", "dirty-bitmaps"])
@pytest.mark.parametrize(("src_kind", "dst_kind"),
                         [("qmpd", "qmpd"), ("qemu", "qmpd"), ("qmpd", "qemu")])
def test_persistent_bitmap_survives_handover(work: Path, src_kind: str, dst_kind: str,
                                             in_stream: bool) -> None:
    """Stored by the source and loaded by the destination; or, with the
    dirty-bitmaps capability, carried by the stream while the image keeps
    them in use (a source that stored them anyway would make the
    destination's activation find a second, consistent copy and fail)."""
    if "qemu" in (src_kind, dst_kind):
        need_qemu()
    image = create_qcow2(work / "disk.qcow2", "64M")
    run("qemu-img", "bitmap", "--add", image, "bm0")
    run("qemu-img", "bitmap", "--add", "-g", "1M", image, "coarse")
    cluster = Cluster(work)
    try:
        src = cluster.spawn(src_kind, "src")
        dst = cluster.spawn(dst_kind, "dst", incoming="defer")
        start(src, dst)
        for side in (src, dst):
            side.caps(events=True, dirty_bitmaps=in_stream)
        src.add_disk(image)
        assert src.qemu_io("disk", "write -P 0x5a 0 64k") == ""
        assert src.qemu_io("disk", "write -P 0x5b 10M 4k") == ""
        dst.add_disk(image)
        assert info_bitmaps(image, "-U")["bm0"]["flags"] == ["auto", "in-use"]
        uri = f"unix:{work / 'mig.sock'}"
        assert dst.ok("migrate-incoming", {"uri": uri}) == {}
        assert src.ok("migrate", {"uri": uri}) == {}
        assert src.wait_migration()["status"] == "completed"
        assert dst.wait_migration()["status"] == "completed"
        dst.qmp.wait_event("MIGRATION", "completed")
        assert dst.status() == "running"
        assert dst.qemu_io("disk", "write -P 0x6b 20M 70k") == ""
        assert dst.quit() == 0
        assert src.quit() == 0
    finally:
        cluster.close()
    assert info_bitmaps(image) == {"bm0": {"flags": ["auto"], "granularity": 65536},
                                   "coarse": {"flags": ["auto"], "granularity": MiB}}
    image_check(image)
    writes = [(0, 64 * KiB), (10 * MiB, 4 * KiB), (20 * MiB, 70 * KiB)]
    assert dirty_map(image, "bm0", work) == model(writes, 65536, 64 * MiB)
    assert dirty_map(image, "coarse", work) == model(writes, MiB, 64 * MiB)


def test_blockdev_del_and_kill_in_a_running_daemon(work: Path) -> None:
    """blockdev-del stores the bitmaps; a daemon killed with the image open
    leaves them in-use (inconsistent), which qemu-img check accepts."""
    image = create_qcow2(work / "disk.qcow2", "16M")
    run("qemu-img", "bitmap", "--add", image, "bm0")
    cluster = Cluster(work)
    try:
        peer = cluster.spawn("qmpd", "one")
        start(peer)
        peer.add_disk(image)
        assert peer.qemu_io("disk", "write -P 0x5a 1M 4k") == ""
        assert peer.ok("blockdev-del", {"node-name": "disk"}) == {}
        assert info_bitmaps(image) == {"bm0": {"flags": ["auto"], "granularity": 65536}}
        assert dirty_map(image, "bm0", work) == [(MiB, 65536)]
        peer.add_disk(image)
        assert peer.qemu_io("disk", "write -P 0x5a 2M 4k") == ""
        peer.kill()
        peer.wait()
    finally:
        cluster.close()
    assert info_bitmaps(image) == {"bm0": {"flags": ["auto", "in-use"], "granularity": 65536}}
    image_check(image)
