"""Dirty bitmaps in QEMU 7.2's migration stream, read from and written to a live QEMU.

The sans-IO layer only: our reader takes a real QEMU source's stream apart
and rebuilds every bitmap bit for bit (QEMU's own sha256 of it), and a real
QEMU destination takes our writer's stream and ends with our bitmaps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.migration.stream import StreamReader, StreamWriter, TimerState
from qmpd.migration.stream.bitmaps import BitmapChunk, MigratedBitmap, apply_bits
from tests.migration_data import capture as qemu

pytestmark = pytest.mark.qemu(qemu.QEMU)

SIZE = 64 << 20
DISK = f"null-co,node-name=disk0,size={SIZE}"


def hmp(q: qemu.Qemu, line: str) -> None:
    reply = q.qmp.cmd("human-monitor-command", {"command-line": line})
    assert "return" in reply, reply


def sha(q: qemu.Qemu, name: str) -> str:
    reply = q.qmp.cmd("x-debug-block-dirty-bitmap-sha256", {"node": "disk0", "name": name})
    return str(reply["return"]["sha256"])


def test_a_qemu_sources_bitmaps_are_rebuilt_bit_for_bit() -> None:
    with qemu.workdir() as work:
        src = qemu.Qemu(work, "-blockdev", DISK)
        try:
            for args in ({"name": "fine", "granularity": 4096},
                         {"name": "coarse", "granularity": 1 << 20, "persistent": False},
                         {"name": "off", "granularity": 65536, "disabled": True}):
                assert "return" in src.qmp.cmd("block-dirty-bitmap-add", {"node": "disk0", **args})
            for line in ('qemu-io disk0 "write 0 4k"', 'qemu-io disk0 "write 40M 3M"',
                         'qemu-io disk0 "write 63M 1M"'):
                hmp(src, line)
            assert "return" in src.qmp.cmd("block-dirty-bitmap-merge", {
                "node": "disk0", "target": "off", "bitmaps": ["fine"]})
            want = {name: sha(src, name) for name in ("fine", "coarse", "off")}
            src.set_caps(["dirty-bitmaps"])
            data = qemu.migrate_to_file(src, work / "stream.bin")
        finally:
            src.quit()
        reader = StreamReader({"dirty-bitmaps": True})
        events: list[object] = []
        reader.bitmap_sink = events.append
        events += [*reader.feed(data), *reader.close()]
    got: dict[str, DirtyBitmap] = {}
    flags: dict[str, int] = {}
    for event in events:
        if isinstance(event, BitmapChunk) and event.kind == "start":
            assert event.node == "disk0" and event.name is not None
            got[event.name] = DirtyBitmap(event.name, SIZE, event.granularity)
            flags[event.name] = event.start_flags
        elif isinstance(event, BitmapChunk) and event.kind == "bits":
            assert event.name is not None
            apply_bits(got[event.name].bits, got[event.name].granularity, event)
    assert {name: bitmap.sha256() for name, bitmap in got.items()} == want
    assert flags == {"fine": 1, "coarse": 1, "off": 0}
    assert got["coarse"].dirty_extents(0, SIZE) == [(0, 1 << 20), (40 << 20, 3 << 20),
                                                     (63 << 20, 1 << 20)]


def test_a_qemu_destination_takes_our_bitmaps() -> None:
    data, fine, off = _two_bitmaps()
    shown: dict[str, tuple[int, bool, int, str]] = {}

    def check(dst: qemu.Qemu) -> None:
        deadline = time.monotonic() + 10
        while dst.qmp.cmd("query-status")["return"]["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        nodes = dst.qmp.cmd("query-named-block-nodes")["return"]
        shown.update({b["name"]: (b["granularity"], b["recording"], b["count"],
                                  sha(dst, b["name"])) for b in nodes[0]["dirty-bitmaps"]})

    stderr, status = _qemu_destination(data, check=check)
    assert (stderr, status) == ("", "completed")
    assert shown == {"fine": (4096, True, fine.count(), fine.sha256()),
                     "off": (65536, False, off.count(), off.sha256())}


# --- the destination's handling (qmpd/migration/bitmaps.py) against QEMU's ------------


def _qemu_destination(data: bytes, *setup: dict[str, object],
                      check: Callable[[qemu.Qemu], None] | None = None) -> tuple[str, str]:
    """QEMU 7.2 as the destination of ``data``, with bitmaps made first (and
    ``check`` run once it completed): its stderr and how the migration ended."""
    with qemu.workdir() as work:
        stream = work / "in.bin"
        stream.write_bytes(data)
        dst = qemu.Qemu(work, "-incoming", "defer", "-blockdev", DISK)
        try:
            dst.set_caps(["dirty-bitmaps"])
            for args in setup:
                assert "return" in dst.qmp.cmd("block-dirty-bitmap-add", {"node": "disk0",
                                                                         **args})
            assert dst.qmp.cmd("migrate-incoming", {"uri": f"exec:cat {stream}"}) \
                == {"return": {}}
            deadline = time.monotonic() + 10
            status = ""
            while dst.proc.poll() is None and time.monotonic() < deadline:
                try:
                    status = dst.qmp.cmd("query-migrate")["return"].get("status", "")
                except (OSError, EOFError):
                    break
                if status in ("completed", "failed"):
                    break
                time.sleep(0.01)
            if check is not None and status == "completed":
                check(dst)
        finally:
            dst.quit()
        return dst.read_stderr(), status


async def _qmpd_destination(data: bytes, *existing: str) -> tuple[str, list[str], dict[str, str]]:
    """The same stream through qmpd's reader and IncomingBitmaps, over a null-co
    node: the error text (as QEMU would print it), what was reported, the bitmaps."""
    from qmpd.block.core import BlockLayer
    from qmpd.migration.bitmaps import IncomingBitmaps
    from qmpd.migration.stream import MigrationStreamError

    layer = BlockLayer()
    try:
        node = await layer.add({"driver": "null-co", "node-name": "disk0", "size": SIZE},
                               inactive=True)
        for name in existing:
            node.dirty_bitmaps[name] = DirtyBitmap(name, SIZE, 65536)
        reported: list[str] = []
        bitmaps = IncomingBitmaps(layer.graph.nodes, reported.append)
        reader = StreamReader({"dirty-bitmaps": True})
        reader.bitmap_sink = bitmaps
        error = ""
        try:
            reader.feed(data)
            reader.close()
        except MigrationStreamError as exc:
            bitmaps.cancel()
            error = exc.render()
        else:
            bitmaps.before_vm_start()
        shown = {name: f"{b.granularity}/{b.recording}/{b.busy}/{b.sha256()}"
                 for name, b in node.dirty_bitmaps.items()}
        return error, reported, shown
    finally:
        await layer.close_all()
        layer.graph.close()


def _two_bitmaps() -> tuple[bytes, DirtyBitmap, DirtyBitmap]:
    fine = DirtyBitmap("fine", SIZE, 4096)
    off = DirtyBitmap("off", SIZE, 65536, recording=False)
    for offset, length in ((0, 4096), (40 << 20, 3 << 20), (SIZE - 512, 512)):
        fine.set_range(offset, length)
    off.set_range(7 << 20, 1)
    writer = StreamWriter({"dirty-bitmaps": True}, [
        MigratedBitmap("disk0", "fine", 4096, True, False, SIZE),
        MigratedBitmap("disk0", "off", 65536, False, False, SIZE)])
    data = writer.setup() + writer.complete("running", TimerState(1, 2),
                                            [fine.to_bytes(), off.to_bytes()])
    return data, fine, off


async def test_qmpd_takes_the_bitmaps_as_qemu_does() -> None:
    data, fine, off = _two_bitmaps()
    error, reported, shown = await _qmpd_destination(data)
    assert (error, reported) == ("", [])
    assert shown == {"fine": f"4096/True/False/{fine.sha256()}",
                     "off": f"65536/False/False/{off.sha256()}"}


async def test_an_existing_bitmap_fails_the_load_as_in_qemu() -> None:
    data, _, _ = _two_bitmaps()
    theirs, status = _qemu_destination(data, {"name": "off", "granularity": 65536})
    assert status != "completed"
    ours, reported, shown = await _qmpd_destination(data, "off")
    assert reported == []
    assert ours == theirs
    # Nothing half-loaded stays: only the bitmap that was there before.
    assert list(shown) == ["off"]


async def test_a_missing_node_drops_the_bitmaps_and_the_load_goes_on_as_in_qemu() -> None:
    bitmap = DirtyBitmap("b", SIZE, 65536)
    bitmap.set_range(0, 1)
    writer = StreamWriter({"dirty-bitmaps": True},
                          [MigratedBitmap("nodisk", "b", 65536, True, False, SIZE)])
    data = writer.setup() + writer.complete("running", TimerState(1, 2), [bitmap.to_bytes()])
    theirs, status = _qemu_destination(data)
    assert status == "completed"
    error, reported, shown = await _qmpd_destination(data)
    assert error == "" and shown == {}
    assert "".join(f"qemu-system-x86_64: {line}\n" for line in reported) == theirs
