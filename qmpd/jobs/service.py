"""The job service the commands use: the manager's verbs, the block-job lookups,
and (one module per job type) the commands that start jobs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from qmpd.block.bitmaps import ExternalActions, Prepared
from qmpd.block.core import BlockLayer
from qmpd.errors import DeviceNotActive
from qmpd.jobs.backup import backup_action, start_blockdev_backup
from qmpd.jobs.block_job import BlockJob
from qmpd.jobs.commit import start_commit
from qmpd.jobs.create import start_blockdev_create
from qmpd.jobs.job import Emit, Job, JobTxn
from qmpd.jobs.manager import JobManager
from qmpd.jobs.mirror import start_blockdev_mirror
from qmpd.jobs.stream import start_stream

#: A command that starts a job, implemented in its job's module (which never
#: imports this one): given the manager, the block layer and the arguments.
Starter = Callable[[JobManager, BlockLayer, dict[str, Any]], Awaitable[None]]

#: The commands that start jobs.
STARTERS: dict[str, Starter] = {
    "blockdev-create": start_blockdev_create,
    "blockdev-mirror": start_blockdev_mirror,
    "blockdev-backup": start_blockdev_backup,
    "block-commit": start_commit,
    "block-stream": start_stream,
}

#: A transaction action that creates a job: given the manager, the block layer,
#: the action's data and the transaction's JobTxn (None: the job's own), it
#: prepares the job and returns how to commit (start), abort and clean it.
Step = Callable[[], Awaitable[None]]
TxnAction = Callable[[JobManager, BlockLayer, dict[str, Any], JobTxn | None],
                     Awaitable[tuple[Step, Step, Step]]]

#: The transaction actions that create jobs.
TXN_ACTIONS: dict[str, TxnAction] = {
    "blockdev-backup": backup_action,
}


class Jobs:
    """Every job of a daemon, over its block layer."""

    def __init__(self, block: BlockLayer, emit: Emit) -> None:
        self.block = block
        self.manager = JobManager(emit, block.lock.run)

    async def start(self, command: str, args: dict[str, Any]) -> None:
        """Run the command ``command`` (``block-stream``...) that creates and starts a job."""
        await STARTERS[command](self.manager, self.block, args)

    def transaction_actions(self, properties: dict[str, Any] | None) -> ExternalActions:
        """The job actions of one ``transaction``; with completion-mode=grouped
        their jobs share one JobTxn."""
        grouped = (properties or {}).get("completion-mode", "individual") == "grouped"
        txn = JobTxn() if grouped else None

        def bind(action: TxnAction) -> Callable[[dict[str, Any]], Awaitable[Prepared]]:
            async def prepare(data: dict[str, Any]) -> Prepared:
                commit, abort, clean = await action(self.manager, self.block, data, txn)
                return Prepared(commit_async=commit, abort_async=abort, clean_async=clean)
            return prepare

        return {kind: bind(action) for kind, action in TXN_ACTIONS.items()}

    # --- queries and lookups -----------------------------------------------------------

    def query(self) -> list[dict[str, Any]]:
        return self.manager.query()

    def query_block(self) -> list[dict[str, Any]]:
        return [job.block_info() for job in self.manager if isinstance(job, BlockJob)]

    def find(self, job_id: str) -> Job:
        return self.manager.find(job_id)

    def find_block(self, device: str) -> Job:
        """blockdev.c's find_block_job."""
        job = self.manager.get(device)
        if not isinstance(job, BlockJob):
            raise DeviceNotActive(f"Block job '{device}' not found")
        return job

    # --- verbs ----------------------------------------------------------------------------

    async def cancel(self, job: Job, force: bool) -> None:
        await self.manager.cancel(job, force)

    def pause(self, job: Job) -> None:
        self.manager.pause(job)

    def resume(self, job: Job) -> None:
        self.manager.resume(job)

    def complete(self, job: Job) -> None:
        self.manager.complete(job)

    async def finalize(self, job: Job) -> None:
        await self.manager.finalize(job)

    def dismiss(self, job: Job) -> None:
        self.manager.dismiss(job)

    def set_speed(self, job: Job, speed: int) -> None:
        self.manager.set_speed(job, speed)

    async def close(self) -> None:
        await self.manager.close()
