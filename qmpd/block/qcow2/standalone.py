"""Open qcow2 images (with their backing chain) without QMP.

For tests, benchmarks and small tools: builds ``file`` nodes and ``qcow2``
nodes in a :class:`~qmpd.block.graph.BlockGraph` the way blockdev-add would
(file child with the image role, backing child with the COW role, locks taken
through ``refresh_perms``).  A backing file whose format is ``raw`` is used
through its ``file`` node directly.
"""

from __future__ import annotations

from typing import Any

from qmpd.block.driver import ChildRole
from qmpd.block.file import FileDriver
from qmpd.block.graph import BlockGraph, BlockNode, NodeConfig
from qmpd.block.qcow2.driver import Qcow2Driver

_QCOW2_MAGIC = b"QFI\xfb"


def _config(read_only: bool, cache_direct: bool, discard_unmap: bool) -> NodeConfig:
    return NodeConfig(
        read_only=read_only,
        force_share=False,
        detect_zeroes="off",
        discard_unmap=discard_unmap,
        cache_direct=cache_direct,
        cache_no_flush=False,
        auto_read_only=False,
    )


async def open_file_node(graph: BlockGraph, path: str, name: str, *, read_only: bool = False,
                         cache_direct: bool = False, discard_unmap: bool = False,
                         locking: str = "auto") -> BlockNode:
    node = graph.new_node(name, False, _config(read_only, cache_direct, discard_unmap))
    node.driver = FileDriver(node)
    await node.driver.open({"driver": "file", "filename": path, "locking": locking})
    graph.register(node)
    return node


def _probe_format(path: str) -> str:
    with open(path, "rb") as f:
        return "qcow2" if f.read(4) == _QCOW2_MAGIC else "raw"


async def open_image(
    graph: BlockGraph,
    path: str,
    *,
    node_name: str = "qcow2",
    read_only: bool = False,
    options: dict[str, Any] | None = None,
    backing: bool = True,
    cache_direct: bool = False,
    discard_unmap: bool = False,
    locking: str = "auto",
    depth: int = 0,
) -> BlockNode:
    """Open ``path`` as a qcow2 node; follow the backing chain when ``backing``."""
    file_node = await open_file_node(
        graph, path, f"{node_name}-file", read_only=read_only, cache_direct=cache_direct,
        discard_unmap=discard_unmap, locking=locking,
    )
    node = graph.new_node(node_name, False, _config(read_only, cache_direct, discard_unmap))
    node.driver = Qcow2Driver(node)
    graph.attach(node, file_node, "file", ChildRole.image())
    opts = {"driver": "qcow2", "file": file_node.node_name, **(options or {})}
    try:
        await node.driver.open(opts)
    except BaseException:
        graph.detach(node.children["file"])
        await file_node.driver.close()
        graph.unregister(file_node)
        raise
    graph.register(node)
    drv = node.driver
    assert isinstance(drv, Qcow2Driver)
    name = drv.full_backing_file_name()
    if backing and name:
        fmt = drv.backing_format() or _probe_format(name)
        bname = f"{node_name}-backing{depth}"
        if fmt == "qcow2":
            bnode = await open_image(graph, name, node_name=bname, read_only=True,
                                     cache_direct=cache_direct, locking=locking,
                                     depth=depth + 1)
        else:
            bnode = await open_file_node(graph, name, bname, read_only=True,
                                         cache_direct=cache_direct, locking=locking)
        graph.attach(node, bnode, "backing", ChildRole.COW)
    await graph.refresh_perms(node)
    return node


async def close_image(node: BlockNode) -> None:
    """Flush and close ``node`` and everything below it."""
    graph = node.graph
    assert isinstance(graph, BlockGraph)  # nodes opened here belong to one
    try:
        if node.active and not node.read_only:
            await node.driver.flush()
    finally:
        await node.driver.close()
        for edge in list(node.children.values()):
            graph.detach(edge)
            child = edge.child
            if not child.parents:
                await close_image(child)
        graph.unregister(node)

