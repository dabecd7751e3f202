"""Migration commands (QEMU 7.2's set), getfd and closefd."""

from __future__ import annotations

import os
from typing import Any

from qmpd.errors import GenericError
from qmpd.qmp.dispatch import CommandContext, command


@command("migrate")
def migrate(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.migration.migrate(args)


@command("migrate-incoming")
async def migrate_incoming(ctx: CommandContext, args: dict[str, Any]) -> None:
    await ctx.services.migration.migrate_incoming(args["uri"], args.get("exit-on-error", True))


@command("query-migrate")
def query_migrate(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return ctx.services.migration.query()


@command("migrate_cancel")
def migrate_cancel(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.migration.cancel()


@command("migrate-continue")
def migrate_continue(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.migration.continue_(args["state"])


@command("migrate-pause")
def migrate_pause(ctx: CommandContext, args: dict[str, Any]) -> None:
    # OOB-capable.  qmpd has no postcopy, the only state QEMU 7.2 pauses in.
    raise GenericError("migrate-pause is currently only supported during postcopy-active state")


@command("migrate-recover")
def migrate_recover(ctx: CommandContext, args: dict[str, Any]) -> None:
    # OOB-capable.  Without postcopy nothing can ever be paused to recover.
    raise GenericError("Migrate recover can only be run when postcopy is paused.")


@command("migrate-set-capabilities")
def migrate_set_capabilities(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.migration.set_capabilities(args["capabilities"])


@command("query-migrate-capabilities")
def query_migrate_capabilities(
    ctx: CommandContext, args: dict[str, Any]
) -> list[dict[str, Any]]:
    return ctx.services.migration.query_capabilities()


@command("migrate-set-parameters")
def migrate_set_parameters(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.migration.set_parameters(args)


@command("query-migrate-parameters")
def query_migrate_parameters(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    return ctx.services.migration.query_parameters()


@command("getfd")
def getfd(ctx: CommandContext, args: dict[str, Any]) -> None:
    name = args["fdname"]
    # QEMU looks for the descriptor first, then at the name.
    fd = ctx.session.take_passed_fd()
    if fd is None:
        raise GenericError("No file descriptor supplied via SCM_RIGHTS")
    if name[:1].isdigit():
        os.close(fd)
        raise GenericError("Parameter 'fdname' expects a name not starting with a digit")
    ctx.services.migration.fds.add(name, fd)


@command("closefd")
def closefd(ctx: CommandContext, args: dict[str, Any]) -> None:
    ctx.services.migration.fds.close(args["fdname"])
