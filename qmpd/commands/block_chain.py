"""Commands that change backing chains (block-core): block-stream, block-commit
(jobs, see qmpd.jobs.stream and qmpd.jobs.commit) and blockdev-snapshot."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.qmp.dispatch import CommandContext, command


@command("block-stream")
@graph_changing
async def block_stream(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.jobs.start("block-stream", args)


@command("block-commit")
@graph_changing
async def block_commit(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.jobs.start("block-commit", args)


@command("blockdev-snapshot")
@graph_changing
async def blockdev_snapshot(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.block.snapshot(args["node"], args["overlay"])
