"""The stale-cache test: a destination that opened the image early must re-read it.

The destination adds the image while it waits (inmigrate: the node is
inactive) and even reads from it, so it has cached L1/L2 tables and
refcounts; then the source writes far apart in a 2 GiB image (new clusters
and new L2 tables), and only then migrates.  After the handover the
destination must read what the source wrote, write more, and leave an image
that ``qemu-img check`` finds clean and that equals a raw reference built
with the same writes.

The negative control runs the same steps against a destination whose qcow2
``invalidate_cache`` and ``refresh_inactive`` do nothing (monkeypatched in
that test process only):
it must read stale data, which proves the test can fail.

The same holds for a node the destination activated early (an export without
allow-inactive, or ``cont``, while it waits): it is invalidated again when the
migration completes; its negative control skips that step, as QEMU 7.2 does.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.migration_helpers import (
    NO_INVALIDATE,
    NO_REINVALIDATE,
    Cluster,
    LockWatcher,
    Peer,
    assert_one_writer,
    create_qcow2,
    image_check,
    images_equal,
    need_qemu,
    start,
    write_pattern_raw,
)

pytestmark = pytest.mark.qemu("qemu-img")

K, M, G = 1 << 10, 1 << 20, 1 << 30
SIZE = 2 * G
#: Written on the source before the destination opens the image.
BEFORE = [(0, 64 * K, 0x11), (G + 64 * K, 64 * K, 0x12)]
#: Written on the source after the destination opened (and read) the image:
#: the same cluster again, a new cluster under a known L2 table, and clusters
#: needing new L2 tables (each L2 table of a 64 KiB-cluster image maps 512 MiB).
AFTER = [
    (0, 64 * K, 0x21),
    (64 * K, 64 * K, 0x22),
    (512 * M, 64 * K, 0x23),
    (G, 64 * K, 0x24),
    (SIZE - 64 * K, 64 * K, 0x25),
    (1536 * M + 4 * K, 8 * K, 0x26),
]
#: Written on the destination after the handover.
ON_DST = [(768 * M, 64 * K, 0x31), (64 * K, 4 * K, 0x32), (G + 128 * K, 64 * K, 0x33)]


def expected_reads() -> list[tuple[int, int, int]]:
    """Every range the source wrote, with the pattern that must be there after AFTER."""
    latest: dict[int, tuple[int, int, int]] = {}
    for offset, length, pattern in BEFORE + AFTER:
        latest[offset] = (offset, length, pattern)
    return sorted(latest.values())


def stale_run(mig: Cluster, src_kind: str, dst_kind: str, code: str | None = None, *,
              src_extra: Sequence[str] = (), dst_extra: Sequence[str] = (),
              uri: str | None = None, before_migrate: Callable[[Peer, Peer], str] | None = None,
              ) -> tuple[Peer, Peer, Path]:
    """Steps up to the destination's reads; returns (src, dst, image) still running.

    ``uri`` is what the destination listens on (unix: by default);
    ``before_migrate(src, dst)``, called after migrate-incoming, returns the
    URI the source migrates to (the TLS tests set their parameters there).
    """
    work = mig.dir
    image = create_qcow2(work / "disk.qcow2", "2G")
    src = mig.spawn(src_kind, "src", extra=src_extra)
    dst = mig.spawn(dst_kind, "dst", incoming="defer", code=code, extra=dst_extra)
    start(src, dst)
    src.add_disk(image)
    for offset, length, pattern in BEFORE:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    dst.add_disk(image)
    assert_one_writer(image, [src, dst], src)
    # Reads on the inactive destination fill its caches with what is now true.
    for offset, length, pattern in BEFORE:
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    for offset, length, _ in AFTER:
        dst.qemu_io("disk", f"read {offset} {length}")
    # A write on the waiting destination is refused.
    assert dst.qemu_io("disk", "write -P 0x99 0 4k") == "Block node is read-only\r\n"
    for offset, length, pattern in AFTER:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    uri = uri or f"unix:{work / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    if before_migrate is not None:
        uri = before_migrate(src, dst)
    with LockWatcher(image, src, dst):
        src.ok("migrate", {"uri": uri})
        assert src.wait_migration()["status"] == "completed"
        assert dst.wait_migration()["status"] == "completed"
    # Clear what the reads before the handover printed.
    dst.mark = len(dst.stdout())  # type: ignore[attr-defined]
    for offset, length, pattern in expected_reads():
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    return src, dst, image


def output_after_handover(dst: Peer) -> str:
    time.sleep(0.05)
    return dst.stdout()[dst.mark:]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("src_kind", "dst_kind"),
                         [("qmpd", "qmpd"), ("qemu", "qmpd"), ("qmpd", "qemu")])
def test_destination_reads_what_the_source_wrote_late(mig: Cluster, src_kind: str,
                                                      dst_kind: str) -> None:
    if "qemu" in (src_kind, dst_kind):
        need_qemu()
    src, dst, image = stale_run(mig, src_kind, dst_kind)
    check_after_handover(mig, src, dst, image)


def check_after_handover(mig: Cluster, src: Peer, dst: Peer, image: Path) -> None:
    """The destination read fresh data, writes, quits; the image is clean and as expected."""
    out = output_after_handover(dst)
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == len(expected_reads()), out
    assert_one_writer(image, [src, dst], dst)
    for offset, length, pattern in ON_DST:
        assert dst.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    for offset, length, pattern in ON_DST:
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    assert "Pattern verification failed" not in output_after_handover(dst)
    assert dst.quit() == 0
    assert src.quit() == 0
    image_check(image)
    reference = mig.dir / "reference.raw"
    write_pattern_raw(reference, SIZE, BEFORE + AFTER + ON_DST)
    images_equal(image, reference)


def test_negative_control_without_invalidation_reads_stale_data(mig: Cluster) -> None:
    """The same steps, invalidate_cache a no-op on the destination: stale reads show."""
    src, dst, image = stale_run(mig, "qmpd", "qmpd", code=NO_INVALIDATE)
    out = output_after_handover(dst)
    failed = [line for line in out.splitlines() if "Pattern verification failed" in line]
    # Everything the source wrote in new clusters reads back wrong: the
    # destination still believes they are unallocated.
    for offset, length, _ in AFTER[1:]:
        assert f"Pattern verification failed at offset {offset}, {length} bytes" in failed, out
    dst.quit()
    src.quit()
    # The file itself is fine: only the destination's view was stale.
    image_check(image)


def test_export_added_while_waiting_serves_fresh_data(mig: Cluster) -> None:
    """An export of a node the source holds needs allow-inactive (activating it is
    refused by image locking); an allow-inactive export reads what the source wrote."""
    require_tool("qemu-io")
    work = mig.dir
    image = create_qcow2(work / "disk.qcow2", "2G")
    src = mig.spawn("qmpd", "src")
    dst = mig.spawn("qmpd", "dst", incoming="defer")
    start(src, dst)
    src.add_disk(image)
    dst.add_disk(image)
    nbd = str(work / "nbd.sock")
    dst.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
    # Without allow-inactive the export would activate the node: the source's lock refuses.
    assert dst.err("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk"}) == (
        'Failed to get "write" lock'
    )
    dst.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk",
                                "allow-inactive": True})
    assert_one_writer(image, [src, dst], src)
    for offset, length, pattern in AFTER:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    uri = f"unix:{work / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    src.ok("migrate", {"uri": uri})
    assert dst.wait_migration()["status"] == "completed"
    cmds: list[str] = []
    for offset, length, pattern in AFTER:
        cmds += ["-c", f"read -P {pattern:#x} {offset} {length}"]
    res = subprocess.run(
        ["qemu-io", "-r", "-f", "raw", *cmds, f"nbd+unix:///disk?socket={nbd}"],
        capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    assert "Pattern verification failed" not in res.stdout, res.stdout
    assert res.stdout.count("read ") == len(AFTER), res.stdout


# ---------------------------------------------------------------------------
# A node activated early on the waiting destination (conformance fact 39)
# ---------------------------------------------------------------------------


def early_run(mig: Cluster, how: str, code: str | None = None) -> tuple[str, str]:
    """The destination opens the image read-only with force-share (so the source
    does not refuse its activation)
    and activates it before the migration (an export without allow-inactive, or
    cont); it reads (caches fill), the source writes AFTER, then migrates.
    Returns what the destination (HMP qemu-io) and an NBD client read after it."""
    require_tool("qemu-io")
    work = mig.dir
    image = create_qcow2(work / "disk.qcow2", "2G")
    src = mig.spawn("qmpd", "src")
    dst = mig.spawn("qmpd", "dst", incoming="defer", code=code)
    start(src, dst)
    src.add_disk(image)
    for offset, length, pattern in BEFORE:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    dst.ok("blockdev-add", {"driver": "qcow2", "node-name": "disk", "read-only": True,
                            "force-share": True,
                            "file": {"driver": "file", "filename": str(image)}})
    nbd = str(work / "nbd.sock")
    dst.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
    if how == "export":
        dst.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk"})
    else:
        dst.ok("cont")
        dst.ok("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk"})
    assert dst.ok("query-named-block-nodes")[0]["active"] is True
    assert dst.status() == "inmigrate"
    for offset, length, pattern in BEFORE:
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    for offset, length, _ in AFTER:
        dst.qemu_io("disk", f"read {offset} {length}")
    for offset, length, pattern in AFTER:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    uri = f"unix:{work / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    dst.mark = len(dst.stdout())  # type: ignore[attr-defined]
    for offset, length, pattern in expected_reads():
        assert dst.qemu_io("disk", f"read -P {pattern:#x} {offset} {length}") == ""
    cmds: list[str] = []
    for offset, length, pattern in expected_reads():
        cmds += ["-c", f"read -P {pattern:#x} {offset} {length}"]
    res = subprocess.run(["qemu-io", "-r", "-f", "raw", *cmds, f"nbd+unix:///disk?socket={nbd}"],
                         capture_output=True, text=True, timeout=30)
    assert res.stdout.count("read ") == len(expected_reads()), (res.stdout, res.stderr)
    out = output_after_handover(dst)
    dst.quit()
    src.quit()
    image_check(image)
    return out, res.stdout


@pytest.mark.parametrize("how", ["export", "cont"])
def test_early_activated_node_reads_what_the_source_wrote_late(mig: Cluster, how: str) -> None:
    out, nbd_out = early_run(mig, how)
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == len(expected_reads()), out
    assert "Pattern verification failed" not in nbd_out, nbd_out


def test_negative_control_early_activated_node_without_reinvalidation(mig: Cluster) -> None:
    """Without the invalidation at completion, the early-activated node reads stale data."""
    out, nbd_out = early_run(mig, "export", code=NO_REINVALIDATE)
    for text in (out, nbd_out):
        failed = [line for line in text.splitlines() if "Pattern verification failed" in line]
        for offset, length, _ in AFTER[1:]:
            assert f"Pattern verification failed at offset {offset}, {length} bytes" in failed, text


# ---------------------------------------------------------------------------
# The migrated-away source: its nodes are inactive, the destination writes
# ---------------------------------------------------------------------------


def test_source_export_reads_what_the_destination_wrote(mig: Cluster) -> None:
    """After the handover, the source's read-only export (added before it) serves
    what the destination writes, new clusters and new L2 tables included: an
    inactive qcow2 node re-reads its metadata for every request."""
    require_tool("qemu-io")
    work = mig.dir
    image = create_qcow2(work / "disk.qcow2", "2G")
    src = mig.spawn("qmpd", "src")
    dst = mig.spawn("qmpd", "dst", incoming="defer")
    start(src, dst)
    src.add_disk(image)
    dst.add_disk(image)
    for offset, length, pattern in BEFORE:
        assert src.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    nbd = str(work / "nbd.sock")
    src.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
    src.ok("block-export-add", {"type": "nbd", "id": "r0", "node-name": "disk"})

    def nbd_read(ranges: list[tuple[int, int, int]]) -> str:
        cmds: list[str] = []
        for offset, length, pattern in ranges:
            cmds += ["-c", f"read -P {pattern:#x} {offset} {length}"]
        res = subprocess.run(["qemu-io", "-r", "-f", "raw", *cmds,
                              f"nbd+unix:///disk?socket={nbd}"],
                             capture_output=True, text=True, timeout=30)
        assert res.stdout.count("read ") == len(ranges), (res.stdout, res.stderr)
        return res.stdout

    # The source's caches now hold the tables as they are before the handover.
    assert "Pattern verification failed" not in nbd_read(BEFORE)
    nbd_read([(offset, length, 0) for offset, length, _ in ON_DST])
    uri = f"unix:{work / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    for offset, length, pattern in ON_DST:
        assert dst.qemu_io("disk", f"write -P {pattern:#x} {offset} {length}") == ""
    assert dst.qemu_io("disk", "flush") == ""
    out = nbd_read(ON_DST + BEFORE[1:])
    assert "Pattern verification failed" not in out, out
    assert src.ok("query-named-block-nodes")[0]["active"] is False
