"""QOM commands: object-add, object-del, qom-list, qom-get, qom-list-types."""

from __future__ import annotations

from typing import Any

from qmpd.qmp.dispatch import CommandContext, command


@command("object-add")
def object_add(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.objects.add_object(args)


@command("object-del")
def object_del(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.objects.delete(args["id"])


@command("qom-list")
def qom_list(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    return ctx.services.objects.qom_list(args["path"])


@command("qom-get")
def qom_get(ctx: CommandContext, args: dict[str, Any]) -> Any:
    return ctx.services.objects.qom_get(args["path"], args["property"])


@command("qom-list-types")
def qom_list_types(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.services.objects.qom_list_types(args.get("implements"),
                                               args.get("abstract", False))
