"""Command dispatch: lookup, OOB rules, schema validation, handler, reply.

This is the one place where exceptions become QMP error replies.  Handlers
may be plain functions (answered without leaving the caller's stack, which
keeps cheap queries cheap) or coroutine functions (the caller awaits them).
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qmpd.errors import CommandNotFound, GenericError, QMPError
from qmpd.qmp.session import QMPSession, Request
from qmpd.schema import Schema

if TYPE_CHECKING:
    from qmpd.metrics import Metrics
    from qmpd.services import Services

log = logging.getLogger(__name__)

Handler = Callable[["CommandContext", dict[str, Any]], Any]
Reply = bytes | Coroutine[Any, Any, bytes]

#: Handlers registered by the command modules, by command name, in
#: registration order (query-commands lists them newest first).
HANDLERS: dict[str, Handler] = {}

NEGOTIATION_COMMANDS = ("qmp_capabilities",)


def command(name: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of QMP command ``name``."""

    def register(fn: Handler) -> Handler:
        if name in HANDLERS:
            raise ValueError(f"command {name} registered twice")
        HANDLERS[name] = fn
        return fn

    return register


@dataclass(slots=True)
class CommandContext:
    """What a handler may use: the calling session and the daemon's services."""

    session: QMPSession
    services: Services
    dispatcher: Dispatcher


class Dispatcher:
    """Runs requests against the command table of their session."""

    def __init__(
        self,
        schema: Schema,
        services: Services,
        metrics: Metrics | None = None,
        handlers: dict[str, Handler] | None = None,
        check_returns: bool = False,
    ) -> None:
        handlers = dict(HANDLERS if handlers is None else handlers)
        missing = sorted(set(schema.commands) - set(handlers))
        extra = sorted(set(handlers) - set(schema.commands))
        if missing or extra:
            raise RuntimeError(
                f"schema and handlers disagree: no handler for {missing}, no schema for {extra}"
            )
        self.schema = schema
        self.services = services
        self.metrics = metrics
        self.check_returns = check_returns
        self.handlers = handlers
        self._is_async = {
            name: inspect.iscoroutinefunction(fn) for name, fn in handlers.items()
        }

    def command_names(self, session: QMPSession) -> list[str]:
        """The session's current command table, in registration order."""
        if session.negotiating:
            return [n for n in NEGOTIATION_COMMANDS if n in self.handlers]
        return list(self.handlers)

    def runs_out_of_band(self, session: QMPSession, request: Request) -> bool:
        """An exec-oob of an OOB-capable command: answered as soon as it is parsed,
        ahead of in-band requests still queued or running (QEMU's OOB rule)."""
        name = request.command
        return (
            request.oob
            and not session.negotiating
            and name in self.handlers
            and not self._is_async[name]
            and self.schema.commands[name].allow_oob
        )

    def dispatch(self, session: QMPSession, request: Request) -> Reply:
        """Reply bytes now, or a coroutine making them for a coroutine handler."""
        start = time.perf_counter()
        name = request.command
        try:
            handler = self._lookup(session, request)
            self.schema.validate_arguments(name, request.arguments)
            ctx = CommandContext(session, self.services, self)
            if self._is_async[name]:
                return self._finish_async(session, request, handler(ctx, request.arguments), start)
            value = handler(ctx, request.arguments)
        except QMPError as err:
            return self._error(session, request, err, start)
        except Exception as exc:  # a bug: report it, keep serving
            log.exception("command %s failed unexpectedly", name)
            return self._error(session, request, GenericError(f"internal error: {exc}"), start)
        return self._success(session, request, value, start)

    def _lookup(self, session: QMPSession, request: Request) -> Handler:
        name = request.command
        if session.negotiating and name not in NEGOTIATION_COMMANDS:
            raise CommandNotFound(f"The command {name} has not been found")
        handler = self.handlers.get(name)
        if handler is None:
            raise CommandNotFound(f"The command {name} has not been found")
        if request.oob and not self.schema.commands[name].allow_oob:
            raise GenericError(f"The command {name} does not support OOB")
        return handler

    async def _finish_async(
        self, session: QMPSession, request: Request, pending: Awaitable[Any], start: float
    ) -> bytes:
        try:
            value = await pending
        except QMPError as err:
            return self._error(session, request, err, start)
        except Exception as exc:
            log.exception("command %s failed unexpectedly", request.command)
            return self._error(session, request, GenericError(f"internal error: {exc}"), start)
        return self._success(session, request, value, start)

    def _success(self, session: QMPSession, request: Request, value: Any, start: float) -> bytes:
        if value is None:
            value = {}
        if self.check_returns:
            problems = self.schema.validate_returns(request.command, value)
            if problems:
                log.error("%s returned data outside its schema: %s", request.command, problems)
        if self.metrics is not None:
            self.metrics.command_done(request.command, "success", time.perf_counter() - start)
        return session.return_reply(request, value)

    def _error(self, session: QMPSession, request: Request, err: QMPError, start: float) -> bytes:
        if self.metrics is not None:
            known = request.command in self.handlers
            self.metrics.command_done(
                request.command if known else "<unknown>",
                err.error_class.value,
                time.perf_counter() - start,
            )
        return session.error_reply(request, err)
