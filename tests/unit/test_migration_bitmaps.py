"""Which bitmaps a source sends (QEMU 7.2's order and refusals), over a real block layer."""

from __future__ import annotations

import pytest

from qmpd.block.core import BlockLayer
from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.migration.bitmaps import outgoing_bitmaps
from qmpd.migration.stream.bitmaps import BitmapRefused

MiB = 1 << 20


async def test_order_flags_and_refusals(layer: BlockLayer) -> None:
    a = await layer.add({"driver": "null-co", "node-name": "a", "size": 4 * MiB})
    top = await layer.add({"driver": "raw", "node-name": "top",
                           "file": {"driver": "null-co", "size": MiB}})
    b = await layer.add({"driver": "null-co", "node-name": "b", "size": 2 * MiB})
    a.dirty_bitmaps["old"] = DirtyBitmap("old", a.size(), 65536)
    a.dirty_bitmaps["new"] = DirtyBitmap("new", a.size(), 4096, persistent=True,
                                         recording=False)
    b.dirty_bitmaps["x"] = DirtyBitmap("x", b.size(), 65536)
    sent = outgoing_bitmaps(layer.graph.newest_first()[::-1])
    assert [(m.node, m.name, m.granularity, m.enabled, m.persistent, m.size)
            for _, m in sent] == [("a", "new", 4096, False, True, 4 * MiB),
                                  ("a", "old", 65536, True, False, 4 * MiB),
                                  ("b", "x", 65536, True, False, 2 * MiB)]
    # A bitmap in use by an export or a job, or left inconsistent by a crash.
    b.dirty_bitmaps["x"].busy = True
    with pytest.raises(BitmapRefused) as exc:
        outgoing_bitmaps(layer.graph.newest_first()[::-1])
    assert exc.value.message == ("Bitmap 'x' is currently in use by another operation and "
                                 "cannot be used")
    b.dirty_bitmaps["x"].busy = False
    a.dirty_bitmaps["old"].inconsistent = True
    with pytest.raises(BitmapRefused) as exc:
        outgoing_bitmaps(layer.graph.newest_first()[::-1])
    assert exc.value.message.startswith("Bitmap 'old' is inconsistent and cannot be used\n")
    a.dirty_bitmaps["old"].inconsistent = False
    # A node named by the daemon (QEMU's '#block...') cannot be found by name
    # on the other side.
    hidden = top.file
    assert hidden is not None and hidden.auto_named
    hidden.dirty_bitmaps["h"] = DirtyBitmap("h", hidden.size(), 65536)
    with pytest.raises(BitmapRefused) as exc:
        outgoing_bitmaps(layer.graph.newest_first()[::-1])
    assert exc.value.message == (f"Bitmap 'h' in a node with auto-generated name "
                                 f"'{hidden.node_name}' can't be migrated")
