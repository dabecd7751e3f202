"""blockdev-create (QAPI's block-core): a job that creates an image."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.qmp.dispatch import CommandContext, command


@command("blockdev-create")
@graph_changing
async def blockdev_create(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.jobs.start("blockdev-create", args)
