"""Dirty bitmap commands (QAPI's block-core) and transaction."""

from __future__ import annotations

from typing import Any

from qmpd.commands.serialise import graph_changing
from qmpd.qmp.dispatch import CommandContext, command


@command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.block.bitmaps.settled(args["node"])
    ctx.services.block.bitmaps.run("block-dirty-bitmap-add", args)


@command("block-dirty-bitmap-remove")
@graph_changing
async def block_dirty_bitmap_remove(ctx: CommandContext, args: dict[str, Any]) -> None:
    # Async: a persistent bitmap is removed from the image too.
    await ctx.services.block.bitmaps.run_async("block-dirty-bitmap-remove", args)


@command("block-dirty-bitmap-clear")
def block_dirty_bitmap_clear(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.block.bitmaps.run("block-dirty-bitmap-clear", args)


@command("block-dirty-bitmap-enable")
def block_dirty_bitmap_enable(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.block.bitmaps.run("block-dirty-bitmap-enable", args)


@command("block-dirty-bitmap-disable")
def block_dirty_bitmap_disable(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.block.bitmaps.run("block-dirty-bitmap-disable", args)


@command("block-dirty-bitmap-merge")
def block_dirty_bitmap_merge(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.block.bitmaps.run("block-dirty-bitmap-merge", args)


@command("x-debug-block-dirty-bitmap-sha256")
def x_debug_block_dirty_bitmap_sha256(ctx: CommandContext, args: dict[str, Any]) -> dict[str, str]:
    return ctx.services.block.bitmaps.sha256(args)


@command("transaction")
@graph_changing
async def transaction(ctx: CommandContext, args: dict[str, Any]) -> None:
    properties = args.get("properties")
    await ctx.services.block.bitmaps.transaction(
        args["actions"], properties, ctx.services.jobs.transaction_actions(properties))
