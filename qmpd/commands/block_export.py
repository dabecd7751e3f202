"""Block export commands: the NBD server and its exports (QAPI's block-export module)."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.qmp.dispatch import CommandContext, command


@command("nbd-server-start")
async def nbd_server_start(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.exports.start_server(args)


@command("nbd-server-stop")
@graph_changing
async def nbd_server_stop(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.exports.stop_server()


@command("block-export-add")
@graph_changing
async def block_export_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.exports.add(args)


@command("block-export-del")
@graph_changing
async def block_export_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.exports.delete(args["id"], args.get("mode", "safe"))


@command("query-block-exports")
def query_block_exports(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.services.exports.query()


@command("nbd-server-add")
@graph_changing
async def nbd_server_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.exports.legacy_add(args)


@command("nbd-server-remove")
@graph_changing
async def nbd_server_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.exports.delete(args["name"], args.get("mode", "safe"))
