"""``block-stream`` (QEMU 7.2's block/stream.c and qmp_block_stream).

The job copies into the top node whatever the layers between it and the
base hold and it does not, then (``prepare``) takes those layers out of the
chain and names the base in the top image's header.  Progress is the top
node's virtual size.
"""

from __future__ import annotations

from typing import Any

from qmpd.block.chain import (
    Op,
    backing_name,
    below,
    chain_contains,
    check_op,
    find_backing_image,
    find_overlay,
    is_allocated,
    is_allocated_above,
    set_backing,
    walk,
)
from qmpd.block.core import BlockLayer
from qmpd.block.driver import PERM_ALL, BlockNode, Perm
from qmpd.block.reloads import reloaded
from qmpd.block.tracked import RangeSerialiser
from qmpd.errors import BlockDriverError, GenericError
from qmpd.jobs.block_job import IO_ERRORS, BlockJob, io_errno, io_failure
from qmpd.jobs.inflight import CopyBuffers, write_copied
from qmpd.jobs.manager import JobManager

#: STREAM_CHUNK: the most one iteration copies.
CHUNK = 512 * 1024


def lookup_bs(block: BlockLayer, device: str | None, node_name: str | None) -> BlockNode:
    """bdrv_lookup_bs (qmpd has no devices: both name nodes)."""
    for name in (device, node_name):
        if name is not None:
            node = block.graph.lookup(name)
            if node is not None:
                return node
    raise GenericError(f"Cannot find device='{device or ''}' nor node-name='{node_name or ''}'")


def refuse_filter_node(args: dict[str, Any]) -> None:
    """qmpd inserts no filter node above the chain it works on."""
    if args.get("filter-node-name") is not None:
        raise GenericError("Parameter 'filter-node-name' is not supported by qmpd")


def job_flags(args: dict[str, Any]) -> dict[str, bool]:
    return {"auto_finalize": args.get("auto-finalize", True),
            "auto_dismiss": args.get("auto-dismiss", True)}


