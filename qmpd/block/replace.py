"""Replacing a node in the graph (QEMU's bdrv_replace_node): every parent of
one node moves to another, as a mirror's pivot does, or nothing moves."""

from __future__ import annotations

from collections.abc import Iterable

from qmpd.block.driver import BdrvChild, BlockNode
from qmpd.block.graph import BlockGraph, check_pair


def _below(node: BlockNode) -> set[int]:
    """``node`` and every node under it."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        stack.extend(edge.child for edge in current.children.values())
    return seen


def movable_parents(old: BlockNode, new: BlockNode,
                    keep: Iterable[BdrvChild] = ()) -> list[BdrvChild]:
    """The edges of ``old`` that :func:`replace_node` moves: all but ``keep``
    and those of ``new`` itself or of nodes under it (QEMU's
    should_update_child: no loop)."""
    kept = {id(edge) for edge in keep}
    under_new = _below(new)
    return [edge for edge in old.parents
            if id(edge) not in kept
            and not (edge.parent is not None and id(edge.parent) in under_new)]


async def replace_node(graph: BlockGraph, old: BlockNode, new: BlockNode,
                       keep: Iterable[BdrvChild] = ()) -> list[BdrvChild]:
    """Move the parents of ``old`` (but ``keep``) to ``new``, permissions checked
    as the graph checks a new user, QEMU's texts; on a refusal nothing moved.
    Returns the edges moved."""
    if old is new:
        return []
    edges = movable_parents(old, new, keep)
    graph.shape += 1
    for edge in edges:
        edge.child = new
        old.parents.remove(edge)
        new.parents.append(edge)
    try:
        for edge in edges:
            for other in new.parents:
                if other is not edge:
                    check_pair(new, edge, other)
                    check_pair(new, other, edge)
        await graph.refresh_perms(new)
    except BaseException:
        graph.shape += 1
        for edge in edges:
            new.parents.remove(edge)
            edge.child = old
            old.parents.append(edge)
        try:
            await graph.refresh_perms(new)
        except Exception:  # the first error is the one to report
            pass
        raise
    for edge in edges:
        if edge.parent is not None:
            await graph.refresh_perms(edge.parent)
    await graph.refresh_perms(old)
    for edge in edges:
        if edge.user is not None:
            edge.user.child_replaced(old, new)
    return edges

