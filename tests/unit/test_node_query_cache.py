"""query-named-block-nodes reuses encoded node infos: never a stale one.

Each step changes the graph or a node's state (a write growing actual-size
and setting the dirty flag, a resize, activation, an add with a backing
chain, a delete) and then checks that the reply, as encoded on the wire,
is what an uncached computation gives, for the flat and nested flavours.
"""

from __future__ import annotations

import os
from pathlib import Path

from qmpd.block.core import BlockLayer
from qmpd.qmp.encode import Encoded, encode
from tests.support.block import qcow2

MiB = 1 << 20


def uncached(layer: BlockLayer, flat: bool) -> str:
    return encode([layer.device_info(node, flat) for node in layer.graph.newest_first()])


def check(layer: BlockLayer) -> list[str]:
    """Both flavours twice (the second from the cache) equal the uncached reply."""
    replies = []
    for flat in (False, True, False, True):
        reply = layer.named_nodes(flat)
        assert encode(reply) == uncached(layer, flat)
        # The pretty writer sees the members, not the cached text.
        assert encode(reply, pretty=True) == encode(
            [dict(info) for info in reply], pretty=True)
        replies.append(encode(reply))
    return replies


async def test_cached_node_infos_follow_every_change(tmp_path: Path, layer: BlockLayer) -> None:
    a = await layer.add(qcow2(tmp_path, "a"))
    await layer.add(qcow2(tmp_path, "b"))
    first = check(layer)
    assert all(isinstance(info, Encoded) for info in layer.named_nodes(True))

    # A write allocates clusters: actual-size grows (fstat each query).
    await a.driver.write(0, b"\x5a" * (2 * MiB))
    await layer.flush_all()
    after_write = check(layer)
    assert after_write != first
    infos = {i["node-name"]: i for i in layer.named_nodes(True)}
    path = str(tmp_path / "a.qcow2")
    assert infos["a-file"]["image"]["actual-size"] == os.stat(path).st_blocks * 512

    await layer.resize(a, 8 * MiB)
    after_resize = check(layer)
    infos = {i["node-name"]: i for i in layer.named_nodes(True)}
    assert infos["a"]["image"]["virtual-size"] == 8 * MiB
    assert after_resize != after_write

    await layer.set_active("b", False)
    after_inactive = check(layer)
    infos = {i["node-name"]: i for i in layer.named_nodes(True)}
    assert infos["b"]["active"] is False
    await layer.set_active(None, True)
    assert check(layer) == after_resize

    # A node over a backing chain: the nested reply includes the backing
    # image, whose own volatile members must be current too.
    over = qcow2(tmp_path, "over")
    over["backing"] = "a"
    top = await layer.add(over)
    check(layer)
    await a.driver.write(4 * MiB, b"\xa5" * MiB)
    await layer.flush_all()
    nested = {i["node-name"]: i for i in layer.named_nodes(False)}
    assert nested["over"]["image"]["backing-image"]["actual-size"] == (
        nested["a"]["image"]["actual-size"])
    check(layer)

    await layer.delete("b")
    await layer.delete(top.node_name)
    replies = check(layer)
    names = [i["node-name"] for i in layer.named_nodes(True)]
    assert "b" not in names and "over" not in names
    # A new node under a deleted one's name is not served the old info.
    (tmp_path / "new").mkdir()
    await layer.add(qcow2(tmp_path / "new", "b") | {"read-only": True})
    check(layer)
    infos = {i["node-name"]: i for i in layer.named_nodes(True)}
    assert infos["b"]["ro"] is True
    assert replies != check(layer)
    assert after_inactive != after_resize


async def test_cached_node_infos_follow_dirty_bitmaps(tmp_path: Path, layer: BlockLayer) -> None:
    """Adding a bitmap, a write that changes its count, a disable, a remove:
    each gives a new encoding, never the cached one."""
    a = await layer.add(qcow2(tmp_path, "a"))
    no_bitmaps = check(layer)
    layer.bitmaps.run("block-dirty-bitmap-add", {"node": "a", "name": "b", "granularity": 512})
    added = check(layer)
    assert added != no_bitmaps
    await a.write(0, b"\x11" * 4096)
    written = check(layer)
    assert written != added
    infos = {i["node-name"]: i for i in layer.named_nodes(True)}
    assert infos["a"]["dirty-bitmaps"][0]["count"] == 4096
    layer.bitmaps.run("block-dirty-bitmap-disable", {"node": "a", "name": "b"})
    disabled = check(layer)
    assert disabled != written
    await layer.bitmaps.run_async("block-dirty-bitmap-remove", {"node": "a", "name": "b"})
    assert check(layer) != disabled
    infos = {i["node-name"]: i for i in layer.named_nodes(True)}
    assert "dirty-bitmaps" not in infos["a"]
