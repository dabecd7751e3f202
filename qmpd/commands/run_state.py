"""Run-state commands: query-status, stop, cont."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.qmp.dispatch import CommandContext, command


@command("query-status")
def query_status(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    state = ctx.services.vm.state
    # Members in QAPI order: QEMU's output order depends on insertion order.
    return {"running": state.value == "running", "singlestep": False, "status": state.value}


@command("stop")
@graph_changing
async def stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.vm.stop()


@command("cont")
@graph_changing
async def cont(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.vm.cont()
