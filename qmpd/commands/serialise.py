"""The decorator that puts a command under the graph lock."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from qmpd.qmp.dispatch import CommandContext

T = TypeVar("T")


def graph_changing(
    fn: Callable[[CommandContext, dict[str, Any]], Awaitable[T]],
) -> Callable[[CommandContext, dict[str, Any]], Awaitable[T]]:
    """Run the command alone among graph changes, and to its end (see block.serial)."""

    @functools.wraps(fn)
    async def run(ctx: CommandContext, args: dict[str, Any]) -> T:
        return await ctx.services.block.lock.run(lambda: fn(ctx, args))

    return run
