"""The stale-cache hazard, shown for real with qemu-io as the other owner.

qmpd opens an image and reads from it (L1 table, an L2 slice and refcounts
are now cached), then inactivates the node like a migration source would.
Only the "consistent read" lock remains, so a plain ``qemu-io -c write``
(no ``-U``) can open the image read-write and allocate a new data cluster in
a cached L2 table and a brand-new L2 table.  Until activation qmpd still
reads the old (stale) metadata; after ``graph.activate`` (which calls
``invalidate_cache``) it reads qemu-io's data, and its own next allocation
does not collide with qemu-io's clusters.

The same sequence with ``Qcow2Driver.invalidate_cache`` patched to do
nothing shows the test can fail: the stale read survives activation, and a
write through qmpd afterwards damages the image (qemu-io's data or the
refcounts).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qmpd.block.graph import BlockGraph, NodeState
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.block.qcow2.standalone import close_image, open_image
from tests.interop.test_qcow2_common import check, qemu_img_create, qemu_io, run, tools

pytestmark = pytest.mark.qemu

MiB = 1 << 20


async def handover(tmp: Path, write_after: bool = True) -> dict[str, object]:
    """Run the scenario; returns what qmpd read before and after activation."""
    img = tmp / "mig.qcow2"
    qemu_img_create(img, 1024 * MiB)
    qemu_io(img, "write -q -P 0x11 0 64k")
    graph = BlockGraph(io_threads=2)
    result: dict[str, object] = {}
    try:
        node = await open_image(graph, str(img))
        assert await node.read(0, 65536) == b"\x11" * 65536
        assert await node.read(MiB, 65536) == bytes(65536)  # L2 slice of table 0 cached
        assert await node.read(600 * MiB, 65536) == bytes(65536)  # no L2 table there
        # a concurrent read-write opener is refused while we are active
        busy = run("qemu-io", "-c", "write -P 0x22 1M 64k", img, check=False)
        assert busy.returncode != 0 and 'Failed to get "write" lock' in busy.stderr

        await graph.inactivate(node)
        assert node.state == NodeState.INACTIVE
        # plain qemu-io (no -U): only our consistent-read lock is left
        qemu_io(img, "write -q -P 0x22 1M 64k", "write -q -P 0x33 600M 64k")

        result["stale_1m"] = await node.read(MiB, 65536) == bytes(65536)
        result["stale_600m"] = await node.read(600 * MiB, 65536) == bytes(65536)

        await graph.activate(node)
        assert node.state == NodeState.ACTIVE
        result["after_1m"] = await node.read(MiB, 65536)
        result["after_600m"] = await node.read(600 * MiB, 65536)
        if write_after:
            # our next allocations must not land on qemu-io's clusters
            await node.write(300 * MiB, b"\x44" * 65536)
            await node.write(2 * MiB, b"\x55" * 65536)
        await close_image(node)
    finally:
        graph.close()
    result["check"] = check(img).returncode
    result["final"] = {
        where: pattern_ok(img, where, byte)
        for where, byte in (("0", 0x11), ("1M", 0x22), ("600M", 0x33), ("300M", 0x44),
                            ("2M", 0x55))
    }
    return result


def pattern_ok(img: Path, where: str, byte: int) -> bool:
    """Whether QEMU reads 64 KiB of ``byte`` at ``where``."""
    proc = run("qemu-io", "-r", "-f", "qcow2", "-c", f"read -q -P {byte:#x} {where} 64k", img,
               check=False)
    return proc.returncode == 0 and "verification failed" not in proc.stdout + proc.stderr


async def test_stale_metadata_until_activation(tmp_path: Path) -> None:
    tools()
    r = await handover(tmp_path)
    # An inactive node re-reads its metadata for every request (refresh_inactive),
    # so even before activation it never serves another writer's stale mappings.
    assert not r["stale_1m"] and not r["stale_600m"]
    assert r["after_1m"] == b"\x22" * 65536
    assert r["after_600m"] == b"\x33" * 65536
    assert r["check"] == 0
    assert r["final"] == {"0": True, "1M": True, "600M": True, "300M": True, "2M": True}


async def test_without_invalidation_the_stale_read_is_observed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Proof that the test above can fail: no invalidation, stale data survives."""
    tools()

    async def noop(self: Qcow2Driver) -> None:
        return None

    monkeypatch.setattr(Qcow2Driver, "invalidate_cache", noop)
    monkeypatch.setattr(Qcow2Driver, "refresh_inactive", noop)
    r = await handover(tmp_path, write_after=False)
    assert r["stale_1m"] and r["stale_600m"]
    assert r["after_1m"] == bytes(65536)  # still stale after activation
    assert r["after_600m"] == bytes(65536)


async def test_writing_on_stale_metadata_damages_the_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An "activation" that re-enables writes but keeps the caches corrupts data."""
    tools()

    async def keep_stale_cache(self: Qcow2Driver) -> None:
        self._inactive = False
        if self._image is not None:
            self._image.writable = True

    async def noop(self: Qcow2Driver) -> None:
        return None

    monkeypatch.setattr(Qcow2Driver, "invalidate_cache", keep_stale_cache)
    monkeypatch.setattr(Qcow2Driver, "refresh_inactive", noop)
    r = await handover(tmp_path)
    assert r["after_1m"] == bytes(65536)
    final = r["final"]
    assert isinstance(final, dict)
    assert r["check"] != 0 or not all(final.values()), r
