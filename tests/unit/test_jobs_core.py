"""The job core (qmpd.jobs): job.c's state machine, driven through the real manager."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from qmpd.errors import GenericError
from qmpd.jobs.block_job import RateLimit
from qmpd.jobs.job import Job, JobTxn
from qmpd.jobs.manager import JobManager, id_wellformed
from qmpd.jobs.state import TRANSITIONS, VERBS, JobStatus, JobVerb


class Harness:
    """A manager whose events are recorded, serialised by a plain lock (the graph lock's role)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = asyncio.Lock()
        self.manager = JobManager(lambda name, data: self.events.append((name, data)),
                                  self.serialise)

    async def serialise(self, op: Callable[[], Awaitable[Any]]) -> Any:
        async with self.lock:
            return await op()

    def statuses(self, job_id: str) -> list[str]:
        return [d["status"] for n, d in self.events
                if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]

    def names(self) -> list[str]:
        return [n if n != "JOB_STATUS_CHANGE" else f"{d['id']}:{d['status']}"
                for n, d in self.events]

    async def locked(self, op: Callable[[], Awaitable[Any]]) -> Any:
        return await self.serialise(op)


class Steps(Job):
    """Runs ``steps`` steps, each behind a gate the test opens; records its hooks."""

    job_type = "stream"

    def __init__(self, job_id: str, steps: int = 3, fail_at: int | None = None,
                 ready_at: int | None = None, **kw: Any) -> None:
        super().__init__(job_id, **kw)
        self.steps = steps
        self.fail_at = fail_at
        self.ready_at = ready_at
        self.gate = asyncio.Event()
        self.hooks: list[str] = []
        self.should_complete = False

    async def run(self) -> None:
        self.progress_set_remaining(self.steps)
        for step in range(self.steps):
            await self.gate.wait()
            if self.fail_at == step:
                raise GenericError(f"step {step} failed")
            self.progress_update(1)
            await self.pause_point()
            if self.is_cancelled:
                return
            if self.ready_at == step:
                self.transition_to_ready()
                while not self.should_complete and not self.cancel_requested:
                    await self.yield_()
                return

    def complete(self) -> None:
        self.should_complete = True
        self.enter()

    def cancel(self, force: bool) -> bool:
        return force or not self.ready

    async def prepare(self) -> None:
        self.hooks.append("prepare")

    async def commit(self) -> None:
        self.hooks.append("commit")

    async def abort(self) -> None:
        self.hooks.append("abort")

    async def clean(self) -> None:
        self.hooks.append("clean")

    def on_completed(self) -> None:
        self.hooks.append("COMPLETED")

    def on_cancelled(self) -> None:
        self.hooks.append("CANCELLED")

    def on_pending(self) -> None:
        self.hooks.append("PENDING")


async def settle(rounds: int = 20) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_status(job: Job, status: JobStatus) -> None:
    for _ in range(500):
        if job.status is status:
            return
        await asyncio.sleep(0.002)
    raise AssertionError(f"job {job.id} is {job.status}, not {status}")


def start(h: Harness, job: Job, txn: JobTxn | None = None) -> Job:
    h.manager.create(job, txn)
    h.manager.start(job)
    return job


def test_tables_match_job_c() -> None:
    # Spot checks of job.c's JobSTT and JobVerbTable.
    assert TRANSITIONS[JobStatus.CREATED] == {JobStatus.RUNNING, JobStatus.ABORTING,
                                              JobStatus.NULL}
    assert JobStatus.ABORTING in TRANSITIONS[JobStatus.ABORTING]
    assert VERBS[JobVerb.COMPLETE] == {JobStatus.READY}
    assert JobStatus.PENDING in VERBS[JobVerb.CANCEL]
    assert JobStatus.WAITING not in VERBS[JobVerb.PAUSE]


def test_ids() -> None:
    assert id_wellformed("job0") and id_wellformed("a.b-c_d")
    assert not id_wellformed("0job") and not id_wellformed("") and not id_wellformed("a b")


async def test_success_runs_through_every_status_in_order() -> None:
    h = Harness()
    job = start(h, Steps("j"))
    assert isinstance(job, Steps)
    job.gate.set()
    await wait_status(job, JobStatus.NULL)
    assert h.statuses("j") == ["created", "running", "waiting", "pending", "concluded", "null"]
    assert job.hooks == ["prepare", "commit", "clean", "COMPLETED"]
    assert (job.progress_current, job.progress_total) == (3, 3)
    assert h.manager.query() == []


async def test_manual_dismiss_and_verbs_in_the_wrong_state() -> None:
    h = Harness()
    job = start(h, Steps("j", auto_dismiss=False))
    with pytest.raises(GenericError, match="Job 'j' in state 'running' cannot accept command"
                                           " verb 'complete'"):
        h.manager.complete(job)
    with pytest.raises(GenericError, match="Job 'j' in state 'running' cannot accept command"
                                           " verb 'dismiss'"):
        h.manager.dismiss(job)
    assert isinstance(job, Steps)
    job.gate.set()
    await wait_status(job, JobStatus.CONCLUDED)
    assert h.manager.query() == [{"id": "j", "type": "stream", "status": "concluded",
                                  "current-progress": 3, "total-progress": 3}]
    with pytest.raises(GenericError, match="verb 'cancel'"):
        await h.manager.cancel(job, True)
    h.manager.dismiss(job)
    assert h.statuses("j")[-2:] == ["concluded", "null"]
    with pytest.raises(GenericError, match="Job not found"):
        h.manager.find("j")


async def test_failure_aborts_with_the_error() -> None:
    h = Harness()
    job = Steps("j", fail_at=1, auto_dismiss=False)
    start(h, job)
    job.gate.set()
    await wait_status(job, JobStatus.CONCLUDED)
    assert h.statuses("j") == ["created", "running", "aborting", "concluded"]
    assert job.hooks == ["abort", "clean", "COMPLETED"]
    assert h.manager.query()[0]["error"] == "step 1 failed"


async def test_forced_cancel_is_cancelled_with_ecanceled() -> None:
    h = Harness()
    job = Steps("j", auto_dismiss=False)
    start(h, job)
    await settle()
    await h.locked(lambda: h.manager.cancel(job, True))
    job.gate.set()
    await wait_status(job, JobStatus.CONCLUDED)
    assert h.statuses("j") == ["created", "running", "aborting", "concluded"]
    assert job.hooks == ["abort", "clean", "CANCELLED"]
    assert job.info()["error"] == "Operation canceled"


async def test_manual_finalize() -> None:
    h = Harness()
    job = Steps("j", auto_finalize=False)
    start(h, job)
    job.gate.set()
    await wait_status(job, JobStatus.PENDING)
    await settle()
    assert job.hooks == ["PENDING"]
    with pytest.raises(GenericError, match="state 'pending' cannot accept command verb 'dismiss'"):
        h.manager.dismiss(job)
    await h.locked(lambda: h.manager.finalize(job))
    assert job.status is JobStatus.NULL
    assert job.hooks == ["PENDING", "prepare", "commit", "clean", "COMPLETED"]


async def test_cancel_while_pending_aborts() -> None:
    h = Harness()
    job = Steps("j", auto_finalize=False, auto_dismiss=False)
    start(h, job)
    job.gate.set()
    await wait_status(job, JobStatus.PENDING)
    await h.locked(lambda: h.manager.cancel(job, True))
    assert h.statuses("j") == ["created", "running", "waiting", "pending", "aborting",
                               "concluded"]
    assert job.hooks == ["PENDING", "abort", "clean", "CANCELLED"]


async def test_pause_and_resume() -> None:
    h = Harness()
    job = Steps("j")
    start(h, job)
    await settle()
    h.manager.pause(job)
    with pytest.raises(GenericError, match="Job is already paused"):
        h.manager.pause(job)
    job.gate.set()
    await wait_status(job, JobStatus.PAUSED)
    assert job.progress_current == 1
    await settle()
    assert job.progress_current == 1  # stays at its pause point
    h.manager.resume(job)
    with pytest.raises(GenericError, match="Can't resume a job that was not paused"):
        h.manager.resume(job)
    await wait_status(job, JobStatus.NULL)
    assert h.statuses("j")[:4] == ["created", "running", "paused", "running"]


async def test_ready_standby_and_complete() -> None:
    h = Harness()
    job = Steps("j", steps=5, ready_at=0)
    start(h, job)
    job.gate.set()
    await wait_status(job, JobStatus.READY)
    h.manager.pause(job)
    await wait_status(job, JobStatus.STANDBY)
    h.manager.resume(job)
    await wait_status(job, JobStatus.READY)
    h.manager.complete(job)
    await wait_status(job, JobStatus.NULL)
    assert h.statuses("j") == ["created", "running", "ready", "standby", "ready", "waiting",
                               "pending", "concluded", "null"]
    assert job.hooks[-1] == "COMPLETED"


async def test_soft_cancel_of_a_ready_job_completes() -> None:
    h = Harness()
    job = Steps("j", steps=5, ready_at=0)
    start(h, job)
    job.gate.set()
    await wait_status(job, JobStatus.READY)
    await h.locked(lambda: h.manager.cancel(job, False))
    await wait_status(job, JobStatus.NULL)
    assert "aborting" not in h.statuses("j")
    assert job.hooks == ["prepare", "commit", "clean", "COMPLETED"]
    with pytest.raises(GenericError, match="Job not found"):
        h.manager.find("j")


async def test_a_failing_job_aborts_its_transaction() -> None:
    h = Harness()
    txn = JobTxn()
    good = Steps("good", steps=100)
    bad = Steps("bad", fail_at=0)
    start(h, good, txn)
    start(h, bad, txn)
    good.gate.set()
    await settle()
    bad.gate.set()
    await wait_status(good, JobStatus.NULL)
    await wait_status(bad, JobStatus.NULL)
    assert h.statuses("good")[-3:] == ["aborting", "concluded", "null"]
    assert "abort" in good.hooks and "commit" not in good.hooks
    assert good.hooks[-1] == "CANCELLED"
    assert bad.hooks[-1] == "COMPLETED" and bad.error == "step 0 failed"


async def test_a_transaction_finishes_together() -> None:
    h = Harness()
    txn = JobTxn()
    a, b = Steps("a"), Steps("b")
    start(h, a, txn)
    start(h, b, txn)
    a.gate.set()
    await wait_status(a, JobStatus.WAITING)
    await settle()
    assert a.status is JobStatus.WAITING  # until b is done too
    b.gate.set()
    await wait_status(a, JobStatus.NULL)
    await wait_status(b, JobStatus.NULL)
    assert a.hooks[:2] == ["prepare", "commit"] and b.hooks[:2] == ["prepare", "commit"]


async def test_duplicate_and_bad_ids() -> None:
    h = Harness()
    start(h, Steps("j"))
    with pytest.raises(GenericError, match="Job ID 'j' already in use"):
        h.manager.create(Steps("j"))
    with pytest.raises(GenericError, match="Invalid job ID '1x'"):
        h.manager.create(Steps("1x"))
    await h.manager.close(timeout=0.2)


async def test_close_cancels_what_runs() -> None:
    h = Harness()
    job = Steps("j", auto_dismiss=False)
    start(h, job)
    await settle()
    # The job waits on its gate, deaf to the cancel: after the timeout its
    # task is cancelled, and it still finishes (lets go of what it holds).
    await h.manager.close(timeout=0.2)
    assert job.status is JobStatus.NULL  # and dismissed, as QEMU at exit
    assert job.hooks[-1] == "CANCELLED"
    with pytest.raises(GenericError, match="shutting down"):
        h.manager.create(Steps("k"))


def test_rate_limit_follows_the_quota() -> None:
    limit = RateLimit()
    assert limit.delay(10 ** 9, now=0.0) == 0.0  # no speed: no limit
    limit.set_speed(1_000_000)  # 100 kB per 100 ms slice
    assert limit.delay(50_000, now=10.0) == 0.0
    assert limit.delay(250_000, now=10.0) == pytest.approx(0.3)  # 3 slices' worth
    assert limit.delay(0, now=10.5) == 0.0  # a new slice
