"""Monitor control commands: negotiation, versions, introspection, quit."""

from __future__ import annotations

from typing import Any

from qmpd.qmp.dispatch import CommandContext, command


@command("qmp_capabilities")
def qmp_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.session.accept_capabilities(args.get("enable", []))


@command("query-version")
def query_version(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return ctx.services.control.version_info


@command("query-commands")
def query_commands(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, str]]:
    names = ctx.dispatcher.command_names(ctx.session)
    return [{"name": name} for name in reversed(names)]


@command("query-qmp-schema")
def query_qmp_schema(ctx: CommandContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return ctx.dispatcher.schema.introspect()


@command("query-name")
def query_name(ctx: CommandContext, args: dict[str, Any]) -> dict[str, str]:
    name = ctx.services.control.name
    return {} if name is None else {"name": name}


@command("quit")
def quit_(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.control.request_shutdown("host-qmp-quit")
