"""Block commands: blockdev-add/-del, node queries, resize, activation."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.qmp.dispatch import CommandContext, command
from qmpd.runstate import RunState


@command("blockdev-add")
@graph_changing
async def blockdev_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    services = ctx.services
    # While waiting for an incoming migration, nodes open inactive: no write
    # locks, and nothing they cache is trusted until activation.
    inactive = services.vm.state == RunState.INMIGRATE
    await services.block.add(args, inactive=inactive)


@command("blockdev-del")
@graph_changing
async def blockdev_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.block.delete(args["node-name"])


@command("query-named-block-nodes")
def query_named_block_nodes(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.services.block.named_nodes(args.get("flat", False))


@command("query-block")
def query_block(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    # Only BlockBackends appear here, and blockdev-add creates none.
    return []


@command("block_resize")
@graph_changing
async def block_resize(ctx: CommandContext, args: dict[str, Any]) -> None:
    block = ctx.services.block
    node = block.find(args.get("device"), args.get("node-name"))
    await block.resize(node, args["size"])


@command("blockdev-set-active")
@graph_changing
async def blockdev_set_active(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.block.set_active(args.get("node-name"), args["active"])
