"""Block status over a whole backing chain (QEMU's ``bdrv_block_status_above``).

A driver's ``block_status`` describes one layer: a qcow2 cluster that is not
allocated says so (``allocated=False``) and leaves the answer to the layers
below.  :func:`block_status_above` walks down the chain the way QEMU's
``bdrv_co_common_block_status_above`` does (``block/io.c``):

* a layer that holds the range (data or zeros) ends the walk, and the
  result is that layer's, with the number of layers looked at as its depth;
* a layer that leaves it unallocated shortens the range to what it
  reported, and the next layer down (:meth:`BlockDriver.status_fallback`,
  QEMU's ``bdrv_filter_or_cow_bs``) is asked;
* a layer that ends before the range starts (a backing file shorter than
  its overlay) reads as zeros allocated at that layer;
* when no layer holds the range, the result is the last layer's;
* data a layer marks ``recurse`` (qcow2 with preallocated metadata) reads
  as zeros where its file has a hole.

The NBD exports build ``base:allocation`` and ``qemu:allocation-depth``
from it, as QEMU's server does (``nbd/server.c``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from qmpd.block.driver import BlockStatus

if TYPE_CHECKING:
    from qmpd.block.graph import BlockNode


async def layer_status(node: BlockNode, offset: int, length: int) -> BlockStatus | None:
    """One layer's status for at most ``length`` bytes; None at or past its end
    (QEMU's ``bdrv_co_block_status`` returning ``*pnum == 0`` with EOF)."""
    size = node.size()
    if offset >= size:
        return None
    length = min(length, size - offset)
    status = await node.block_status(offset, length)
    if status.length > length:
        status = replace(status, length=length)
    if status.recurse and status.data and not status.zero and status.offset is not None:
        status = await _zero_in_file(node, status)
    return status


async def _zero_in_file(node: BlockNode, status: BlockStatus) -> BlockStatus:
    """Data that lies in a hole of the file (or past its end) reads as zeros."""
    file = node.file
    if file is None or status.offset is None:
        return status
    found = await layer_status(file, status.offset, status.length)
    if found is None or (found.zero and status.offset + found.length >= file.size()):
        return replace(status, zero=True)
    return replace(status, length=found.length, zero=found.zero)


async def block_status_above(node: BlockNode, offset: int, length: int) -> BlockStatus:
    """The status of the bytes from ``offset`` as the whole chain under ``node`` sees them.

    ``allocated``: some layer holds the range; ``depth``: how many layers
    below ``node`` that layer is (0: ``node`` itself).  A range that no
    layer holds is reported as the bottom layer reported it.  ``length`` 0
    only at or past the end of ``node``.
    """
    status = await layer_status(node, offset, length)
    if status is None:
        return BlockStatus(length=0, data=False, zero=False, allocated=False)
    if status.allocated or status.length <= 0:
        return status if status.depth == 0 else replace(status, depth=0)
    length = status.length
    depth = 0
    below = node.driver.status_fallback()
    while below is not None:
        depth += 1
        found = await layer_status(below, offset, length)
        if found is None:
            # A shorter layer: what lies past its end reads as zeros from it.
            return BlockStatus(length=length, data=False, zero=True, allocated=True, depth=depth)
        if found.length <= 0:
            break
        if found.allocated:
            return replace(found, depth=depth)
        status = found
        length = found.length
        below = below.driver.status_fallback()
    return replace(status, length=length, allocated=False, depth=depth)
