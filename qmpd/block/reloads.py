"""Waiting for the cache reloads of an activation.

An activation marks a node active (to take its permissions) before its
driver, and those below, have reloaded what they cache; requests through the
node wait meanwhile (:meth:`BlockNode.hold_requests`).  Whatever else reads
or changes a node's metadata (a resize, an inactivation's write-back, a
persistent bitmap's removal, a job's backing-file rewrite, a span read
straight from the host file) waits for the reloads of the node's subtree
here, or declines a shortcut.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qmpd.block.driver import BlockNode


def subtree(node: BlockNode) -> Iterator[BlockNode]:
    """``node`` and every node below it."""
    stack = [node]
    while stack:
        below = stack.pop()
        yield below
        stack.extend(edge.child for edge in below.children.values())


def reload_under_way(nodes: Iterable[BlockNode]) -> asyncio.Future[None] | None:
    """The reload of the first of ``nodes`` that is reloading its cache."""
    return next((n.reloading for n in nodes if n.reloading is not None), None)


def reloading(node: BlockNode) -> bool:
    """Whether ``node`` or one below it is reloading its cache."""
    return reload_under_way(subtree(node)) is not None


async def reloads_done(nodes: Callable[[], Iterable[BlockNode]]) -> None:
    """Wait until none of ``nodes()`` is reloading (looked at again after each
    wait: another activation may have begun meanwhile)."""
    while (reload := reload_under_way(nodes())) is not None:
        await asyncio.shield(reload)


async def reloaded(node: BlockNode) -> None:
    """Wait until neither ``node`` nor one below it is reloading."""
    await reloads_done(lambda: subtree(node))