class StreamJob(BlockJob):
    """Copy the layers above ``base`` into ``top``; then ``top`` sits on ``base``."""

    job_type = "stream"

    def __init__(self, job_id: str, block: BlockLayer, top: BlockNode,
                 base_overlay: BlockNode, backing_file: str | None, on_error: str,
                 speed: int, auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(job_id, block.graph, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.block = block
        self.top = top
        #: The lowest layer streamed from (its backing is the base).
        self.base_overlay = base_overlay
        self.backing_file = backing_file
        self.on_error = on_error
        self.buffers = CopyBuffers(CHUNK)

    async def _run(self) -> None:
        top = self.top
        if top is self.base_overlay:
            return  # nothing to stream
        length = top.size()
        self.progress_set_remaining(length)
        error: BlockDriverError | None = None
        offset = 0
        while offset < length:
            await self.ratelimit_sleep()
            if self.is_cancelled:
                break
            copy = False
            n = 0
            try:
                allocated, n = await is_allocated(top, offset, CHUNK)
                if not allocated:
                    upper = below(top)
                    assert upper is not None
                    found, n = await is_allocated_above(upper, self.base_overlay, True,
                                                        offset, n)
                    if not found and n == 0:
                        n = length - offset  # past the end of the backing file
                    copy = found
                if copy:
                    await self._populate(offset, n)
            except IO_ERRORS as exc:
                action = self.error_action(self.on_error, True, io_errno(exc))
                if action == "stop":
                    continue
                error = error or io_failure(exc)
                if action == "report":
                    break
                n = max(n, 0)
            self.progress_update(n)
            offset += n
            if copy:
                self.ratelimit_processed(n)
        if error is not None:
            raise error  # an ignored error keeps the backing chain

    async def _populate(self, offset: int, length: int) -> None:
        """Copy-on-read of one range: what the chain holds, written into the top,
        serialised against the top's writes; what the top came to hold
        meanwhile is left as it is."""
        top = self.top
        serialiser = top.serialiser
        assert serialiser is not None
        async with serialiser.copy(offset, length):
            pos, end = offset, offset + length
            while pos < end:
                # Any range is copied a buffer at a time.
                allocated, n = await is_allocated(top, pos, min(end - pos, self.buffers.size))
                if n <= 0:
                    break
                if not allocated:
                    buf = self.buffers.take()
                    await top.read_into(pos, buf[:n])
                    await write_copied(top, pos, buf, n)
                    self.buffers.give(buf)
                pos += n

    async def run(self) -> None:
        top = self.top
        if top.serialiser is not None:  # another copying job: never, stream blocks it
            raise BlockDriverError("Device or resource busy", 16)
        top.serialiser = RangeSerialiser()
        try:
            await self._run()
        finally:
            top.serialiser = None

    async def prepare(self) -> None:
        top = self.top
        base = below(self.base_overlay)
        # The layers in between are going away: the job lets go of them first.
        await self.release_nodes()
        if below(top) is None:
            return
        name, fmt = backing_name(base, self.backing_file)
        # Not over nodes, and a header, that an activation is reloading.
        await reloaded(top)
        await set_backing(self.block, top, base)
        try:
            await top.driver.change_backing_file(name, fmt)
        except IO_ERRORS as exc:
            raise io_failure(exc) from None


async def start_stream(manager: JobManager, block: BlockLayer, args: dict[str, Any]) -> None:
    """qmp_block_stream and stream_start, QEMU 7.2's checks in QEMU's order."""
    device = args["device"]
    base = args.get("base")
    base_node = args.get("base-node")
    bottom = args.get("bottom")
    backing_file = args.get("backing-file")
    if base is not None and base_node is not None:
        raise GenericError("'base' and 'base-node' cannot be specified at the same time")
    if base is not None and bottom is not None:
        raise GenericError("'base' and 'bottom' cannot be specified at the same time")
    if bottom is not None and base_node is not None:
        raise GenericError("'bottom' and 'base-node' cannot be specified at the same time")
    top = lookup_bs(block, device, device)
    base_bs: BlockNode | None = None
    if base is not None:
        base_bs = find_backing_image(top, base)
        if base_bs is None:
            raise GenericError(f"Can't find '{base}' in the backing chain")
    if base_node is not None:
        base_bs = lookup_bs(block, None, base_node)
        if base_bs is top or not chain_contains(top, base_bs):
            raise GenericError(f"Node '{base_node}' is not a backing image of '{device}'")
    bottom_bs: BlockNode | None = None
    if bottom is not None:
        bottom_bs = lookup_bs(block, None, bottom)
        if not chain_contains(top, bottom_bs):
            raise GenericError(f"Node '{bottom}' is not in a chain starting from '{device}'")
    end = below(bottom_bs) if bottom_bs is not None else base_bs
    for layer in walk(top):
        if layer is end:
            break
        check_op(layer, Op.STREAM)
    if base_bs is None and backing_file is not None:
        raise GenericError("backing file specified, but streaming the entire chain")
    if bottom_bs is not None:
        base_overlay: BlockNode | None = bottom_bs
        base_bs = below(bottom_bs)
    else:
        base_overlay = find_overlay(top, base_bs) if base_bs is not None else _bottom(top)
    if base_overlay is None:
        assert base_bs is not None
        raise GenericError(f"'{base_bs.node_name}' is not in the backing chain of "
                           f"'{top.node_name}'")
    refuse_filter_node(args)
    job = StreamJob(args.get("job-id", ""), block, top, base_overlay, backing_file,
                    args.get("on-error", "report"), args.get("speed", 0), **job_flags(args))
    manager.create(job)
    basic = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED
    try:
        await job.add_node("active node", top, Perm.WRITE_UNCHANGED, PERM_ALL)
        node: BlockNode | None = below(top)
        while node is not None and node is not base_bs:
            await job.add_node("intermediate node", node, Perm.NONE, basic)
            node = below(node)
    except BaseException:
        await job.release_nodes()
        await manager.early_fail(job)
        raise
    manager.start(job)


def _bottom(top: BlockNode) -> BlockNode:
    """The last node of the chain (bdrv_find_overlay with no base)."""
    last = top
    for node in walk(top):
        last = node
    return last
