"""``block-commit`` (QEMU 7.2's block/commit.c, mirror.c's active commit and
qmp_block_commit).

* Intermediate commit (the top is not the active layer): copy what the
  layers from the top down to the base hold into the base, then
  (``prepare``) the top's overlay sits on the base and its header names it.
  Progress is the top's virtual size.
* Active commit (the top is the active layer, or something writes to it):
  as in QEMU, a mirror (qmpd.jobs.mirror's MirrorJob) of the top into the
  base.  Every range the layers above the base hold is marked in the job's
  dirty bitmap, which the top's writes keep marking (the mirror's write
  hook); the job copies dirty ranges into the base until none is left, then
  is READY and keeps copying.  ``job-complete`` moves every parent of the top
  (exports included) onto the base; a soft cancel of a ready job completes
  without that pivot.  Progress is the dirty bytes.
"""

from __future__ import annotations

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
    set_backing,
)
from qmpd.block.core import BlockLayer
from qmpd.block.dirty_bitmap import default_granularity
from qmpd.block.driver import PERM_ALL, BlockNode, Perm
from qmpd.block.filename import refresh_filename
from qmpd.block.reloads import reloaded
from qmpd.errors import BlockDriverError, DeviceNotFound, GenericError, QMPError
from qmpd.jobs.block_job import IO_ERRORS, BlockJob, io_errno, io_failure
from qmpd.jobs.inflight import CopyBuffers, write_copied
from qmpd.jobs.manager import JobManager
from qmpd.jobs.mirror import DEFAULT_BUF_SIZE, MAX_IO_BYTES, MirrorJob
from qmpd.jobs.stream import job_flags, lookup_bs, refuse_filter_node

#: COMMIT_BUFFER_SIZE: the most one iteration of an intermediate commit copies.
CHUNK = 512 * 1024


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
        self.buffers = CopyBuffers(CHUNK)

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
                    buf = self.buffers.take()
                    await self.top.read_into(offset, buf[:n])
                    is_read = False
                    await write_copied(self.base, offset, buf, n)
                    self.buffers.give(buf)
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
        # Not over nodes, and a header, that an activation is reloading.
        await reloaded(overlay)
        await set_backing(self.block, overlay, self.base)
        try:
            await overlay.driver.change_backing_file(name, fmt)
        except IO_ERRORS as exc:
            raise io_failure(exc) from None


class ActiveCommitJob(MirrorJob):
    """Active commit: a mirror of ``top`` into ``base`` (QEMU's commit_active_start,
    a ``commit`` job): the mirror's copying, dirty tracking, error handling and
    pivot, with commit's bulk phase, node permissions and resizing of the base."""

    job_type = "commit"
    #: QEMU's copies: an error in each sends its own BLOCK_JOB_ERROR, and a
    #: commit's events are compared with QEMU's one for one.
    bulk_io = MAX_IO_BYTES

    def __init__(self, job_id: str, block: BlockLayer, top: BlockNode, base: BlockNode,
                 on_error: str, speed: int, auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(
            job_id, block, top, base, sync="top",
            granularity=default_granularity(base.driver.cluster_size()),
            buf_size=DEFAULT_BUF_SIZE, on_source_error=on_error, on_target_error=on_error,
            write_blocking=False, replaces=top, speed=speed, auto_finalize=auto_finalize,
            auto_dismiss=auto_dismiss)
        self.block = block
        self.top = top
        self.base = base
        self.base_overlay = find_overlay(top, base)

    async def hold_nodes(self) -> None:
        """mirror_start_job's permissions for a commit: the chain from the top down
        to the base is held, the base written through the job's own backend."""
        top, base = self.top, self.base
        target_perm = Perm.WRITE
        if base.size() < top.size():
            target_perm |= Perm.RESIZE
        shared = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE
        self.source_edge = await self.add_node("main node", top, Perm.CONSISTENT_READ, shared)
        node = below(top)
        while node is not None and node is not base:
            await self.add_node("intermediate node", node, Perm.NONE, shared)
            node = below(node)
        self.target_edge = await self.add_node("target", base, target_perm, shared,
                                               blocks=False)
        top.write_hooks.append(self.hook)
        # A write that started before the hook would never mark its range.
        await top.drain_plain_writes()

    async def run(self) -> None:
        try:
            await super().run()
        except QMPError as exc:
            if exc is self.io_error:  # the job fails with the errno's text (job->ret)
                raise io_failure(exc) from None
            raise

    async def check_target(self, size: int) -> None:
        """mirror_run: a base smaller than the top grows to the top's size."""
        if self.base.size() < size:
            try:
                await self.block.resize(self.base, size)
            except IO_ERRORS as exc:
                raise io_failure(exc) from None

    async def _dirty_init(self, size: int) -> None:
        """mirror_dirty_init with a base: what the layers above the base hold."""
        top, offset = self.top, 0
        while offset < size:
            await self.pause_point()
            if self.is_cancelled:
                return
            found, n = await is_allocated_above(top, self.base_overlay, True, offset,
                                                size - offset)
            if n <= 0:
                break
            if found:
                self.bitmap.set_range(offset, n)
            offset += n


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
    try:
        await job.hold_nodes()
    except BaseException:
        await job.release_nodes()
        await manager.early_fail(job)
        raise
    manager.start(job)
