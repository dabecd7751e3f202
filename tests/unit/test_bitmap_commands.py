"""Refusals of inconsistent and read-only bitmaps (their states come from a
qcow2 image: in-use after a crash, or opened read-only).  The texts are
qemu-storage-daemon 7.2's, observed on such images."""

from __future__ import annotations

from typing import Any

import pytest

from qmpd.block.core import BlockLayer
from qmpd.errors import GenericError


async def refusal(layer: BlockLayer, kind: str, args: dict[str, Any]) -> str:
    with pytest.raises(GenericError) as info:
        await layer.bitmaps.run_async(kind, args)
    return info.value.desc


async def test_inconsistent_bitmap(layer: BlockLayer) -> None:
    await layer.add({"driver": "null-co", "node-name": "q", "size": 4 << 20})
    run = layer.bitmaps.run
    run("block-dirty-bitmap-add", {"node": "q", "name": "b0"})
    run("block-dirty-bitmap-add", {"node": "q", "name": "b1"})
    run("block-dirty-bitmap-add", {"node": "q", "name": "ok"})
    node = layer.graph.lookup("q")
    assert node is not None
    for name in ("b0", "b1"):
        node.dirty_bitmaps[name].inconsistent = True
        node.dirty_bitmaps[name].recording = False
        node.dirty_bitmaps[name].persistent = True
    text = "Bitmap 'b0' is inconsistent and cannot be used"
    for kind in ("block-dirty-bitmap-clear", "block-dirty-bitmap-enable",
                 "block-dirty-bitmap-disable"):
        assert await refusal(layer, kind, {"node": "q", "name": "b0"}) == text
    for target, source in (("b0", "ok"), ("ok", "b0")):
        assert await refusal(layer, "block-dirty-bitmap-merge", {
            "node": "q", "target": target, "bitmaps": [source]}) == text
    await node.write(0, b"x")
    assert layer.bitmaps.sha256({"node": "q", "name": "b0"}) == {
        "sha256": "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc"}
    with pytest.raises(GenericError, match="Bitmap 'b1' is inconsistent and cannot be used"):
        await layer.bitmaps.transaction([
            {"type": "block-dirty-bitmap-clear", "data": {"node": "q", "name": "ok"}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "q", "name": "b1"}}])
    assert node.dirty_bitmaps["ok"].count() == 65536  # the clear was undone
    await layer.bitmaps.run_async("block-dirty-bitmap-remove", {"node": "q", "name": "b0"})
    (info,) = [i for i in layer.named_nodes(True) if i["node-name"] == "q"]
    assert info["dirty-bitmaps"] == [
        {"name": "ok", "count": 65536, "granularity": 65536, "recording": True, "busy": False,
         "persistent": False},
        {"name": "b1", "count": 0, "granularity": 65536, "recording": False, "busy": False,
         "persistent": True, "inconsistent": True},
    ]


async def test_readonly_bitmap(layer: BlockLayer) -> None:
    await layer.add({"driver": "null-co", "node-name": "q", "size": 4 << 20})
    layer.bitmaps.run("block-dirty-bitmap-add", {"node": "q", "name": "rb"})
    layer.bitmaps.run("block-dirty-bitmap-add", {"node": "q", "name": "ok"})
    node = layer.graph.lookup("q")
    assert node is not None
    node.dirty_bitmaps["rb"].readonly = True
    text = "Bitmap 'rb' is readonly and cannot be modified"
    assert await refusal(layer, "block-dirty-bitmap-clear", {"node": "q", "name": "rb"}) == text
    assert await refusal(layer, "block-dirty-bitmap-remove", {"node": "q", "name": "rb"}) == text
    assert await refusal(layer, "block-dirty-bitmap-merge", {
        "node": "q", "target": "rb", "bitmaps": ["ok"]}) == text
    # Allowed on a read-only bitmap, as in QEMU.
    for kind in ("block-dirty-bitmap-disable", "block-dirty-bitmap-enable"):
        await layer.bitmaps.run_async(kind, {"node": "q", "name": "rb"})
    await layer.bitmaps.run_async("block-dirty-bitmap-merge", {
        "node": "q", "target": "ok", "bitmaps": ["rb"]})
