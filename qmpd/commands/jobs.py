"""Job commands (QAPI's job module) and the block-job forms (block-core)."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.errors import GenericError
from qmpd.qmp.dispatch import CommandContext, command


@command("query-jobs")
def query_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.services.jobs.query()


@command("job-pause")
def job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.pause(jobs.find(args["id"]))


@command("job-resume")
def job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.resume(jobs.find(args["id"]))


@command("job-cancel")
@graph_changing
async def job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    await jobs.cancel(jobs.find(args["id"]), True)


@command("job-complete")
def job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.complete(jobs.find(args["id"]))


@command("job-finalize")
@graph_changing
async def job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    await jobs.finalize(jobs.find(args["id"]))


@command("job-dismiss")
def job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.dismiss(jobs.find(args["id"]))


@command("query-block-jobs")
def query_block_jobs(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.services.jobs.query_block()


@command("block-job-set-speed")
def block_job_set_speed(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.set_speed(jobs.find_block(args["device"]), args["speed"])


@command("block-job-cancel")
@graph_changing
async def block_job_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    device = args["device"]
    job = jobs.find_block(device)
    force = args.get("force", False)
    if job.user_paused and not force:
        raise GenericError(f"The block job for device '{device}' is currently paused")
    await jobs.cancel(job, force)


@command("block-job-pause")
def block_job_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.pause(jobs.find_block(args["device"]))


@command("block-job-resume")
def block_job_resume(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.resume(jobs.find_block(args["device"]))


@command("block-job-complete")
def block_job_complete(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.complete(jobs.find_block(args["device"]))


@command("block-job-finalize")
@graph_changing
async def block_job_finalize(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    await jobs.finalize(jobs.find_block(args["id"]))


@command("block-job-dismiss")
def block_job_dismiss(ctx: CommandContext, args: dict[str, Any]) -> None:
    jobs = ctx.services.jobs
    jobs.dismiss(jobs.find_block(args["id"]))
