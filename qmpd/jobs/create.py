"""``blockdev-create``: a job of type ``create`` (QEMU 7.2's block/create.c).

The job is never dismissed on its own: it stays ``concluded`` until
``job-dismiss``.  Its progress goes from 0/1 to 1/1 whatever the outcome.
Every refusal of the options themselves (QEMU's option checks, a missing
node, a read-only one) fails the job, never the command.

``file`` creates a file (:mod:`qmpd.block.file_create`).  ``qcow2`` formats
a node: the node named by ``file`` (or opened from inline options for the
job's lifetime) is held with write and resize permissions as QEMU's
anonymous BlockBackend holds it, and the image is written through that
node's driver (:mod:`qmpd.block.qcow2.create` says what to write where).
The graph changes (opening, holding, releasing) happen under the graph lock,
in the command and in :meth:`CreateJob.clean`; ``run`` only does I/O.

What QEMU does before the job first yields (every option check, a node
lookup, opening the new file) is done in the command: a failure there ends
the job before the command's reply, as in QEMU.  Later failures (an inline
node's open, the truncation steps) come after the reply.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpd.block.core import BlockLayer
from qmpd.block.driver import PERM_ALL, BdrvChild, BlockNode, ChildRole, NodeUser, Perm
from qmpd.block.reloads import reloaded
from qmpd.errors import GenericError, QMPError
from qmpd.jobs.job import Job
from qmpd.jobs.manager import JobManager

# The creation code (and with it the qcow2 package) is imported by the first
# blockdev-create, not at start-up: the drivers load on a worker thread then.
if TYPE_CHECKING:
    from qmpd.block.locking import ImageLock
    from qmpd.block.qcow2.create import Layout, Qcow2Options
    from qmpd.block.qcow2.fileio import ImageFile

#: The drivers blockdev-create can create (the others are in the schema, as in QEMU's).
CREATABLE = ("file", "qcow2")

_FULL_CHUNK = 1 << 20


def _no_op() -> None:
    """A trip to an I/O thread and back."""


@dataclass(eq=False)
class ImageWriter(NodeUser):
    """QEMU's anonymous BlockBackend writing a new image: write and resize, sharing all."""

    def describe(self) -> str:
        return "an unnamed block device"

    def permissions(self, node: BlockNode) -> tuple[Perm, Perm]:
        return Perm.WRITE | Perm.RESIZE, PERM_ALL


