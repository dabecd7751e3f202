"""The commands that start copying jobs: blockdev-mirror and blockdev-backup."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.qmp.dispatch import CommandContext, command


@command("blockdev-mirror")
@graph_changing
async def blockdev_mirror(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.jobs.start("blockdev-mirror", args)


@command("blockdev-backup")
@graph_changing
async def blockdev_backup(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.jobs.start("blockdev-backup", args)
