"""Every job, its task, and the finishing steps of job.c (waiting, pending, finalize,
conclude, dismiss), in QEMU's order.

The manager owns the job tasks.  The finishing steps change the graph (a
mirror's pivot, a commit's backing change), so they run under the graph
lock: a job's own task takes it when ``run`` returns, and the user verbs
(``job-cancel``, ``job-finalize``, ``job-dismiss``...) are commands that
already hold it.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from qmpd.errors import GenericError, QMPError
from qmpd.jobs.job import Emit, Job, JobTxn
from qmpd.jobs.state import JobStatus, JobVerb, check_verb

log = logging.getLogger(__name__)

T = TypeVar("T")
Serialise = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]

_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


def id_wellformed(job_id: str) -> bool:
    """QEMU's id_wellformed: a letter, then letters, digits, '-', '.', '_'."""
    return _ID.match(job_id) is not None


class JobManager:
    """The jobs of one daemon (QEMU's global job list), newest first."""

    def __init__(self, emit: Emit, serialise: Serialise) -> None:
        self._emit = emit
        self._serialise = serialise
        self._jobs: list[Job] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._task_of: dict[Job, asyncio.Task[None]] = {}
        self._closed = False
        #: Drained sections open on each node (by id): jobs holding it stay paused.
        self.drains: dict[int, int] = {}

    # --- lookup -------------------------------------------------------------------

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs))

    def get(self, job_id: str) -> Job | None:
        for job in self._jobs:
            if job.id == job_id:
                return job
        return None

    def find(self, job_id: str) -> Job:
        """job-qmp.c's find_job."""
        job = self.get(job_id)
        if job is None:
            raise GenericError("Job not found")
        return job

    def query(self) -> list[dict[str, Any]]:
        return [job.info() for job in self._jobs]

    # --- creation -------------------------------------------------------------------

    def check_id(self, job_id: str | None) -> str:
        """job_create's checks of an ID, QEMU's texts."""
        if job_id is None:
            raise GenericError("An explicit job ID is required")
        if not id_wellformed(job_id):
            raise GenericError(f"Invalid job ID '{job_id}'")
        if self.get(job_id) is not None:
            raise GenericError(f"Job ID '{job_id}' already in use")
        return job_id

    def create(self, job: Job, txn: JobTxn | None = None) -> None:
        """Register a new job (CREATED); :meth:`start` sets it going."""
        if self._closed:
            raise GenericError("qmpd is shutting down")
        self.check_id(job.id)
        job.emit = self._emit
        job.run_done = asyncio.get_running_loop().create_future()
        self._jobs.insert(0, job)
        job.transition(JobStatus.CREATED)
        if txn is None:
            txn = JobTxn()
        txn.jobs.insert(0, job)
        job.txn = txn

    async def early_fail(self, job: Job) -> None:
        """job_early_fail: a job that failed to set up before it started goes away
        (created, then null), leaving its transaction; what it holds is released."""
        assert job.status is JobStatus.CREATED
        if job.txn is not None:
            job.txn.jobs.remove(job)
            job.txn = None
        try:
            await job.clean()
        finally:
            self._dismiss(job)

    def start(self, job: Job) -> None:
        """job_start: RUNNING, and its task."""
        job.pause_count -= 1
        job.busy = True
        job.paused = False
        job.started = True
        job.transition(JobStatus.RUNNING)
        task = asyncio.get_running_loop().create_task(self._body(job), name=f"job {job.id}")
        self._tasks.add(task)
        self._task_of[job] = task
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _t: self._task_of.pop(job, None))

    async def fail_at_start(self, job: Job, exc: QMPError) -> None:
        """``job`` failed before its first yield: finish it now, in the command that
        started it (which holds the graph lock).

        QEMU's job_start runs the job's coroutine at once; a job that fails
        before it first yields has its job_exit bottom half run before the
        command's reply is sent: aborting and concluded come before the reply.
        """
        job.fail(exc.desc, getattr(exc, "errno", None) or errno.EIO)
        self._run_done(job)
        await self._completed_once(job)

    async def _body(self, job: Job) -> None:
        if job.deferred:  # failed at start (fail_at_start)
            return
        try:
            await job.pause_point()
            await job.run()
        except QMPError as exc:
            job.fail(exc.desc, getattr(exc, "errno", None) or errno.EIO)
        except OSError as exc:
            # An I/O error a job did not handle: it fails with the errno's text,
            # as QEMU's jobs do (job->ret), not as a bug.
            err = exc.errno or errno.EIO
            job.fail(os.strerror(err), err)
        except asyncio.CancelledError:
            # Only close() cancels a job's task (one that ignored its cancel):
            # the job still finishes, so that it lets go of its nodes.
            job.fail("Operation canceled", errno.ECANCELED)
        except Exception as exc:  # a bug: the job fails, the daemon stays up
            log.exception("job %s failed", job.id)
            job.fail(str(exc) or type(exc).__name__)
        self._run_done(job)
        try:
            await self._serialise(lambda: self._completed_once(job))
        except QMPError:
            log.warning("job %s: finishing refused (shutting down)", job.id)

    @staticmethod
    def _run_done(job: Job) -> None:
        job.deferred = True
        job.busy = False
        if job.run_done is not None and not job.run_done.done():
            job.run_done.set_result(None)

    async def _completed_once(self, job: Job) -> None:
        if not job.finishing:
            await self._completed(job)

    # --- the finishing steps (under the graph lock) -----------------------------------

    async def _completed(self, job: Job) -> None:
        """job_completed."""
        job.finishing = True
        if job.update_rc():
            await self._txn_abort(job)
        else:
            await self._txn_success(job)

    async def _txn_success(self, job: Job) -> None:
        assert job.txn is not None
        job.transition(JobStatus.WAITING)
        txn = job.txn
        if any(not other.completed for other in txn.jobs):
            return
        for other in list(txn.jobs):
            other.transition(JobStatus.PENDING)
            if not other.auto_finalize:
                other.on_pending()
        if all(other.auto_finalize for other in txn.jobs):
            await self._do_finalize(job)

    async def _do_finalize(self, job: Job) -> None:
        assert job.txn is not None
        txn = job.txn
        for other in list(txn.jobs):
            if not other.ret:
                try:
                    await other.prepare()
                except QMPError as exc:
                    other.fail(exc.desc, getattr(exc, "errno", None) or errno.EIO)
            if other.update_rc():
                await self._txn_abort(other)
                return
        for other in list(txn.jobs):
            await self._finalize_single(other)

    async def _finalize_single(self, job: Job) -> None:
        job.finishing = True
        job.update_rc()
        try:
            if job.ret:
                await job.abort()
            else:
                await job.commit()
        finally:
            try:
                await job.clean()
            finally:
                if job.started:
                    if job.is_cancelled:
                        job.on_cancelled()
                    else:
                        job.on_completed()
                if job.txn is not None:
                    job.txn.jobs.remove(job)
                    job.txn = None
                self._conclude(job)

    def _conclude(self, job: Job) -> None:
        job.transition(JobStatus.CONCLUDED)
        if job.auto_dismiss or not job.started:
            self._dismiss(job)

    def _dismiss(self, job: Job) -> None:
        job.busy = False
        job.paused = False
        job.transition(JobStatus.NULL)
        if job in self._jobs:
            self._jobs.remove(job)

    async def _txn_abort(self, job: Job) -> None:
        """job_completed_txn_abort: every other job of the transaction is cancelled."""
        txn = job.txn
        assert txn is not None
        if txn.aborting:
            return
        txn.aborting = True
        for other in txn.jobs:
            other.finishing = True
            if other is not job:  # force-cancelled, as QEMU does since 6.2
                self._cancel_async(other, force=True)
        while txn.jobs:
            other = txn.jobs[0]
            if not other.completed:
                assert other.cancel_requested
                other.enter()
                if other.started and other.run_done is not None:
                    await asyncio.shield(other.run_done)
                other.update_rc()
                if not other.completed:  # never started: no ret of its own yet
                    other.fail("Operation canceled", errno.ECANCELED)
                    other.update_rc()
            await self._finalize_single(other)

    def _cancel_async(self, job: Job, force: bool) -> None:
        force = job.cancel(force)
        if job.user_paused:
            job.on_user_resume()
            job.user_paused = False
            job.pause_count -= 1
        # A soft cancel of a job whose work is done changes nothing.
        if not job.deferred or force:
            job.cancelled = True
            job.force_cancel |= force

    # --- user verbs (commands hold the graph lock) -------------------------------------

    async def cancel(self, job: Job, force: bool) -> None:
        """job_user_cancel."""
        check_verb(job.id, job.status, JobVerb.CANCEL)
        await self._cancel(job, force)

    async def _cancel(self, job: Job, force: bool) -> None:
        if job.status is JobStatus.CONCLUDED:
            self._dismiss(job)
            return
        self._cancel_async(job, force)
        if not job.started:
            await self._completed(job)
        elif job.deferred:
            if job.is_cancelled and not job.finishing:
                await self._completed(job)
            elif job.is_cancelled:
                await self._txn_abort(job)
        else:
            job.enter()

    def pause(self, job: Job) -> None:
        """job_user_pause."""
        check_verb(job.id, job.status, JobVerb.PAUSE)
        if job.user_paused:
            raise GenericError("Job is already paused")
        job.user_paused = True
        job.pause_count += 1
        if not job.paused:
            job.enter()

    def resume(self, job: Job) -> None:
        """job_user_resume."""
        if not job.user_paused or job.pause_count <= 0:
            raise GenericError("Can't resume a job that was not paused")
        check_verb(job.id, job.status, JobVerb.RESUME)
        job.on_user_resume()
        job.user_paused = False
        self.resume_internal(job)

    @staticmethod
    def resume_internal(job: Job) -> None:
        job.pause_count -= 1
        if job.pause_count == 0 and not job.sleeping_on_timer:
            job.enter()

    def complete(self, job: Job) -> None:
        """job_complete."""
        check_verb(job.id, job.status, JobVerb.COMPLETE)
        if job.cancel_requested or not job.completable:
            raise GenericError(f"The active block job '{job.id}' cannot be completed")
        job.complete()

    async def finalize(self, job: Job) -> None:
        """job_finalize."""
        check_verb(job.id, job.status, JobVerb.FINALIZE)
        await self._do_finalize(job)

    def dismiss(self, job: Job) -> None:
        """job_dismiss."""
        check_verb(job.id, job.status, JobVerb.DISMISS)
        self._dismiss(job)

    def set_speed(self, job: Job, speed: int) -> None:
        check_verb(job.id, job.status, JobVerb.SET_SPEED)
        job.set_speed(speed)

    # --- shutdown -----------------------------------------------------------------------

    async def close(self, timeout: float = 30.0) -> None:
        """job_cancel_sync_all: newest first, each job force-cancelled and waited
        for, then dismissed (a concluded job is only dismissed), as QEMU does at exit;
        a job still running after ``timeout`` seconds has its task cancelled."""
        self._closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        tries: dict[int, int] = {}
        while self._jobs:
            job = self._jobs[0]
            tries[id(job)] = tries.get(id(job), 0) + 1
            if tries[id(job)] > 3:  # a job that cannot finish: let it go
                log.warning("job %s: not finished at shutdown (%s)", job.id, job.status.value)
                self._jobs.remove(job)
                continue
            try:
                await self._serialise(functools.partial(self._cancel, job, True))
            except QMPError:
                log.warning("job %s: cancel at shutdown refused", job.id)
                self._jobs.remove(job)
                continue
            task = self._task_of.get(job)
            if task is not None and not task.done():
                _done, pending = await asyncio.wait([task],
                                                    timeout=max(0.0, deadline - loop.time()))
                if pending:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks),
                                                timeout=max(0.0, deadline - loop.time()))
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
