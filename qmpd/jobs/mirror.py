"""``blockdev-mirror`` (QEMU's block/mirror.c): copy a node to another while
it is in use, then keep the copy in step until the user ends the job.

The job copies what ``sync`` selects (``full``: everything, zero areas as
zero writes; ``top``: what the source itself holds; ``none``: nothing),
tracking guest writes to the source in its own dirty bitmap through a
:class:`~qmpd.block.driver.WriteHook` on the source's write path.  When
nothing is left to copy it turns READY and keeps copying new writes.
``job-complete`` pivots (every parent of the source moves to the target),
``block-job-cancel`` of a READY job syncs finally and completes without
pivoting.  With ``copy-mode=write-blocking`` a guest write completes only
once the target has it too.

Completing quiesces the source like QEMU's drained section: from the last
check of the bitmap until the pivot, new writes wait at the hook, and go to
the target if the pivot happened meanwhile.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from qmpd.block.core import BlockLayer
from qmpd.block.dirty_bitmap import default_granularity
from qmpd.block.driver import PERM_ALL, BdrvChild, BlockNode, Perm, WriteHook
from qmpd.block.extent import HostSpan, SpanReadError
from qmpd.block.reloads import reloading
from qmpd.block.replace import replace_node
from qmpd.block.status import block_status_above, layer_status
from qmpd.errors import GenericError, QMPError
from qmpd.jobs.block_job import BlockJob, JobNodeUser, as_qmp_error
from qmpd.jobs.inflight import CopyBuffers, CountedBitmap, RangeLocks, next_dirty
from qmpd.jobs.job import JobTxn
from qmpd.jobs.manager import JobManager

#: DEFAULT_MIRROR_BUF_SIZE and MAX_IO_BYTES.
DEFAULT_BUF_SIZE = 16 << 20
MAX_IO_BYTES = 1 << 20
#: The longest copy of an unthrottled background mirror.  Each copy costs the
#: event loop about as much as a megabyte of data does, so 4 MiB copies (four
#: in flight in the default buffer, the same bytes as QEMU's sixteen) cost
#: half as much loop time as 1 MiB ones.  Between files they go as host file
#: spans, copied a cached piece at a time (4 MiB buffers read whole and then
#: written ran slower than 1 MiB ones: the written bytes had left the cache).
#: A speed limit or write-blocking mode keeps QEMU's MAX_IO_BYTES: pacing as
#: fine, guest writes as brief a wait.
BULK_IO_BYTES = 4 << 20
#: BLOCK_JOB_SLICE_TIME: how often a ready mirror looks for new writes.
READY_POLL = 0.1


class _SourceHook(WriteHook):
    """The mirror on its source's write path (QEMU's mirror_top filter)."""

    def __init__(self, job: MirrorJob) -> None:
        self.job = job
        #: Range locks of the write-blocking writes under way, by request.
        self._held: dict[tuple[int, int], list[int]] = {}

    async def before_write(self, node: BlockNode, offset: int, length: int) -> BlockNode | None:
        job = self.job
        while not job.gate.is_set():
            await job.gate.wait()
            if job.redirect is not None:
                return job.redirect
        job.write_begin()
        if job.write_blocking and job.active:
            # Held from before the source write to after the target's: no copy
            # of the range may start (and land stale on the target) meanwhile.
            token = await job.locks.lock(offset, offset + length)
            self._held.setdefault((offset, length), []).append(token)
        return None

    def _release(self, offset: int, length: int) -> bool:
        tokens = self._held.get((offset, length))
        if not tokens:
            return False
        self.job.locks.release(tokens.pop())
        if not tokens:
            del self._held[(offset, length)]
        return True

    async def after_write(self, node: BlockNode, offset: int, length: int,
                          data: bytes | None) -> None:
        job = self.job
        try:
            if (offset, length) in self._held:
                await job.active_write(offset, length, data)
            else:
                job.bitmap.set_range(offset, length)
        finally:
            self._release(offset, length)
            job.write_done()

    def write_failed(self, node: BlockNode, offset: int, length: int) -> None:
        # Part of it may have reached the image: copy the range again.
        self.job.bitmap.set_range(offset, length)
        self._release(offset, length)
        self.job.write_done()


class MirrorJob(BlockJob):
    """One blockdev-mirror."""

    job_type = "mirror"
    #: The longest unthrottled background copy (see BULK_IO_BYTES).
    bulk_io = BULK_IO_BYTES

    def __init__(self, job_id: str, block: BlockLayer, source: BlockNode, target: BlockNode,
                 *, sync: str, granularity: int, buf_size: int, on_source_error: str,
                 on_target_error: str, write_blocking: bool, replaces: BlockNode,
                 speed: int, auto_finalize: bool, auto_dismiss: bool) -> None:
        super().__init__(job_id, block.graph, speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.source = source
        self.target = target
        self.replaces = replaces
        self.sync = sync
        self.granularity = granularity
        self.buf_size = buf_size
        #: Copy lengths: unthrottled, and with a speed limit (or write-blocking).
        self.max_io = max(granularity, min(MAX_IO_BYTES if write_blocking else self.bulk_io,
                                           buf_size))
        self.paced_io = max(granularity, min(MAX_IO_BYTES, buf_size))
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.write_blocking = write_blocking
        self.bitmap = CountedBitmap("", source.size(), granularity)
        self.hook = _SourceHook(self)
        self.locks = RangeLocks()
        #: Open: guest writes pass; closed while completing (QEMU's drain).
        self.gate = asyncio.Event()
        self.gate.set()
        self.redirect: BlockNode | None = None
        self.writes_in_flight = 0
        self._writes_idle = asyncio.Event()
        self._writes_idle.set()
        self.should_complete = False
        self.synced = False
        #: Write-blocking copies guest writes itself while this holds.
        self.active = True
        self.bytes_in_flight = 0
        self._cursor = 0
        #: Copy buffers of max_io bytes, reused (QEMU's s->buf): reads fill
        #: them in place and the target is written from them, no copies.
        self._buffers = CopyBuffers(self.max_io, buf_size // self.max_io + 1)
        self.io_error: QMPError | None = None
        self.source_edge: BdrvChild | None = None
        self.target_edge: BdrvChild | None = None
        self.pivoted = False

    # --- set-up and the finishing steps ---------------------------------------------

    async def hold_nodes(self) -> None:
        """The nodes the job needs, with QEMU's permissions."""
        self.source_edge = await self.add_node(
            "source", self.source, Perm.CONSISTENT_READ,
            Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED, fronts_users=True)
        self.target_edge = await self.add_node(
            "target", self.target, Perm.WRITE, Perm.WRITE_UNCHANGED, blocks=False)
        self.source.write_hooks.append(self.hook)
        # A write that started before the hook would never mark its range.
        await self.source.drain_plain_writes()

    def complete(self) -> None:
        self.should_complete = True
        self.enter()

    def cancel(self, force: bool) -> bool:
        # A ready mirror's soft cancel is its last sync (job->force_cancel stays off).
        return force or not self.ready

    async def prepare(self) -> None:
        """mirror_exit_common's pivot: the source's parents go to the target."""
        if not self.should_complete or self.is_cancelled:
            return
        assert self.target_edge is not None
        user = self.target_edge.user
        assert isinstance(user, JobNodeUser)
        # The job lets go of the target first (blk_set_perm(s->target, 0, ALL)).
        user.perm = Perm.NONE
        user.shared = PERM_ALL
        await self.graph.refresh_perms(self.target)
        keep = list(self.edges)
        await replace_node(self.graph, self.replaces, self.target, keep)
        self.pivoted = True
        self.redirect = self.target

    async def clean(self) -> None:
        if self.hook in self.source.write_hooks:
            self.source.write_hooks.remove(self.hook)
        self.gate.set()
        await super().clean()

    # --- the work --------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self.drain_io()
            if not self.gate.is_set() and not (self.should_complete and not self.is_cancelled
                                               and self.io_error is None):
                self.gate.set()

    async def _run(self) -> None:
        size = self.source.size()
        await self.check_target(size)
        if size == 0:
            self.synced = True
            self.transition_to_ready()
            while not self.cancel_requested and not self.should_complete:
                await self.yield_()
            return
        await self._dirty_init(size)
        if self.is_cancelled:
            return
        while True:
            if self.io_error is not None:
                raise self.io_error
            count = self.bitmap.count()
            self.progress_set_remaining(self.bytes_in_flight + count)
            if count and self.bytes_in_flight < self.buf_size and self._issue():
                if self.speed:
                    await self.ratelimit_sleep()
                elif self.bytes_in_flight < self.buf_size:
                    await self.pause_point()
                else:
                    await self.yield_()
                if self.is_cancelled:
                    return
                continue
            should_complete = False
            if not self.tasks and not count:
                if not self.synced:
                    await self._flush_target()
                    if self.io_error is not None:
                        continue
                    self.transition_to_ready()
                    self.synced = True
                should_complete = self.should_complete or self.cancel_requested
            if not count and should_complete and await self._quiesce():
                return
            if self.is_cancelled:
                return
            if self.tasks:
                await self.yield_()
            else:
                await self.sleep(READY_POLL if self.synced and not count else 0)
            if self.is_cancelled:
                return

    async def check_target(self, size: int) -> None:
        """mirror_run's size check (an active commit grows its base instead)."""
        if self.target.size() != size:
            raise GenericError("Source and target image have different sizes")

    async def _quiesce(self) -> bool:
        """Close the gate and wait for the writes under way; True when nothing is
        left to copy and the target is flushed (the gate stays closed)."""
        self.gate.clear()
        await self._writes_idle.wait()
        if self.bitmap.count() or self.tasks:
            self.gate.set()
            return False
        await self._flush_target()
        if self.io_error is not None or self.bitmap.count():
            self.gate.set()
            return False
        return True

    async def _flush_target(self) -> None:
        try:
            await self.target.flush()
        except (QMPError, OSError) as err:
            exc = as_qmp_error(err)
            if self.error_action(self.on_target_error, False, _errno(exc)) == "report":
                self.io_error = exc

    async def _dirty_init(self, size: int) -> None:
        """mirror_dirty_init: what the bulk phase copies."""
        if self.sync == "full":
            self.bitmap.set_all()
            return
        if self.sync == "none":
            return
        offset = 0
        while offset < size:
            await self.pause_point()
            if self.is_cancelled:
                return
            status = await layer_status(self.source, offset, size - offset)
            if status is None or status.length <= 0:
                break
            if status.allocated:
                self.bitmap.set_range(offset, status.length)
            offset += status.length

    # --- copying -----------------------------------------------------------------------

    def _issue(self) -> bool:
        """Start copying the next dirty run not in flight (mirror_iteration);
        False when every dirty granule is in flight already."""
        bitmap, g = self.bitmap, self.granularity
        granules = bitmap.granules
        k = next_dirty(bitmap.bits, self._cursor, granules)
        if k is None:
            k = next_dirty(bitmap.bits, 0, granules)
        tried = 0
        while k is not None and self.locks.busy(k * g, (k + 1) * g) is not None:
            tried += 1
            if tried > granules:
                return False
            k = next_dirty(bitmap.bits, k + 1, granules)
            if k is None:
                return False
        if k is None:
            return False
        end = k + 1
        limit = min(granules, k + max(1, (self.paced_io if self.speed else self.max_io) // g))
        # Granule k is free, so no held range overlaps it: the first busy
        # granule after it is where the next held range begins.
        held = self.locks.next_start(end * g)
        if held is not None:
            limit = min(limit, held // g)
        bits = bitmap.bits
        while end < limit and bits[end >> 3] >> (end & 7) & 1:
            end += 1
        start, stop = k * g, min(end * g, bitmap.size)
        self._cursor = end if end < granules else 0
        token = self.locks.take(start, stop)
        bitmap.reset_range(start, stop - start)
        self.bytes_in_flight += stop - start
        task = asyncio.get_running_loop().create_task(self._copy(start, stop - start, token))
        self.tasks.add(task)
        task.add_done_callback(self._op_done)
        self.ratelimit_processed(stop - start)
        return True

    def _op_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.enter()

    async def _copy(self, offset: int, length: int, token: int) -> None:
        buf: memoryview | None = None
        done = False  # False: cancelled mid-request, whose I/O may still fill the buffer
        try:
            pos, end = offset, offset + length
            while pos < end:
                is_read = True
                n = 0  # unknown until the block status said
                try:
                    status = await block_status_above(self.source, pos, end - pos)
                    n = min(status.length, end - pos) if status.length > 0 else end - pos
                    if not status.data and status.zero:
                        is_read = False
                        await self.target.write_zeroes(pos, n, may_unmap=True)
                    else:
                        if buf is None:
                            buf = self._buffers.take()
                        part = buf[pos - offset : pos - offset + n]
                        span = self._span(pos, part)
                        if span is not None:
                            is_read = False  # unless the error is a SpanReadError
                            await self.target.write_span(pos, span)
                        else:
                            await self.source.read_into(pos, part)
                            is_read = False
                            await self.target.write_view(pos, part)
                except (QMPError, OSError) as err:
                    is_read = is_read or isinstance(err, SpanReadError)
                    exc = as_qmp_error(err)
                    # A part of a failed read may still be under way: drop the buffer
                    # (the other parts use other bytes of it).
                    buf = None
                    failed = n or end - pos
                    self.bitmap.set_range(pos, failed)
                    on_error = self.on_source_error if is_read else self.on_target_error
                    if self.error_action(on_error, is_read, _errno(exc)) == "report":
                        if self.io_error is None:
                            self.io_error = exc
                    if not n:
                        break
                    # Each extent is an operation of its own in QEMU (mirror_perform):
                    # the next one is tried, and reports its own error.
                    pos += n
                    continue
                self.progress_update(n)
                pos += n
            done = True
        finally:
            self.bytes_in_flight -= length
            self.locks.release(token)
            if done and buf is not None:
                self._buffers.give(buf)


    def _span(self, pos: int, part: memoryview) -> HostSpan | None:
        """The source's bytes for ``part`` as a host file span, where it stores
        them unchanged in a file (:mod:`qmpd.block.extent`); counted as a read."""
        source, n = self.source, part.nbytes
        # Not mapped through tables an activation may be reloading: read
        # through the nodes instead (an activation holds every node it
        # reloads, and the read waits for the source's).
        if reloading(source):
            return None
        host = source.driver.host_file(pos, n)
        if host is None:
            return None
        source.stats.rd_bytes += n
        source.stats.rd_operations += 1
        return HostSpan(host[0], host[1], n, part)

    # --- guest writes (through the hook) --------------------------------------------------

    async def active_write(self, offset: int, length: int, data: bytes | None) -> None:
        """do_sync_target_write: the guest write goes to the target before it
        completes; the granules it covers whole are in sync then.  The
        caller holds the range."""
        self.progress_increase_remaining(length)
        g = self.granularity
        first, last = -(-offset // g) * g, (offset + length) // g * g
        if last > first:
            self.bitmap.reset_range(first, last - first)
        try:
            if data is None:
                await self.target.write_zeroes(offset, length, may_unmap=True)
            else:
                await self.target.write(offset, data)
        except (QMPError, OSError) as err:
            exc = as_qmp_error(err)
            self.bitmap.set_range(offset, length)
            if self.error_action(self.on_target_error, False, _errno(exc)) == "report":
                if self.io_error is None:
                    self.io_error = exc
                self.enter()
            return
        self.progress_update(length)

    def write_begin(self) -> None:
        self.writes_in_flight += 1
        self._writes_idle.clear()

    def write_done(self) -> None:
        self.writes_in_flight -= 1
        if self.writes_in_flight == 0:
            self._writes_idle.set()
        else:
            self._writes_idle.clear()


def _errno(exc: QMPError) -> int:
    return getattr(exc, "errno", None) or errno.EIO


# --- blockdev-mirror -------------------------------------------------------------------------


def root_node(block: BlockLayer, name: str) -> BlockNode:
    """qmp_get_root_bs."""
    node = block.graph.lookup(name)
    if node is None:
        raise GenericError(f"Cannot find device='{name}' nor node-name='{name}'")
    # A job's filter (fronting the node's users) is a node parent in QEMU.
    if any(edge.parent is not None or (edge.user is not None and edge.user.fronts_users)
           for edge in node.parents):
        raise GenericError("Need a root block node")
    return node


async def start_blockdev_mirror(manager: JobManager, block: BlockLayer,
                                args: dict[str, Any], txn: JobTxn | None = None) -> None:
    """qmp_blockdev_mirror (blockdev_mirror_common, mirror_start_job)."""
    source = root_node(block, args["device"])
    target_name = args["target"]
    target = block.graph.lookup(target_name)
    if target is None:
        raise GenericError(f"Cannot find device='{target_name}' nor node-name='{target_name}'")
    sync = args["sync"]
    if sync == "top" and source.backing is None:
        sync = "full"
    replaces = source
    if "replaces" in args:
        name = args["replaces"]
        found = block.graph.lookup(name)
        if found is None:
            raise GenericError(f"Failed to find node with node-name='{name}'")
        if found is not source:
            raise GenericError(
                f"Cannot replace '{name}' by a node mirrored from '{source.node_name}', because "
                "it cannot be guaranteed that doing so would not lead to an abrupt change of "
                "visible data")
        if found.size() != target.size():
            raise GenericError(f"Replacing node ('{name}') and target "
                               f"('{target.node_name}') must have the same size")
    if "filter-node-name" in args:
        raise GenericError("Parameter 'filter-node-name' is not supported by qmpd")
    if sync in ("incremental", "bitmap"):
        raise GenericError(f"Sync mode '{sync}' not supported")
    granularity = args.get("granularity", 0)
    if granularity and not 512 <= granularity <= 64 << 20:
        raise GenericError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise GenericError("Parameter 'granularity' expects a power of 2")
    buf_size = args.get("buf-size", 0)
    if buf_size < 0:
        raise GenericError("Invalid parameter 'buf-size'")
    if source is target:
        raise GenericError("Can't mirror node into itself")
    if not granularity:
        granularity = default_granularity(target.driver.cluster_size())
    job = MirrorJob(
        args.get("job-id", ""), block, source, target, sync=sync, granularity=granularity,
        buf_size=buf_size or DEFAULT_BUF_SIZE,
        on_source_error=args.get("on-source-error", "report"),
        on_target_error=args.get("on-target-error", "report"),
        write_blocking=args.get("copy-mode", "background") == "write-blocking",
        replaces=replaces, speed=0,
        auto_finalize=args.get("auto-finalize", True),
        auto_dismiss=args.get("auto-dismiss", True))
    await create_block_job(manager, job, args.get("speed", 0), txn)
    try:
        await job.hold_nodes()
    except BaseException:
        await manager.early_fail(job)
        raise
    manager.start(job)


async def create_block_job(manager: JobManager, job: BlockJob, speed: int,
                           txn: JobTxn | None) -> None:
    """block_job_create's order: the job exists (CREATED), then its speed is set."""
    manager.create(job, txn)
    if speed < 0:
        await manager.early_fail(job)
        raise GenericError("Parameter 'speed' expects a non-negative value")
    job.set_speed(speed)
