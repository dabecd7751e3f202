"""QOM commands: object-add, object-del."""

from __future__ import annotations

from typing import Any

from qmpd.qmp.dispatch import CommandContext, command


@command("object-add")
def object_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.objects.add_object(args)


@command("object-del")
def object_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.objects.delete(args["id"])
