"""``blockdev-backup`` (QEMU's block/backup.c, block-copy and the
copy-before-write filter): a point-in-time copy of a node.

The job copies, cluster by cluster, what ``sync`` selects (``full``:
everything; ``top``: what the source itself holds; ``bitmap``/``incremental``:
the clusters a dirty bitmap marks; ``none``: only what guest writes are about
to overwrite).  A :class:`~qmpd.block.driver.WriteHook` on the source copies
the old data of a cluster not yet copied before a guest write changes it, so
the target holds the source as it was when the job started.

A sync bitmap is frozen for the job's length: new writes go to a successor,
and at the end (``bitmap-mode``) the bitmap is either replaced by the
successor (what was copied is clean) or gets the successor merged back.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Any

from qmpd.block.bitmaps import ALLOW_RO, DEFAULT, check
from qmpd.block.core import BlockLayer
from qmpd.block.dirty_bitmap import DirtyBitmap
from qmpd.block.driver import BlockNode, Perm, WriteHook
from qmpd.block.status import block_status_above, layer_status
from qmpd.errors import GenericError, QMPError
from qmpd.jobs.block_job import BlockJob, as_qmp_error
from qmpd.jobs.inflight import CopyBuffers, RangeLocks, next_dirty
from qmpd.jobs.job import JobTxn
from qmpd.jobs.manager import JobManager
from qmpd.jobs.mirror import create_block_job

#: BLOCK_COPY_CLUSTER_SIZE_DEFAULT, and the largest request of one copy task.
CLUSTER_DEFAULT = 64 << 10
MAX_CHUNK = 1 << 20
#: Copy tasks at once (block-copy's default max-workers is 64).
WORKERS = 16


class _CopyBeforeWrite(WriteHook):
    """The copy-before-write filter: old data to the target first."""

    def __init__(self, job: BackupJob) -> None:
        self.job = job

    async def before_write(self, node: BlockNode, offset: int, length: int) -> BlockNode | None:
        await self.job.copy_range(offset, length)
        return None

    async def after_write(self, node: BlockNode, offset: int, length: int,
                          data: bytes | None) -> None:
        self.job.record(offset, length)

    def write_failed(self, node: BlockNode, offset: int, length: int) -> None:
        self.job.record(offset, length)


class BackupJob(BlockJob):
    """One blockdev-backup."""

    job_type = "backup"

    def __init__(self, job_id: str, block: BlockLayer, source: BlockNode, target: BlockNode,
                 *, sync: str, bitmap: DirtyBitmap | None, bitmap_mode: str,
                 on_source_error: str, on_target_error: str,
                 auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(job_id, block.graph, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.source = source
        self.target = target
        self.sync = sync
        self.sync_bitmap = bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.size = source.size()
        self.cluster = max(CLUSTER_DEFAULT, target.driver.cluster_size() or 0)
        #: Clusters still to copy.
        self.copy_bitmap = DirtyBitmap("", self.size, self.cluster)
        self.locks = RangeLocks()
        self.buffers = CopyBuffers(MAX_CHUNK, WORKERS)
        self.hook = _CopyBeforeWrite(self)
        self.successor: DirtyBitmap | None = None
        self._was_recording = False
        self.io_error: QMPError | None = None
        self._cursor = 0

    # --- set-up ------------------------------------------------------------------------

    async def hold_nodes(self) -> None:
        await self.add_node("source", self.source, Perm.CONSISTENT_READ,
                            Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED,
                            blocks=False, fronts_users=True)
        await self.add_node("target", self.target, Perm.WRITE,
                            Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED)

    def install(self) -> None:
        """The copy bitmap, the frozen sync bitmap and the filter on the source
        (backup_job_create, bdrv_cbw_append)."""
        if self.sync == "bitmap":
            assert self.sync_bitmap is not None
            for start, length in self.sync_bitmap.dirty_extents(0, self.size):
                self.copy_bitmap.set_range(start, length)
        else:
            self.copy_bitmap.set_all()
        bitmap = self.sync_bitmap
        if bitmap is not None:
            self._was_recording = bitmap.recording
            self.successor = DirtyBitmap("", bitmap.size, bitmap.granularity,
                                         recording=bitmap.recording)
            bitmap.recording = False
            bitmap.busy = True
        self.source.write_hooks.append(self.hook)
        self.progress_set_remaining(self.copy_bitmap.count())

    def record(self, offset: int, length: int) -> None:
        """A write the frozen bitmap's successor records."""
        if self.successor is not None and self.successor.recording:
            self.successor.set_range(offset, length)

    # --- finishing ----------------------------------------------------------------------

    async def commit(self) -> None:
        self._bitmap_fate(0)

    async def abort(self) -> None:
        self._bitmap_fate(self.ret or -errno.ECANCELED)

    async def clean(self) -> None:
        if self.successor is not None:  # never finished (a transaction's abort)
            self._bitmap_fate(-errno.ECANCELED)
        if self.hook in self.source.write_hooks:
            self.source.write_hooks.remove(self.hook)
        await super().clean()

    def _bitmap_fate(self, ret: int) -> None:
        """backup_cleanup_sync_bitmap."""
        bitmap, successor = self.sync_bitmap, self.successor
        if bitmap is None or successor is None:
            return
        self.successor = None
        bitmap.busy = False
        mode = self.bitmap_mode
        if (ret == 0 or mode == "always") and mode != "never":
            bitmap.load_bytes(successor.to_bytes())   # abdicate: the successor takes over
        else:
            bitmap.merge(successor)                   # reclaim
        bitmap.recording = self._was_recording
        if ret < 0 and mode == "always":
            bitmap.merge(self.copy_bitmap)

    # --- the work ----------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if self.sync == "none":
                while not self.cancel_requested:
                    await self.yield_()
                return
            if self.sync == "top":
                await self._skip_unallocated()
            await self._copy_all()
        finally:
            await self.drain_io()
        if self.io_error is not None and not self.is_cancelled:
            raise self.io_error

    async def _skip_unallocated(self) -> None:
        """The clusters the source itself does not hold are not copied."""
        offset = 0
        while offset < self.size and not self.is_cancelled:
            await self.pause_point()
            status = await layer_status(self.source, offset, self.size - offset)
            if status is None or status.length <= 0:
                break
            if not status.allocated:
                self.copy_bitmap.reset_range(offset, status.length)
                self.progress_set_remaining(self.copy_bitmap.count())
            offset += status.length

    async def _copy_all(self) -> None:
        while not self.is_cancelled and self.io_error is None:
            issued = False
            while len(self.tasks) < WORKERS and self._issue():
                issued = True
                if self.speed:
                    break
            if not self.tasks and not self.copy_bitmap.count():
                return
            if self.speed and issued:
                await self.ratelimit_sleep()
            elif self.tasks:
                await self.yield_()  # a copy task's end wakes the job
            else:
                # What is left is being copied before guest writes.
                await self.sleep(0.001)

    def _issue(self) -> bool:
        bits, c = self.copy_bitmap.bits, self.cluster
        granules = self.copy_bitmap.granules
        k = next_dirty(bits, self._cursor, granules)
        while k is not None and self.locks.busy(k * c, (k + 1) * c) is not None:
            k = next_dirty(bits, k + 1, granules)
        if k is None:
            self._cursor = 0
            return False
        end = k + 1
        limit = min(granules, k + MAX_CHUNK // c)
        while end < limit and bits[end >> 3] >> (end & 7) & 1 \
                and self.locks.busy(end * c, (end + 1) * c) is None:
            end += 1
        self._cursor = end
        start, stop = k * c, min(end * c, self.size)
        token = self.locks.take(start, stop)
        task = asyncio.get_running_loop().create_task(self._task(start, stop, token))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        self.ratelimit_processed(stop - start)
        return True

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.enter()

    async def _task(self, start: int, stop: int, token: int) -> None:
        try:
            await self._copy_locked(start, stop)
        except _CopyError as failed:
            is_read, exc = failed.is_read, failed.error
            on_error = self.on_source_error if is_read else self.on_target_error
            if self.error_action(on_error, is_read, _errno(exc)) == "report" \
                    and self.io_error is None:
                self.io_error = exc
        finally:
            self.locks.release(token)

    async def _copy_locked(self, start: int, stop: int) -> None:
        """Copy the dirty clusters of ``[start, stop)`` (the caller holds the range)."""
        c = self.cluster
        pos = start
        while pos < stop:
            if not self.copy_bitmap.get(pos):
                pos += c
                continue
            end = pos + c
            while end < stop and self.copy_bitmap.get(end):
                end += c
            end = min(end, stop)
            await self._copy_run(pos, end)
            pos = end

    async def _copy_run(self, start: int, end: int) -> None:
        pos = start
        while pos < end:
            is_read = True
            try:
                status = await block_status_above(self.source, pos, end - pos)
                n = status.length if status.length > 0 else end - pos
                if self.sync == "top" and status.depth > 0 and status.allocated:
                    n = min(n, end - pos)
                    self._done(pos, n, copied=False)
                    pos += n
                    continue
                if not status.data and status.zero:
                    is_read = False
                    await self.target.write_zeroes(pos, n, may_unmap=True)
                else:
                    # Through a reused buffer, a MiB at a time (after a failed
                    # read the buffer is dropped: the read may still fill it).
                    n = min(n, end - pos)
                    buf = self.buffers.take()
                    done = 0
                    while done < n:
                        part = buf[:min(MAX_CHUNK, n - done)]
                        is_read = True
                        await self.source.read_into(pos + done, part)
                        is_read = False
                        await self.target.write_view(pos + done, part)
                        done += len(part)
                    self.buffers.give(buf)
            except (QMPError, OSError) as exc:
                raise _CopyError(as_qmp_error(exc), is_read) from exc
            self._done(pos, n, copied=True)
            pos += n

    def _done(self, pos: int, n: int, copied: bool) -> None:
        c = self.cluster
        first = pos // c * c
        last = min(-(-(pos + n) // c) * c, self.size)
        self.copy_bitmap.reset_range(first, last - first)
        if copied:
            self.progress_update(n)
        else:
            self.progress_set_remaining(self.copy_bitmap.count())

    async def copy_range(self, offset: int, length: int) -> None:
        """Copy-before-write: the clusters ``[offset, offset + length)`` touches,
        unless copied already (a guest write waits for this)."""
        c = self.cluster
        start = offset // c * c
        stop = min(-(-(offset + length) // c) * c, self.size)
        if start >= stop:
            return
        first = next_dirty(self.copy_bitmap.bits, start // c, self.copy_bitmap.granules)
        if first is None or first * c >= stop:
            return
        token = await self.locks.lock(start, stop)
        try:
            await self._copy_locked(start, stop)
        except _CopyError as failed:
            raise failed.error from None
        finally:
            self.locks.release(token)


class _CopyError(Exception):
    """A copy failed, reading (the source) or writing (the target)."""

    def __init__(self, error: QMPError, is_read: bool) -> None:
        super().__init__(error.desc)
        self.error = error
        self.is_read = is_read


def _errno(exc: QMPError) -> int:
    return getattr(exc, "errno", None) or errno.EIO


# --- blockdev-backup --------------------------------------------------------------------


def _bitmap_args(block: BlockLayer, source: BlockNode, args: dict[str, Any]
                 ) -> tuple[str, DirtyBitmap | None, str]:
    """do_backup_common's checks of sync, bitmap and bitmap-mode (QEMU's texts)."""
    sync = args["sync"]
    name = args.get("bitmap")
    mode = args.get("bitmap-mode")
    if sync in ("bitmap", "incremental") and name is None:
        raise GenericError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if mode is not None and mode != "on-success":
            raise GenericError("Bitmap sync mode must be 'on-success' when using sync mode "
                               "'incremental'")
        sync, mode = "bitmap", "on-success"
    bitmap = None
    if name is not None:
        bitmap = source.dirty_bitmaps.get(name)
        if bitmap is None:
            raise GenericError(f"Bitmap '{name}' could not be found")
        if mode is None:
            raise GenericError("Bitmap sync mode must be given when providing a bitmap")
        check(bitmap, ALLOW_RO)
        if sync == "none":
            raise GenericError(f"sync mode '{sync}' does not produce meaningful bitmap outputs")
        if mode == "never" and sync != "bitmap":
            raise GenericError(f"Bitmap sync mode '{mode}' has no meaningful effect when "
                               f"combined with sync mode '{sync}'")
    elif mode is not None:
        raise GenericError("Cannot specify bitmap sync mode without a bitmap")
    return sync, bitmap, mode or "on-success"


class Drained:
    """QEMU's drained section on a node as the jobs holding it see it: each
    pauses (at its next pause point) until the section ends; a job created
    inside it starts paused.  blockdev-backup's actions hold one on their
    source from prepare to clean."""

    def __init__(self, manager: JobManager, node: BlockNode) -> None:
        self.manager = manager
        self.node = node
        self.open = False

    def _holders(self) -> list[BlockJob]:
        return [job for job in self.manager
                if isinstance(job, BlockJob) and not job.deferred and job.holds(self.node)]

    async def begin(self) -> None:
        key = id(self.node)
        self.manager.drains[key] = self.manager.drains.get(key, 0) + 1
        self.open = True
        running = []
        for job in self._holders():
            job.pause_count += 1
            if job.started:
                job.enter()
                running.append(job)
        for job in running:
            await _until_paused(job)

    def adopt(self, job: BlockJob) -> None:
        """A job created inside the open sections on the node."""
        job.pause_count += self.manager.drains.get(id(self.node), 0)

    def end(self) -> None:
        if not self.open:
            return
        self.open = False
        key = id(self.node)
        self.manager.drains[key] -= 1
        if not self.manager.drains[key]:
            del self.manager.drains[key]
        for job in self._holders():
            if job.pause_count > 0:
                self.manager.resume_internal(job)


async def _until_paused(job: BlockJob) -> None:
    for _ in range(1000):
        if job.paused or job.deferred or not job.started:
            return
        await asyncio.sleep(0)


async def prepare_blockdev_backup(manager: JobManager, block: BlockLayer,
                                  args: dict[str, Any], txn: JobTxn | None = None
                                  ) -> tuple[Drained, BackupJob]:
    """blockdev_backup_prepare: a drained section on the source, and the job
    created (CREATED) but not started."""
    source = _lookup(block, args["device"])
    target = _lookup(block, args["target"])
    drained = Drained(manager, source)
    await drained.begin()
    try:
        job = await _create(manager, block, source, target, args, txn)
    except BaseException:
        drained.end()
        raise
    return drained, job


def _lookup(block: BlockLayer, name: str) -> BlockNode:
    node = block.graph.lookup(name)
    if node is None:
        raise GenericError(f"Cannot find device='{name}' nor node-name='{name}'")
    return node


async def _create(manager: JobManager, block: BlockLayer, source: BlockNode,
                  target: BlockNode, args: dict[str, Any], txn: JobTxn | None) -> BackupJob:
    """do_backup_common and backup_job_create."""
    sync, bitmap, mode = _bitmap_args(block, source, args)
    if source is target:
        raise GenericError("Source and target cannot be the same")
    if args.get("compress", False):
        raise GenericError("Compression is not supported for this drive "
                           f"{target.node_name}")
    if "filter-node-name" in args:
        raise GenericError("Parameter 'filter-node-name' is not supported by qmpd")
    if sync == "top" and source.backing is None:
        sync = "full"
    if target.size() != source.size():
        raise GenericError("Source and target image have different sizes")
    if bitmap is not None and mode != "never":
        check(bitmap, DEFAULT)
    job = BackupJob(
        args.get("job-id", ""), block, source, target, sync=sync, bitmap=bitmap,
        bitmap_mode=mode, on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True))
    await create_block_job(manager, job, args.get("speed", 0), txn)
    try:
        await job.hold_nodes()
    except BaseException:
        await manager.early_fail(job)
        raise
    Drained(manager, source).adopt(job)
    job.install()
    # Writes that started before the filter copied no old data: the backup's
    # point in time comes after them (QEMU drains the source).
    await source.drain_plain_writes()
    return job


async def start_paused(manager: JobManager, job: BackupJob) -> None:
    """job_start inside the drained section: the job runs to its first pause point."""
    manager.start(job)
    await _until_paused(job)


async def start_blockdev_backup(manager: JobManager, block: BlockLayer,
                                args: dict[str, Any]) -> None:
    """blockdev-backup: a transaction of one action."""
    drained, job = await prepare_blockdev_backup(manager, block, args)
    try:
        await start_paused(manager, job)
    finally:
        drained.end()


#: A transaction action's commit, abort and clean.
Step = Callable[[], Awaitable[None]]


async def backup_action(manager: JobManager, block: BlockLayer, data: dict[str, Any],
                        txn: JobTxn | None) -> tuple[Step, Step, Step]:
    """transaction's blockdev-backup: the job is created now, started at commit,
    cancelled on abort; the drained section ends at clean."""
    drained, job = await prepare_blockdev_backup(manager, block, data, txn)

    async def commit() -> None:
        await start_paused(manager, job)

    async def abort() -> None:
        if job.status.value == "created":
            await manager.cancel(job, True)

    async def clean() -> None:
        drained.end()

    return commit, abort, clean