class CreateJob(Job):
    """One ``blockdev-create``."""

    job_type = "create"

    def __init__(self, job_id: str, block: BlockLayer, options: dict[str, Any]) -> None:
        super().__init__(job_id, auto_dismiss=False)
        self.block = block
        self.options = options
        self.node: BlockNode | None = None
        self._node_is_new = False
        self._edge: BdrvChild | None = None
        #: What starting found: reported by run() where QEMU reports it.
        self._open_error: QMPError | None = None
        self._perm_error: QMPError | None = None
        self._opts: Qcow2Options | None = None
        self._file: tuple[int, ImageLock | None] | None = None

    # --- under the graph lock ---------------------------------------------------------

    async def acquire(self) -> None:
        """Open or find the node to format and hold it (qcow2 only)."""
        if self.options["driver"] != "qcow2":
            return
        try:
            self.node, self._node_is_new = await self.block.open_ref(self.options["file"])
        except QMPError as exc:
            self._open_error = exc
            return
        except OSError as exc:
            self._open_error = GenericError(str(exc))
            return
        node = self.node
        if node.read_only:
            self._perm_error = GenericError("Block node is read-only")
            return
        edge = BdrvChild("root", ChildRole(0), node,
                         user=ImageWriter(kind="create job", id=self.id, writable=True))
        try:
            await self.block.graph.add_user(edge)
        except QMPError as exc:
            self._perm_error = exc
            return
        self._edge = edge

    async def clean(self) -> None:
        if self._file is not None:  # never run
            fd, lock = self._file
            self._file = None
            if lock is not None:
                lock.release()
            os.close(fd)
        edge, self._edge = self._edge, None
        if edge is not None and edge in edge.child.parents:
            await self.block.graph.remove_user(edge)
        node, self.node = self.node, None
        if node is not None and self._node_is_new:
            await self.block.close_node(node)

    # --- the work ----------------------------------------------------------------------

    def start_sync(self) -> None:
        """What QEMU does before the job first yields: every check, the file's open.

        Raises what fails the job then (before the command's reply)."""
        from qmpd.block.file_create import DEFAULT_EXTENT_SIZE_HINT, open_new

        self.progress_set_remaining(1)
        opts = self.options
        if opts["driver"] == "file":
            self._file = open_new(opts["filename"],
                                  opts.get("extent-size-hint", DEFAULT_EXTENT_SIZE_HINT))
            return
        if isinstance(opts["file"], str):
            self._checks()

    def _checks(self) -> None:
        from qmpd.block.qcow2.create import check_options

        if self._open_error is not None:
            raise self._open_error
        self._opts = check_options(self.options)
        if self._perm_error is not None:
            raise self._perm_error

    async def run(self) -> None:
        from qmpd.block.file_create import fill

        try:
            if self.options["driver"] == "qcow2" and not isinstance(self.options["file"], str):
                # Opening an inline node does I/O in QEMU: its failures, and the
                # checks after it, come after the command's reply.
                await self.block.graph.run_io(_no_op)
                self._checks()
            if self._file is not None:
                fd, lock = self._file
                self._file = None
                opts = self.options
                await self.block.graph.run_io(fill, fd, lock, opts["size"],
                                              opts.get("preallocation", "off"),
                                              bool(opts.get("nocow", False)))
            elif self._opts is not None:
                await self._format_qcow2(self._opts)
        finally:
            self.progress_update(1)

    async def _format_qcow2(self, opts: Qcow2Options) -> None:
        from qmpd.block.qcow2.create import CreateError, check_size, plan
        from qmpd.block.qcow2.fileio import ImageFile

        assert self.node is not None
        # It writes through the driver: not while an activation reloads it.
        await reloaded(self.node)
        file = ImageFile(self.node)
        run_io = self.block.graph.run_io
        try:
            check_size(opts)
        except CreateError:
            # QEMU has written the empty image before it resizes it.
            await self._write(file, opts, await run_io(plan, dataclasses.replace(
                opts, size=0, backing_file=None, backing_format=None, preallocation="off")))
            raise
        try:
            # Replaying QEMU's allocator for a large preallocated image takes a while.
            layout = await run_io(plan, opts)
        except CreateError:
            # The backing file name is the last step: the image is there without it.
            await self._write(file, opts, await run_io(plan, dataclasses.replace(
                opts, backing_file=None, backing_format=None)))
            raise
        await self._write(file, opts, layout)

    @staticmethod
    async def _write(file: ImageFile, opts: Qcow2Options, layout: Layout) -> None:
        if opts.preallocation in ("falloc", "full"):
            for offset, length in layout.data:
                if opts.preallocation == "falloc":
                    await file.write_zeroes(offset, length)
                    continue
                for pos in range(offset, offset + length, _FULL_CHUNK):
                    await file.write(pos, bytes(min(_FULL_CHUNK, offset + length - pos)))
        for offset, data in layout.writes:
            await file.write(offset, data)
        if file.size() < layout.file_size:
            await file.truncate(layout.file_size)
        await file.sync()


async def start_blockdev_create(manager: JobManager, block: BlockLayer,
                                args: dict[str, Any]) -> None:
    """qmp_blockdev_create: a refused driver or job ID fails the command; the rest, the job."""
    options = args["options"]
    if options["driver"] not in CREATABLE:
        raise GenericError("Driver does not support blockdev-create")
    job = CreateJob(args["job-id"], block, options)
    manager.create(job)
    await job.acquire()
    manager.start(job)
    try:
        job.start_sync()
    except QMPError as exc:
        job.progress_update(1)
        await manager.fail_at_start(job, exc)
