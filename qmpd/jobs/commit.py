"""``block-commit`` (QEMU 7.2's block/commit.c, mirror.c's active commit and
qmp_block_commit).

* Intermediate commit (the top is not the active layer): copy what the
  layers from the top down to the base hold into the base, then
  (``prepare``) the top's overlay sits on the base and its header names it.
  Progress is the top's virtual size.
* Active commit (the top is the active layer, or something writes to it):
  mirror-like.  Every range the layers above the base hold is marked in an
  internal dirty bitmap of the top, which the top's writes keep marking;
  the job copies dirty ranges into the base until none is left, then is
  READY and keeps copying.  ``job-complete`` moves every parent of the top
  (exports included) onto the base; a soft cancel of a ready job completes
  without that pivot.  Progress is the dirty bytes.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from qmpd.block.chain import (
    Op,
    backing_name,
    below,
    chain_contains,
    check_op,
    find_backing_image,
    find_base,
    find_overlay,
    is_allocated_above,
    is_root,
    replace_node,
    set_backing,
)
from qmpd.block.core import BlockLayer
from qmpd.block.dirty_bitmap import DirtyBitmap, default_granularity
from qmpd.block.driver import PERM_ALL, BlockNode, Perm
from qmpd.block.filename import refresh_filename
from qmpd.block.status import block_status_above
from qmpd.block.tracked import RangeSerialiser
from qmpd.errors import BlockDriverError, DeviceNotFound, GenericError
from qmpd.jobs.block_job import IO_ERRORS, SLICE, BlockJob, io_errno, io_failure
from qmpd.jobs.inflight import next_dirty
from qmpd.jobs.manager import JobManager
from qmpd.jobs.stream import job_flags, lookup_bs, refuse_filter_node

#: COMMIT_BUFFER_SIZE: the most one iteration of an intermediate commit copies.
CHUNK = 512 * 1024
#: An active commit's mirror: the most one iteration copies (DEFAULT_MIRROR_BUF_SIZE),
#: the most one of its operations does (MAX_IO_BYTES).
BUF_SIZE = 16 * 1024 * 1024
MAX_IO = 1024 * 1024


class CommitJob(BlockJob):
    """Intermediate commit: ``top`` .. above ``base`` into ``base``."""

    job_type = "commit"

    def __init__(self, job_id: str, block: BlockLayer, active: BlockNode, top: BlockNode,
                 base: BlockNode, backing_file: str | None, on_error: str, speed: int,
                 auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(job_id, block.graph, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.block = block
        self.active = active
        self.top = top
        self.base = base
        self.base_overlay = find_overlay(top, base)
        self.backing_file = backing_file
        self.on_error = on_error

    async def run(self) -> None:
        length = self.top.size()
        self.progress_set_remaining(length)
        offset = 0
        while offset < length:
            await self.ratelimit_sleep()
            if self.is_cancelled:
                return
            copy = False
            n = 0
            is_read = True
            try:
                copy, n = await is_allocated_above(self.top, self.base_overlay, True,
                                                   offset, min(CHUNK, length - offset))
                if copy:
                    data = await self.top.read(offset, n)
                    is_read = False
                    if data.count(0) == len(data):
                        await self.base.write_zeroes(offset, n)
                    else:
                        await self.base.write(offset, data)
            except IO_ERRORS as exc:
                action = self.error_action(self.on_error, is_read, io_errno(exc))
                if action == "report":
                    raise io_failure(exc) from None
                continue
            self.progress_update(n)
            offset += n
            if copy:
                self.ratelimit_processed(n)

    async def prepare(self) -> None:
        """bdrv_drop_intermediate: the top's overlay on the base, named in its header."""
        await self.release_nodes()
        overlay = find_overlay(self.active, self.top)
        if overlay is None:
            raise BlockDriverError(os.strerror(1), 1)
        name, fmt = backing_name(self.base, self.backing_file)
        await set_backing(self.block, overlay, self.base)
        try:
            await overlay.driver.change_backing_file(name, fmt)
        except IO_ERRORS as exc:
            raise io_failure(exc) from None


