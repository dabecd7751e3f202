"""Backing chains: walking them, what their layers hold, and changing them.

QEMU's ``bdrv_find_overlay``, ``bdrv_chain_contains``,
``bdrv_find_backing_image``, ``bdrv_is_allocated(_above)``,
``bdrv_set_backing_hd``, ``bdrv_replace_node`` and the op blockers the
chain commands check (``bdrv_op_is_blocked``), for the stream and commit
jobs and ``blockdev-snapshot``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from typing import Protocol

from qmpd.block import replace
from qmpd.block.driver import BdrvChild, BlockNode, ChildRole
from qmpd.block.filename import backing_overridden, path_combine, refresh_filename
from qmpd.block.graph import BlockGraph
from qmpd.block.status import layer_status
from qmpd.errors import GenericError


def below(node: BlockNode) -> BlockNode | None:
    """The next node down the chain (bdrv_filter_or_cow_bs)."""
    return node.driver.status_fallback()


def walk(top: BlockNode) -> Iterator[BlockNode]:
    """``top`` and every node below it."""
    node: BlockNode | None = top
    while node is not None:
        yield node
        node = below(node)


def chain_contains(top: BlockNode, node: BlockNode) -> bool:
    return any(n is node for n in walk(top))


def has_descendant(node: BlockNode, other: BlockNode) -> bool:
    """Whether ``other`` is ``node`` or below it through any child (bdrv_recurse_has_child)."""
    if node is other:
        return True
    return any(has_descendant(edge.child, other) for edge in node.children.values())


def find_overlay(top: BlockNode, node: BlockNode) -> BlockNode | None:
    """The node of ``top``'s chain right above ``node``."""
    for n in walk(top):
        if below(n) is node:
            return n
    return None


def find_base(top: BlockNode) -> BlockNode:
    """The bottom of the chain (bdrv_find_base): ``top`` itself without a backing."""
    last = top
    for n in walk(top):
        last = n
    return last


def find_backing_image(top: BlockNode, name: str) -> BlockNode | None:
    """The backing node of ``top``'s chain that ``name`` names (bdrv_find_backing_image):
    as a layer's header names it, or the same file by its canonical path."""
    for node in walk(top):
        backing = below(node)
        if backing is None:
            return None
        if backing_overridden(node):
            # Only the backing node's own name can name it then.
            if name == refresh_filename(backing):
                return backing
            continue
        stored = node.driver.raw_backing_file_name()
        if stored is not None and stored == name:
            return backing
        full = node.driver.backing_file_name()
        if full is not None and full == name:
            return backing
        here = path_combine(node.driver.filename(), name)
        if os.path.exists(here):
            real = os.path.realpath(here)
            for candidate in (full, refresh_filename(backing)):
                if candidate and os.path.exists(candidate) \
                        and os.path.realpath(candidate) == real:
                    return backing
    return None


class BlockLayer(Protocol):
    """What changing a chain needs of the block layer (qmpd.block.core's)."""

    @property
    def graph(self) -> BlockGraph: ...

    async def close_node(self, node: BlockNode) -> None: ...


# --- allocation ---------------------------------------------------------------------------


async def is_allocated(node: BlockNode, offset: int, length: int) -> tuple[bool, int]:
    """Whether ``node`` itself holds the bytes from ``offset``, and for how many
    (bdrv_is_allocated); ``(False, 0)`` at or past its end."""
    status = await layer_status(node, offset, length)
    if status is None:
        return False, 0
    return status.allocated, status.length


async def is_allocated_above(top: BlockNode, base: BlockNode | None, include_base: bool,
                             offset: int, length: int) -> tuple[bool, int]:
    """Whether a layer from ``top`` down to ``base`` (included or not) holds the
    bytes from ``offset``; the length of the answer (bdrv_is_allocated_above).
    ``base`` None: the whole chain."""
    n = length
    node: BlockNode | None = top
    while node is not None and (include_base or node is not base):
        allocated, pnum = await is_allocated(node, offset, length)
        if allocated:
            return True, pnum
        if n > pnum and (node is top or offset + pnum < node.size()):
            n = pnum
        if node is base:
            break
        node = below(node)
    return False, n


# --- op blockers ---------------------------------------------------------------------------


