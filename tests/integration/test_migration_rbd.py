"""Handover on Ceph RBD: qmpd -> qmpd, QEMU 7.2 -> qmpd and qmpd -> QEMU 7.2.

The stale-cache test of test_migration_stale.py on a real cluster: both
sides open the image through librbd with a client cache in writeback mode
(no writethrough until the first flush, dirty data kept for ten minutes:
tests/support/ceph.py), so a destination that does not drop librbd's cache
at activation reads what it cached before, and a source that does not flush
at inactivation loses its last writes.  The destination opens the image while
it waits and reads it (filling its cache), the source then writes, and only
then migrates; afterwards the destination must read the source's last writes
and write its own.  Raw and qcow2 on rbd, images with and without the
exclusive-lock feature.

The negative control runs the same steps with the rbd driver's cache drop
made a no-op on the destination: it must read stale data.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    Peer,
    Proxy,
    create_qcow2,
    need_qemu,
    start,
    wait_until,
)
from tests.support.ceph import CephCluster, lock_holders
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu("qemu-img", "qemu-io")

K, M = 1 << 10, 1 << 20
SIZE = 64 * M
#: Written by the source before the destination opens (and reads) the image.
BEFORE = [(0, 64 * K, 0x11), (8 * M, 64 * K, 0x12), (40 * M, 4 * K, 0x13)]
#: Written by the source after that, in ranges the destination has read.
AFTER = [(0, 64 * K, 0x21), (8 * M + 64 * K, 64 * K, 0x22), (40 * M, 4 * K, 0x23),
         (SIZE - 64 * K, 64 * K, 0x24)]
#: Written by the destination after the handover.
ON_DST = [(16 * M, 64 * K, 0x31), (4 * K, 4 * K, 0x32)]

#: A destination whose rbd driver does not drop librbd's cache at activation
#: (a test-run process, not a product option): the negative control.
NO_RBD_INVALIDATE = (
    "import sys\n"
    "import qmpd.block.rbd as r\n"
    "r.drop_cache = lambda image: None\n"
    "from qmpd.__main__ import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


def latest() -> list[tuple[int, int, int]]:
    """Every range the source wrote, with the pattern that must be there."""
    out: dict[int, tuple[int, int, int]] = {}
    for offset, length, pattern in BEFORE + AFTER:
        out[offset] = (offset, length, pattern)
    return sorted(out.values())


def make_image(ceph: CephCluster, work: Path, fmt: str, exclusive_lock: bool) -> str:
    if fmt == "raw":
        return ceph.new_image("64M", exclusive_lock=exclusive_lock)
    local = create_qcow2(work / "disk.qcow2", "64M")
    return ceph.import_image(local, exclusive_lock=exclusive_lock)


def add_disk(peer: Peer, ceph: CephCluster, image: str, fmt: str) -> None:
    proto = ceph.blockdev(image, **{"node-name": "proto"})
    if fmt == "raw":
        peer.ok("blockdev-add", {**proto, "node-name": "disk"})
    else:
        peer.ok("blockdev-add", {"driver": "qcow2", "node-name": "disk", "file": proto})


def stale_run(mig: Cluster, ceph: CephCluster, src_kind: str, dst_kind: str, fmt: str,
              exclusive_lock: bool, code: str | None = None) -> tuple[Peer, Peer, str]:
    """Steps up to the destination's first reads after the handover."""
    image = make_image(ceph, mig.dir, fmt, exclusive_lock)
    src = mig.spawn(src_kind, "src")
    dst = mig.spawn(dst_kind, "dst", incoming="defer", code=code)
    start(src, dst)
    add_disk(src, ceph, image, fmt)
    for offset, length, pattern in BEFORE:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    assert src.qemu_io("disk", "flush") == ""
    add_disk(dst, ceph, image, fmt)
    # The inactive destination reads: librbd caches what is true now.
    for offset, length, pattern in BEFORE:
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    for offset, length, _ in AFTER:
        dst.qemu_io("disk", f"read {offset} {length}")
    if dst_kind == "qmpd":
        assert dst.qemu_io("disk", "write -P 0x99 0 4k") == "Block node is read-only\r\n"
    # Not flushed: the source's inactivation must do it.
    for offset, length, pattern in AFTER:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    if exclusive_lock:
        assert len(lock_holders(ceph, image)) == 1  # the source, the only writer
    uri = f"unix:{mig.dir / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    dst.mark = len(dst.stdout())  # type: ignore[attr-defined]
    for offset, length, pattern in latest():
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    return src, dst, image


def output_after_handover(dst: Peer) -> str:
    time.sleep(0.05)
    return dst.stdout()[dst.mark:]  # type: ignore[attr-defined]


def check_image(ceph: CephCluster, image: str, fmt: str,
                writes: list[tuple[int, int, int]]) -> None:
    """A fresh client (qemu-io) reads every write; a qcow2 checks clean."""
    spec = ceph.spec(image)
    args: list[str] = []
    for offset, length, pattern in writes:
        args += ["-c", f"read -P {pattern:#x} {offset} {length}"]
    res = qemu_io("-f", fmt, "-r", *args, spec)
    assert res.returncode == 0 and "verification failed" not in res.stdout, res.stdout
    if fmt == "qcow2":
        res = qemu_img("check", "-f", "qcow2", spec, check=False)
        assert res.returncode == 0 and "No errors were found" in res.stdout, res.stdout


CASES = [
    ("qmpd", "qmpd", "raw", True), ("qmpd", "qmpd", "raw", False),
    ("qmpd", "qmpd", "qcow2", True), ("qmpd", "qmpd", "qcow2", False),
    ("qemu", "qmpd", "raw", False), ("qemu", "qmpd", "qcow2", True),
    ("qmpd", "qemu", "raw", True), ("qmpd", "qemu", "qcow2", False),
]


