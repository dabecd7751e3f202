"""Migration without shared storage, driven exactly as libvirt drives QEMU 7.2
(issue 12): the destination exports its empty disk over NBD, the source mirrors
into it, and at pre-switchover the mirrors are cancelled (a final sync, no
pivot) before the migration completes.  Every pairing of qmpd and QEMU, with
guest writes landing on the source while the mirror runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.migration_helpers import Cluster, Peer, create_qcow2, image_check, short_dir
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu("qemu-system-x86_64")

SIZE = 64 << 20
PAIRS = [("qemu", "qemu")]  # qmpd joins once blockdev-mirror and the nbd driver land


@pytest.fixture
def work() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def wait_event(peer: Peer, name: str, timeout: float = 30.0, status: str | None = None,
               device: str | None = None) -> dict[str, Any]:
    ev = peer.qmp.wait_event(name, status=status, timeout=timeout)
    assert device is None or ev["data"]["device"] == device, ev
    return dict(ev)


def add_disk(peer: Peer, image: Path) -> None:
    peer.ok("blockdev-add", {"node-name": "disk-storage", "driver": "file",
                             "filename": str(image)})
    peer.ok("blockdev-add", {"node-name": "disk", "driver": "qcow2", "file": "disk-storage"})


def storage_migration(cluster: Cluster, work: Path, src_kind: str, dst_kind: str,
                      src_image: Path, dst_image: Path) -> tuple[Peer, Peer]:
    """libvirt's flow, up to a running destination; returns (source, destination)."""
    src = cluster(src_kind, "src")
    dst = cluster(dst_kind, "dst", incoming="defer", paused=True)
    nbd_sock = str(work / "nbd.sock")
    mig_uri = f"unix:{work / 'mig.sock'}"

    # Destination: its own (empty) image, exported writable over NBD.
    dst.caps(events=True, late_block_activate=True)
    add_disk(dst, dst_image)
    dst.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
    dst.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                "writable": True})

    # Source: an nbd node with raw on top, mirrored into until READY.
    src.caps(events=True, pause_before_switchover=True)
    add_disk(src, src_image)
    src.ok("blockdev-add", {"driver": "nbd", "node-name": "migration-disk-storage",
                            "server": {"type": "unix", "path": nbd_sock}, "export": "disk"})
    src.ok("blockdev-add", {"driver": "raw", "node-name": "migration-disk-format",
                            "file": "migration-disk-storage"})
    src.ok("blockdev-mirror", {"job-id": "drive-disk", "device": "disk",
                               "target": "migration-disk-format", "sync": "full",
                               "auto-dismiss": False})
    assert src.qemu_io("disk", "write -P 0x5a 1M 256k") == ""
    wait_event(src, "BLOCK_JOB_READY", device="drive-disk")
    # Guest writes after READY: the mirror copies them as they come.
    assert src.qemu_io("disk", "write -P 0x6b 8M 64k") == ""
    assert src.qemu_io("disk", f"write -P 0x7c {SIZE - 4096} 4k") == ""

    dst.ok("migrate-incoming", {"uri": mig_uri})
    src.ok("migrate", {"uri": mig_uri})
    wait_event(src, "MIGRATION", status="pre-switchover")
    assert src.status() == "finish-migrate"

    # The source is stopped: cancel the mirror (final sync, no pivot), let go
    # of the NBD target, and let the migration finish.
    src.ok("block-job-cancel", {"device": "drive-disk"})
    done = wait_event(src, "BLOCK_JOB_COMPLETED", device="drive-disk")
    assert "error" not in done["data"]
    assert done["data"]["offset"] == done["data"]["len"]
    src.ok("job-dismiss", {"id": "drive-disk"})
    src.ok("blockdev-del", {"node-name": "migration-disk-format"})
    src.ok("blockdev-del", {"node-name": "migration-disk-storage"})
    src.ok("migrate-continue", {"state": "pre-switchover"})
    assert src.wait_migration()["status"] == "completed"

    assert dst.wait_migration()["status"] == "completed"
    dst.ok("nbd-server-stop")
    dst.ok("cont")
    assert dst.status() == "running"
    return src, dst


@pytest.mark.parametrize(("src_kind", "dst_kind"), PAIRS)
def test_storage_migration_libvirt_flow(work: Path, src_kind: str, dst_kind: str) -> None:
    src_image = create_qcow2(work / "src.qcow2", str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 32M 2M",
            str(src_image), check=True)
    dst_image = create_qcow2(work / "dst.qcow2", str(SIZE))
    cluster = Cluster(work)
    try:
        src, dst = storage_migration(cluster, work, src_kind, dst_kind, src_image, dst_image)
        # The destination owns its disk now: it writes, and the source, quit,
        # has let go of everything.
        assert dst.qemu_io("disk", "write -P 0x33 16M 4k") == ""
        assert src.quit() == 0
        assert dst.quit() == 0
    finally:
        cluster.close()
    image_check(dst_image)
    qemu_io("-f", "qcow2", "-c", "write -P 0x33 16M 4k", str(src_image), check=True)
    res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(src_image), str(dst_image),
                   check=False)
    assert res.returncode == 0, res.stdout + res.stderr