class Op(enum.Enum):
    """The operations whose blockers the chain commands check (BlockOpType)."""

    STREAM = "stream"
    COMMIT_SOURCE = "commit-source"
    COMMIT_TARGET = "commit-target"
    EXTERNAL_SNAPSHOT = "external-snapshot"


#: What a backing edge leaves allowed on its child (bdrv_backing_attach).
_BACKING_ALLOWS = frozenset({Op.STREAM, Op.COMMIT_TARGET})


def check_op(node: BlockNode, op: Op) -> None:
    """bdrv_op_is_blocked: the newest blocker's text (a job's before a backing edge's)."""
    for edge in reversed(node.parents):
        user = edge.user
        if user is not None and user.blocker is not None:
            raise GenericError(f"Node '{node.node_name}' is busy: {user.blocker}")
    if op in _BACKING_ALLOWS:
        return
    for edge in reversed(node.parents):
        if edge.parent is not None and edge.name == "backing":
            raise GenericError(f"Node '{node.node_name}' is busy: node is used as "
                               f"backing hd of '{edge.parent.node_name}'")


def is_root(node: BlockNode) -> bool:
    """bdrv_is_root_node: only users outside the graph (exports), no node parent
    and no job's hold on a node other than its main one."""
    return all(edge.parent is None and (edge.user is None or edge.user.blocker is None)
               for edge in node.parents)


# --- changing the chain --------------------------------------------------------------------


async def set_backing(block: BlockLayer, node: BlockNode, backing: BlockNode | None) -> None:
    """bdrv_set_backing_hd: ``node`` on top of ``backing`` (None: none); a former
    backing node only the header opened and nobody uses any more is closed."""
    graph = block.graph
    old = node.children.get("backing")
    if old is not None and old.child is backing:
        return
    if old is not None:
        graph.detach(old)
    if backing is not None:
        graph.attach(node, backing, "backing", ChildRole.COW)
    await graph.refresh_perms(node)
    if old is None:
        return
    child = old.child
    if child in node.inline_children:
        node.inline_children.remove(child)
        if not child.parents and not child.monitor_owned:
            await block.close_node(child)
            return
    await graph.refresh_perms(child)


async def replace_node(block: BlockLayer, old: BlockNode, new: BlockNode,
                       keep: tuple[BdrvChild, ...] = ()) -> None:
    """bdrv_replace_node: every parent of ``old`` but ``keep`` (and ``new``'s
    own chain) uses ``new`` instead; refused as a whole on a permission conflict."""
    await replace.replace_node(block.graph, old, new, keep)


def backing_name(base: BlockNode | None, given: str | None) -> tuple[str | None, str | None]:
    """What a header names after its chain changed: ``backing-file`` or the base's
    filename, and the base's format (None, None without a base)."""
    if base is None:
        return None, None
    return (given if given is not None else refresh_filename(base)), base.driver.format_name


async def snapshot(block: BlockLayer, node_name: str, overlay_name: str) -> None:
    """blockdev-snapshot (external_snapshot_prepare and bdrv_append): ``overlay``
    on top of ``node``, every parent of ``node`` moved onto it."""
    graph = block.graph
    old = graph.lookup(node_name)
    if old is None:
        raise GenericError(f"Cannot find device='{node_name}' nor node-name='{node_name}'")
    check_op(old, Op.EXTERNAL_SNAPSHOT)
    if not old.read_only and old.active:
        try:
            await old.flush()
        except GenericError:
            raise GenericError("An IO error has occurred") from None
    new = graph.lookup(overlay_name)
    if new is None:
        raise GenericError(
            f"Cannot find device='{overlay_name}' nor node-name='{overlay_name}'")
    if any(edge.user is not None and edge.user.blocker is None for edge in new.parents):
        raise GenericError("The overlay is already in use")
    if new.backing is not None:
        raise GenericError("The overlay already has a backing image")
    if not new.driver.supports_backing:
        raise GenericError("The overlay does not support backing images")
    if has_descendant(old, new):
        raise GenericError(f"Making '{old.node_name}' a backing child of "
                           f"'{new.node_name}' would create a cycle")
    await set_backing(block, new, old)
    try:
        keep = tuple(edge for edge in old.parents if edge.parent is new)
        await replace_node(block, old, new, keep)
    except BaseException:
        await set_backing(block, new, None)
        raise
