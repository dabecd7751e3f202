"""Block jobs (QEMU's blockjob.c): jobs on nodes, with a speed, an I/O error policy,
the nodes they hold, and the BLOCK_JOB_* events.

A block job holds each node it works on through a :class:`JobNodeUser`
edge: the permissions it needs and shares, and the blocker text that
``blockdev-del`` reports while the job runs.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass
from typing import Any

from qmpd.block.driver import PERM_ALL, BdrvChild, BlockNode, ChildRole, NodeUser, Perm
from qmpd.block.graph import BlockGraph
from qmpd.errors import BlockDriverError, GenericError, QMPError
from qmpd.jobs.job import Job

#: BLOCK_JOB_SLICE_TIME: the rate limit's accounting slice.
SLICE = 0.1


class RateLimit:
    """QEMU's ratelimit.h: a byte quota per slice; excess pushes the slice's end out."""

    def __init__(self) -> None:
        self.slice_quota = 0.0
        self.slice_ns = 0.0
        self.slice_start = 0.0
        self.slice_end = 0.0
        self.dispatched = 0

    def set_speed(self, speed: int, slice_time: float = SLICE) -> None:
        self.slice_ns = slice_time
        self.slice_quota = max(speed * slice_time, 1.0) if speed else 0.0
        if not speed:
            self.slice_ns = 0.0

    def delay(self, n: int, now: float | None = None) -> float:
        """Account ``n`` bytes; how long to wait before the next request (seconds)."""
        if not self.slice_quota and not self.slice_ns:
            return 0.0
        now = time.monotonic() if now is None else now
        if self.slice_end < now:
            self.slice_start = now
            self.slice_end = now + self.slice_ns
            self.dispatched = 0
        self.dispatched += n
        if self.dispatched < self.slice_quota:
            return 0.0
        slices = self.dispatched / self.slice_quota
        self.slice_end = self.slice_start + slices * self.slice_ns
        return self.slice_end - now


@dataclass(eq=False)
class JobNodeUser(NodeUser):
    """A job's use of one node: fixed permissions, and the job's blocker."""

    perm: Perm = Perm.NONE
    shared: Perm = PERM_ALL

    def permissions(self, node: BlockNode) -> tuple[Perm, Perm]:
        return self.perm, self.shared


#: What an I/O path raises: the block layer's errors, and the OS's (the file driver
#: lets ENOSPC and the like through as they are, as the NBD server expects).
IO_ERRORS = (BlockDriverError, OSError)


def io_errno(exc: BaseException) -> int:
    """The errno of an I/O error (EIO when it has none)."""
    return getattr(exc, "errno", None) or errno.EIO


def io_failure(exc: BaseException) -> BlockDriverError:
    """What a job fails with on an I/O error: the errno's text, as QEMU's job->ret."""
    err = io_errno(exc)
    return BlockDriverError(os.strerror(err), err)


def as_qmp_error(exc: BaseException) -> QMPError:
    """An I/O error as the block layer's (an OS error becomes its errno's text)."""
    return exc if isinstance(exc, QMPError) else io_failure(exc)


#: BlockdevOnError values.
ON_ERROR = ("report", "ignore", "enospc", "stop", "auto")


class BlockJob(Job):
    """A job on block nodes (``device`` in its events is the job ID)."""

    def __init__(self, job_id: str, graph: BlockGraph, *, speed: int = 0,
                 auto_finalize: bool = True, auto_dismiss: bool = True) -> None:
        super().__init__(job_id, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.graph = graph
        self.speed = 0
        self.limit = RateLimit()
        self.iostatus = "ok"
        self.edges: list[BdrvChild] = []
        #: Copies under way, each in its own task (mirror, backup).
        self.tasks: set[asyncio.Task[None]] = set()
        #: Bytes were copied since the last ratelimit_sleep.
        self._owed = False
        if speed:
            self._set_speed(speed)

    def io_in_flight(self) -> bool:
        return bool(self.tasks)

    async def drain_io(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    # --- nodes ----------------------------------------------------------------------

    async def add_node(self, role: str, node: BlockNode, perm: Perm, shared: Perm,
                       blocks: bool = True, fronts_users: bool = False) -> BdrvChild:
        """block_job_add_bdrv: hold ``node`` with these permissions (refused on a conflict)."""
        user = JobNodeUser(
            kind=f"{self.job_type} job", id=self.id, writable=bool(perm & Perm.WRITE),
            allow_inactive=False, perm=perm, shared=shared,
            blocker=f"block device is in use by block job: {self.job_type}" if blocks else None,
            fronts_users=fronts_users,
        )
        edge = BdrvChild(role, ChildRole(0), node, user=user)
        await self.graph.add_user(edge)
        self.edges.append(edge)
        return edge

    def holds(self, node: BlockNode) -> bool:
        return any(edge.child is node for edge in self.edges)

    async def release_nodes(self) -> None:
        """Drop every node the job holds (block_job_remove_all_bdrv)."""
        edges, self.edges = self.edges, []
        for edge in reversed(edges):
            if edge in edge.child.parents:
                await self.graph.remove_user(edge)

    async def clean(self) -> None:
        await self.release_nodes()

    # --- speed ----------------------------------------------------------------------

    def set_speed(self, speed: int) -> None:
        old = self.speed
        self._set_speed(speed)
        if speed and speed <= old:
            return
        if self.sleeping_on_timer:
            self.enter()

    def _set_speed(self, speed: int) -> None:
        if speed < 0:
            raise GenericError("Invalid parameter 'speed'")
        self.limit.set_speed(speed)
        self.speed = speed

    def ratelimit_processed(self, n: int) -> None:
        self.limit.delay(n)
        self._owed = True

    async def ratelimit_sleep(self) -> None:
        """Wait out the quota the bytes copied since the last wait used, as QEMU
        7.2's jobs sleep the delay their last copy computed: a pause or cancel
        ends the wait, and the job goes on at once until its next copy."""
        if not self._owed:
            await self.sleep(0)
            return
        self._owed = False
        while True:
            delay = self.limit.delay(0)
            pauses = self.pauses
            await self.sleep(delay)
            if not delay or self.is_cancelled or self.pauses != pauses:
                return

    # --- errors ---------------------------------------------------------------------

    def error_action(self, on_error: str, is_read: bool, err: int) -> str:
        """block_job_error_action: what to do about an I/O error; emits BLOCK_JOB_ERROR."""
        if on_error in ("enospc", "auto"):
            action = "stop" if err == errno.ENOSPC else "report"
        else:
            action = on_error
        self.emit("BLOCK_JOB_ERROR", {"device": self.id,
                                      "operation": "read" if is_read else "write",
                                      "action": action})
        if action == "stop":
            if not self.user_paused:
                self.pause_count += 1
                self.user_paused = True
            self.iostatus = "nospace" if err == errno.ENOSPC else "failed"
        return action

    def on_user_resume(self) -> None:
        self.iostatus = "ok"

    # --- events and queries -----------------------------------------------------------

    def _progress(self) -> dict[str, Any]:
        return {"type": self.job_type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed}

    def on_ready(self) -> None:
        self.emit("BLOCK_JOB_READY", self._progress())

    def on_pending(self) -> None:
        self.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def on_completed(self) -> None:
        data = self._progress()
        if self.ret < 0 and self.error is not None:
            data["error"] = self.error
        self.emit("BLOCK_JOB_COMPLETED", data)

    def on_cancelled(self) -> None:
        self.emit("BLOCK_JOB_CANCELLED", self._progress())

    def block_info(self) -> dict[str, Any]:
        """QAPI's BlockJobInfo (query-block-jobs)."""
        out: dict[str, Any] = {
            "type": self.job_type,
            "device": self.id,
            "len": self.progress_total,
            "offset": self.progress_current,
            "busy": self.busy,
            "paused": self.pause_count > 0,
            "speed": self.speed,
            "io-status": self.iostatus,
            "ready": self.ready,
            "status": self.status.value,
            "auto-finalize": self.auto_finalize,
            "auto-dismiss": self.auto_dismiss,
        }
        if self.ret:
            out["error"] = self.error if self.error is not None else "Input/output error"
        return out