class ActiveCommitJob(BlockJob):
    """Active commit: mirror ``top`` into ``base`` (a ``commit`` job with a ready phase)."""

    job_type = "commit"

    def __init__(self, job_id: str, block: BlockLayer, top: BlockNode, base: BlockNode,
                 on_error: str, speed: int, auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(job_id, block.graph, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.block = block
        self.top = top
        self.base = base
        self.base_overlay = find_overlay(top, base)
        self.on_error = on_error
        self.should_complete = False
        self.serialiser: RangeSerialiser | None = None
        granularity = default_granularity(base.driver.cluster_size())
        self.bitmap = DirtyBitmap("", top.size(), granularity)

    def cancel(self, force: bool) -> bool:
        """mirror_cancel: a soft cancel of a ready job is its final sync."""
        return force or not self.ready

    def complete(self) -> None:
        self.should_complete = True
        self.enter()

    async def run(self) -> None:
        top, bitmap = self.top, self.bitmap
        top.internal_bitmaps.append(bitmap)
        if top.serialiser is None:  # the pivot waits for the top's writes in flight
            top.serialiser = self.serialiser = RangeSerialiser()
        length = top.size()
        offset = 0
        while offset < length:  # mirror_dirty_init (mirror_throttle: a pause point)
            await self.pause_point()
            if self.is_cancelled:
                return
            found, n = await is_allocated_above(top, self.base_overlay, True, offset,
                                                length - offset)
            if n <= 0:
                break
            if found:
                bitmap.set_range(offset, n)
            offset += n
        while True:
            if self.is_cancelled:
                return
            dirty = bitmap.count()
            self.progress_set_remaining(dirty)
            if dirty:
                await self._iteration()
                await self.ratelimit_sleep()
                continue
            if not self.ready:
                await self._flush()
                self.transition_to_ready()
                continue
            if self.should_complete or self.cancel_requested:
                return
            await self.sleep(SLICE)

    async def _iteration(self) -> None:
        """mirror_iteration: the first dirty run (at most a buffer), its bits
        cleared first so that writes meanwhile mark it again, copied as
        mirror_perform's operations (one per block-status extent, at most
        MAX_IO each), all under way at once; each failed one reports its
        error, as QEMU's in-flight operations do."""
        bitmap = self.bitmap
        k = next_dirty(bitmap.bits, 0, bitmap.granules)
        if k is None:
            return
        g = bitmap.granularity
        # With a speed, a run of one operation: the limit is kept between runs.
        run = MAX_IO if self.speed else BUF_SIZE
        limit = min(bitmap.granules, k + max(1, run // g))
        end = k + 1
        while end < limit and bitmap.bits[end >> 3] >> (end & 7) & 1:
            end += 1
        offset = k * g
        stop = min(end * g, bitmap.size)
        bitmap.reset_range(offset, stop - offset)
        ops: list[tuple[int, int]] = []
        pos = offset
        while pos < stop:
            try:
                status = await block_status_above(self.top, pos, stop - pos)
                n = status.length if status.length > 0 else stop - pos
            except IO_ERRORS:
                n = stop - pos
            n = min(n, MAX_IO, stop - pos)
            if n >= g:
                n -= n % g
            ops.append((pos, n))
            pos += n
        results = await asyncio.gather(*(self._copy(o, n) for o, n in ops))
        failed = next((r for r in results if r is not None), None)
        if failed is not None:
            raise io_failure(failed)

    async def _copy(self, offset: int, length: int) -> BaseException | None:
        """One operation: the error a ``report`` action makes fatal, if any."""
        is_read = True
        try:
            data = await self.top.read(offset, length)
            is_read = False
            if data.count(0) == len(data):
                await self.base.write_zeroes(offset, length)
            else:
                await self.base.write(offset, data)
        except IO_ERRORS as exc:
            self.bitmap.set_range(offset, length)
            if self.error_action(self.on_error, is_read, io_errno(exc)) == "report":
                return exc
            return None
        self.progress_update(length)
        self.ratelimit_processed(length)
        return None

    async def _flush(self) -> None:
        try:
            await self.base.flush()
        except IO_ERRORS as exc:
            action = self.error_action(self.on_error, False, io_errno(exc))
            if action == "report":
                raise io_failure(exc) from None

    async def prepare(self) -> None:
        """mirror_exit_common: what was written since the last copy, then the pivot
        (job-complete only)."""
        bitmap = self.bitmap
        try:
            if self.should_complete:
                while bitmap.count():
                    await self._iteration()
                await self.release_nodes()
                await self._pivot()
        except IO_ERRORS as exc:
            raise io_failure(exc) from None

    async def _pivot(self) -> None:
        """The top's parents onto the base.  Writes to the base wait meanwhile
        (QEMU keeps both drained): the top's writes still in flight land, and
        are copied, before any write made through the base."""
        top, base = self.top, self.base
        size = top.size()
        held = base.serialiser is None
        if held:
            base.serialiser = RangeSerialiser()
        serialiser = base.serialiser
        assert serialiser is not None
        try:
            async with serialiser.copy(0, size):
                await replace_node(self.block, top, base)
                if top.serialiser is not None:
                    async with top.serialiser.copy(0, size):
                        pass  # every write to the top in flight is done
                while self.bitmap.count():
                    await self._iteration()
                await base.flush()
        finally:
            if held:
                base.serialiser = None

    async def clean(self) -> None:
        if self.serialiser is not None and self.top.serialiser is self.serialiser:
            self.top.serialiser = None
        if self.bitmap in self.top.internal_bitmaps:
            self.top.internal_bitmaps.remove(self.bitmap)
        await super().clean()


async def start_commit(manager: JobManager, block: BlockLayer, args: dict[str, Any]) -> None:
    """qmp_block_commit, commit_start and commit_active_start: QEMU 7.2's checks in
    QEMU's order."""
    device = args["device"]
    bs = block.graph.lookup(device)
    if bs is None:
        raise DeviceNotFound(f"Device '{device}' not found")
    if not is_root(bs):
        raise GenericError("Need a root block node")
    check_op(bs, Op.COMMIT_SOURCE)
    top_node, top = args.get("top-node"), args.get("top")
    top_bs: BlockNode | None = bs
    if top_node is not None and top is not None:
        raise GenericError("'top-node' and 'top' are mutually exclusive")
    if top_node is not None:
        top_bs = lookup_bs(block, None, top_node)
        if not chain_contains(bs, top_bs):
            raise GenericError(f"'{top_node}' is not in this backing file chain")
    elif top is not None and refresh_filename(bs) != top:
        top_bs = find_backing_image(bs, top)
    if top_bs is None:
        raise GenericError(f"Top image file {top if top is not None else 'NULL'} not found")
    base_node, base = args.get("base-node"), args.get("base")
    if base_node is not None and base is not None:
        raise GenericError("'base-node' and 'base' are mutually exclusive")
    if base_node is not None:
        base_bs: BlockNode | None = lookup_bs(block, None, base_node)
        assert base_bs is not None
        if not chain_contains(top_bs, base_bs):
            raise GenericError(f"'{base_node}' is not in this backing file chain")
    elif base is not None:
        base_bs = find_backing_image(top_bs, base)
        if base_bs is None:
            raise GenericError(f"Can't find '{base}' in the backing chain")
    else:
        base_bs = find_base(top_bs)
    end = below(base_bs)
    node: BlockNode | None = top_bs
    while node is not None and node is not end:
        check_op(node, Op.COMMIT_TARGET)
        node = below(node)
    if top_bs is base_bs:
        raise GenericError("cannot commit an image into itself")
    backing_file = args.get("backing-file")
    job_id = args.get("job-id", "")
    on_error = args.get("on-error", "report")
    speed = args.get("speed", 0)
    if top_bs.cumulative_perms()[0] & Perm.WRITE or top_bs is bs:
        if backing_file is not None:
            if top_bs is bs:
                raise GenericError("'backing-file' specified, but 'top' is the active layer")
            raise GenericError("'backing-file' specified, but 'top' has a writer on it")
        await _start_active(manager, block, args, ActiveCommitJob(
            job_id, block, top_bs, base_bs, on_error, speed, **job_flags(args)))
        return
    overlay = find_overlay(bs, top_bs)
    assert overlay is not None
    check_op(overlay, Op.COMMIT_TARGET)
    refuse_filter_node(args)
    job = CommitJob(job_id, block, bs, top_bs, base_bs, backing_file, on_error, speed,
                    **job_flags(args))
    manager.create(job)
    shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE
    try:
        await job.add_node("main node", bs, Perm.NONE, PERM_ALL)
        if overlay is not bs:
            await job.add_node("overlay of top", overlay, Perm.NONE, PERM_ALL)
        # The job reads the top through a BlockBackend of its own: "in use".
        await job.add_node("top", top_bs, Perm.NONE, PERM_ALL, blocks=False)
        node = top_bs
        while node is not None and node is not base_bs:
            await job.add_node("intermediate node", node, Perm.NONE, shared)
            node = below(node)
        # The job writes through a BlockBackend of its own: the base is "in use".
        await job.add_node("base", base_bs, Perm.CONSISTENT_READ | Perm.WRITE,
                           Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED, blocks=False)
    except BaseException:
        await job.release_nodes()
        await manager.early_fail(job)
        raise
    manager.start(job)


async def _start_active(manager: JobManager, block: BlockLayer, args: dict[str, Any],
                        job: ActiveCommitJob) -> None:
    """commit_active_start / mirror_start_job."""
    top, base = job.top, job.base
    if top is base:
        raise GenericError("Can't mirror node into itself")
    refuse_filter_node(args)
    manager.create(job)
    target_perm = Perm.WRITE
    if base.size() < top.size():
        target_perm |= Perm.RESIZE
    shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE
    try:
        await job.add_node("main node", top, Perm.CONSISTENT_READ, shared)
        node = below(top)
        while node is not None and node is not base:
            await job.add_node("intermediate node", node, Perm.NONE, shared)
            node = below(node)
        await job.add_node("target", base, target_perm, shared, blocks=False)
    except BaseException:
        await job.release_nodes()
        await manager.early_fail(job)
        raise
    manager.start(job)
