"""A job: long-running work with QEMU's life cycle (job.c).

A :class:`Job` subclass implements :meth:`Job.run` (the work) and, where it
has something to do, the finishing hooks :meth:`Job.prepare`,
:meth:`Job.commit`, :meth:`Job.abort` and :meth:`Job.clean`.  Inside
``run`` it calls :meth:`Job.pause_point` (or :meth:`Job.sleep`) often: that
is where pausing and cancelling take effect.  ``run`` fails by raising a
:class:`~qmpd.errors.QMPError`; its text becomes the job's ``error``.

``run`` must never take the graph lock: the finishing steps run under it, and
aborting a transaction waits, under it, for the other jobs' ``run`` to end.

The :class:`~qmpd.jobs.manager.JobManager` owns every job's task and drives
the finishing steps; a job only changes its own status, through
:meth:`Job.transition`, which checks the transition table and emits
``JOB_STATUS_CHANGE``.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from typing import Any, ClassVar

from qmpd.errors import GenericError
from qmpd.jobs.state import COMPLETED, JobStatus, check_transition

Emit = Callable[[str, dict[str, Any]], None]


class JobTxn:
    """Jobs that finish together: all succeed, or all are aborted."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False


class Job:
    """One job.  Subclasses set :attr:`job_type` and implement :meth:`run`."""

    #: QAPI's JobType.
    job_type: ClassVar[str] = ""

    def __init__(self, job_id: str, *, auto_finalize: bool = True,
                 auto_dismiss: bool = True) -> None:
        self.id = job_id
        self.status = JobStatus.UNDEFINED
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.progress_current = 0
        self.progress_total = 0
        #: A negative errno once the job failed or was cancelled (job->ret).
        self.ret = 0
        self.error: str | None = None
        self.cancelled = False
        self.force_cancel = False
        self.user_paused = False
        self.pause_count = 1
        self.busy = False
        self.paused = True
        self.started = False
        #: ``run`` has returned (job->deferred_to_main_loop).
        self.deferred = False
        #: The finishing steps are done or under way (by the job's own task or a txn abort).
        self.finishing = False
        self.txn: JobTxn | None = None
        self.emit: Emit = lambda name, data: None
        self._wake = asyncio.Event()
        self._sleep_until: float | None = None
        #: The status a pause point interrupted, while the job waits there.
        self._paused_from: JobStatus | None = None
        #: How many times the job paused.
        self.pauses = 0
        #: Waiting in :meth:`sleep` or :meth:`yield_` (a pause point follows).
        self._sleeping = False
        self.run_done: asyncio.Future[None] | None = None

    # --- what run() uses ----------------------------------------------------------

    async def run(self) -> None:
        """The work.  Raise a QMPError to fail the job."""
        raise NotImplementedError

    @property
    def is_cancelled(self) -> bool:
        """Force-cancelled: stop now (job_is_cancelled)."""
        return self.cancelled and self.force_cancel

    @property
    def cancel_requested(self) -> bool:
        """Any cancel, soft (a ready mirror's final sync) or forced."""
        return self.cancelled

    @property
    def should_pause(self) -> bool:
        return self.pause_count > 0

    def progress_update(self, done: int) -> None:
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        self.progress_total += delta

    async def pause_point(self) -> None:
        """Stop here while the job is paused (unless it is being cancelled)."""
        if self._paused_from is None:
            if not self.should_pause or self.is_cancelled:
                return
            await self.drain_io()
            self.on_pause()
            if not self.should_pause or self.is_cancelled:
                self.on_resume()
                return
            self._enter_pause()
        # (else :meth:`enter` paused the job while it slept)
        while self._paused_from is not None:
            await self._yield(None)
        self.on_resume()

    def _enter_pause(self) -> None:
        status = self.status
        self.transition(JobStatus.STANDBY if status is JobStatus.READY else JobStatus.PAUSED)
        self.paused = True
        self._paused_from = status
        self.pauses += 1

    def _leave_pause(self) -> None:
        """Back to the status the pause interrupted."""
        status, self._paused_from = self._paused_from, None
        if status is not None:
            self.paused = False
            self.busy = True
            self.transition(status)

    async def sleep(self, seconds: float) -> None:
        """Sleep (woken early by a pause, a cancel or :meth:`enter`), then a pause point."""
        if self.is_cancelled:
            return
        if not self.should_pause:
            self._sleeping = True
            try:
                await self._yield(seconds)
            finally:
                self._sleeping = False
        await self.pause_point()

    async def yield_(self) -> None:
        """Wait until something calls :meth:`enter` (job_yield)."""
        if self.is_cancelled:
            return
        if not self.should_pause:
            self._sleeping = True
            try:
                await self._yield(None)
            finally:
                self._sleeping = False
        await self.pause_point()

    def enter(self) -> None:
        """Wake the job if it waits in a yield or a sleep.

        QEMU enters the job's coroutine at once, so whoever wakes it sees what
        it does up to its next yield before the command's reply: a job that
        sleeps or waits goes into its pause point (``paused``) when it should
        pause, and a paused job that may go on leaves it (``running``).
        """
        if not self.started or self.deferred or self.busy:
            return
        if self._paused_from is not None:
            if self.should_pause and not self.cancel_requested:
                return  # still paused
            self._leave_pause()
        elif (self._sleeping and self.should_pause and not self.is_cancelled
              and not self.io_in_flight()):
            self.on_pause()
            if self.should_pause and not self.is_cancelled:
                self._enter_pause()
                self._sleep_until = None
                return  # its sleep ends in the pause point, where it waits
        self._sleep_until = None
        self._wake.set()

    async def _yield(self, seconds: float | None) -> None:
        self._wake.clear()
        self.busy = False
        if seconds is None:
            await self._wake.wait()
        else:
            self._sleep_until = time.monotonic() + seconds
            try:
                await asyncio.wait_for(self._wake.wait(), seconds)
            except TimeoutError:
                pass
        self._sleep_until = None
        self.busy = True

    @property
    def sleeping_on_timer(self) -> bool:
        return self._sleep_until is not None

    def transition_to_ready(self) -> None:
        self.transition(JobStatus.READY)
        self.on_ready()

    # --- hooks ---------------------------------------------------------------------

    async def prepare(self) -> None:
        """The first finishing step, for every job of the transaction; may fail."""

    async def commit(self) -> None:
        """Make the result take effect (the job and its transaction succeeded)."""

    async def abort(self) -> None:
        """Undo what can be undone (the job or its transaction failed)."""

    async def clean(self) -> None:
        """Release what the job holds, whatever the outcome."""

    def complete(self) -> None:
        """``job-complete`` on a ready job; only jobs with a ready phase have it."""
        raise GenericError(f"The active block job '{self.id}' cannot be completed")

    @property
    def completable(self) -> bool:
        """Whether :meth:`complete` is implemented (job->driver->complete)."""
        return type(self).complete is not Job.complete

    def cancel(self, force: bool) -> bool:
        """A cancel request arrived; return whether it is a forced one.

        By default every cancel is forced; a mirror overrides this to make
        a soft cancel of a ready job its final sync.
        """
        return True

    def io_in_flight(self) -> bool:
        """Whether I/O the job started is still under way (a pause waits for it)."""
        return False

    async def drain_io(self) -> None:
        """Wait for the job's I/O under way before it pauses (QEMU's mirror_pause),
        so the errors that I/O meets are reported before ``paused``."""

    def on_pause(self) -> None:
        """About to pause."""

    def on_resume(self) -> None:
        """Back from a pause point."""

    def on_user_resume(self) -> None:
        """A user resumed the job (a block job clears its I/O error status)."""

    def on_ready(self) -> None:
        """Just became ready (a block job emits BLOCK_JOB_READY)."""

    def on_pending(self) -> None:
        """Pending, waiting for a manual finalize (BLOCK_JOB_PENDING)."""

    def on_completed(self) -> None:
        """Finished, with or without an error (BLOCK_JOB_COMPLETED)."""

    def on_cancelled(self) -> None:
        """Finished by a forced cancel (BLOCK_JOB_CANCELLED)."""

    def set_speed(self, speed: int) -> None:
        """``block-job-set-speed``; only block jobs have a speed."""
        raise GenericError(f"Job '{self.id}' has no speed limit")

    # --- bookkeeping (the manager's) ----------------------------------------------

    @property
    def completed(self) -> bool:
        """The job's own work is over (job_is_completed)."""
        return self.status in COMPLETED

    @property
    def ready(self) -> bool:
        return self.status in (JobStatus.READY, JobStatus.STANDBY)

    def transition(self, new: JobStatus) -> None:
        old = self.status
        check_transition(old, new)
        self.status = new
        if new is not old:
            self.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": new.value})

    def update_rc(self) -> int:
        """job_update_rc: a cancelled job fails with ECANCELED; failing means ABORTING."""
        if not self.ret and self.is_cancelled:
            self.ret = -errno.ECANCELED
        if self.ret:
            if self.error is None:
                self.error = os.strerror(-self.ret)
            self.transition(JobStatus.ABORTING)
        return self.ret

    def fail(self, message: str, err: int = errno.EIO) -> None:
        if not self.ret:
            self.ret = -err
            self.error = message

    def info(self) -> dict[str, Any]:
        """QAPI's JobInfo."""
        out: dict[str, Any] = {
            "id": self.id,
            "type": self.job_type,
            "status": self.status.value,
            "current-progress": self.progress_current,
            "total-progress": self.progress_total,
        }
        if self.error is not None:
            out["error"] = self.error
        return out