@pytest.mark.parametrize(("src_kind", "dst_kind", "fmt", "exclusive_lock"), CASES,
                         ids=[f"{s}-{d}-{f}-{'lock' if x else 'nolock'}" for s, d, f, x in CASES])
def test_rbd_destination_reads_what_the_source_wrote_late(
        mig: Cluster, ceph: CephCluster, src_kind: str, dst_kind: str, fmt: str,
        exclusive_lock: bool) -> None:
    if "qemu" in (src_kind, dst_kind):
        need_qemu()
    src, dst, image = stale_run(mig, ceph, src_kind, dst_kind, fmt, exclusive_lock)
    out = output_after_handover(dst)
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == len(latest()), out
    for offset, length, pattern in ON_DST:
        assert dst.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    if exclusive_lock:
        # The destination writes: it (and only it) holds the lock now.
        assert len(lock_holders(ceph, image)) == 1
    assert "Pattern verification failed" not in output_after_handover(dst)
    assert dst.quit() == 0
    assert src.quit() == 0
    assert lock_holders(ceph, image) == []
    check_image(ceph, image, fmt, [w for w in latest() if w[0] not in (0, 4 * K)] + ON_DST)


@pytest.mark.parametrize(("fmt", "exclusive_lock"), [("raw", False), ("qcow2", False),
                                                      ("raw", True)])
def test_rbd_negative_control_without_cache_drop_reads_stale_data(
        mig: Cluster, ceph: CephCluster, fmt: str, exclusive_lock: bool) -> None:
    """The same steps, librbd's cache kept on the destination: stale reads show."""
    src, dst, image = stale_run(mig, ceph, "qmpd", "qmpd", fmt, exclusive_lock,
                                code=NO_RBD_INVALIDATE)
    out = output_after_handover(dst)
    failed = [line for line in out.splitlines() if "Pattern verification failed" in line]
    assert failed, out
    dst.quit()
    src.quit()
    # Only the destination's view was stale: the image has the source's writes.
    check_image(ceph, image, fmt, latest())


def test_rbd_destination_killed_while_source_waits(mig: Cluster, ceph: CephCluster) -> None:
    """The source has flushed, given up the exclusive lock and waits for the
    destination's answer; another client writes; the destination dies.  The
    source takes the image back, re-reads it (the other client's data shows)
    and writes again, holding the lock."""
    image = make_image(ceph, mig.dir, "qcow2", exclusive_lock=True)
    src = mig.spawn("qmpd", "src")
    dst = mig.spawn("qmpd", "dst", incoming="defer")
    start(src, dst)
    for side in (src, dst):
        side.caps(events=True, **{"return-path": True})
    add_disk(src, ceph, image, "qcow2")
    assert src.qemu_io("disk", "write -P 0x5a 0 64k") == ""
    add_disk(dst, ceph, image, "qcow2")
    assert src.qemu_io("disk", "read -P 0x5a 0 64k") == ""  # cached on the source
    real = str(mig.dir / "real.sock")
    dst.ok("migrate-incoming", {"uri": f"unix:{real}"})
    proxy = Proxy(str(mig.dir / "proxy.sock"), real, limit=100, mode="stall")
    try:
        src.ok("migrate", {"uri": f"unix:{proxy.listen_path}"})
        assert proxy.limit_reached.wait(10)
        src.qmp.wait_event("MIGRATION_PASS", timeout=10, since=1)
        wait_until(lambda: lock_holders(ceph, image) == [], timeout=15,
                   what="the source gave the lock up")
        other = qemu_io("-f", "qcow2", "-c", "write -P 0x77 0 64k", ceph.spec(image))
        assert other.returncode == 0 and "wrote" in other.stdout, other.stdout + other.stderr
        dst.kill()
        info = src.wait_migration()
    finally:
        proxy.close()
    assert info["status"] == "failed"
    wait_until(lambda: src.status() == "running", what="the source running again")
    assert src.qemu_io("disk", "read -P 0x77 0 64k") == ""
    assert src.qemu_io("disk", "write -P 0x5c 1M 64k") == ""
    assert src.qemu_io("disk", "flush") == ""
    time.sleep(0.05)
    assert "Pattern verification failed" not in src.stdout(), src.stdout()
    assert len(lock_holders(ceph, image)) == 1
    assert src.quit() == 0
    check_image(ceph, image, "qcow2", [(0, 64 * K, 0x77), (1 * M, 64 * K, 0x5c)])


def _lock_held_against(peer: Peer, ceph: CephCluster, image: str) -> subprocess.CompletedProcess[str]:
    peer.ok("blockdev-add", ceph.blockdev(image, **{"node-name": "disk"}))
    assert peer.qemu_io("disk", "write -P 0x41 0 4k") == ""
    return qemu_io("-f", "raw", "-c", "write -P 0x42 0 4k", ceph.spec(image), timeout=60)


def test_rbd_exclusive_lock_refused_to_other_writers(mig: Cluster, ceph: CephCluster) -> None:
    """qmpd holds the lock of the image it writes: another client's write
    fails (EROFS); QEMU 7.2 hands the lock over on request (librbd's
    cooperative transfer), so there the other client's write goes through."""
    need_qemu()
    results: dict[str, Any] = {}
    for kind in ("qmpd", "qemu"):
        image = ceph.new_image("16M", exclusive_lock=True)
        peer = mig(kind, kind)
        other = _lock_held_against(peer, ceph, image)
        results[kind] = other.returncode == 0 and "wrote" in other.stdout
        peer.quit()
    assert results == {"qmpd": False, "qemu": True}
