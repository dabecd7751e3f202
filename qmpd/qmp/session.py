"""Sans-IO state of one QMP connection: greeting, negotiation, request checks.

Bytes in (:meth:`QMPSession.receive_data`), requests and ready-made error
replies out; replies and events are encoded here too.  The session knows
nothing about sockets or about which commands exist: the dispatcher does.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from qmpd.errors import CommandNotFound, GenericError, QMPError
from qmpd.qmp.budget import QMPInputBudget
from qmpd.qmp.encode import encode_message, qdict_order
from qmpd.qmp.json_stream import JSONStreamParser, ParseFailure

#: Capabilities qmpd can offer; a socket monitor offers all of them.
QMP_CAPABILITIES = ("oob",)

#: Input is parsed and charged to the budget this much at a time, so one
#: connection overshoots the shared total by at most this for an instant.
INPUT_CHUNK = 256 * 1024

NEGOTIATION_HINT = "Expecting capabilities negotiation with 'qmp_capabilities'"

_UNSET = object()


@dataclass(slots=True)
class Request:
    """A request that passed the envelope checks and awaits dispatch."""

    command: str
    arguments: dict[str, Any]
    id: Any = _UNSET
    oob: bool = False
    #: Input budget it holds until :meth:`QMPSession.request_done`.
    size: int = field(default=0, compare=False)

    @property
    def has_id(self) -> bool:
        return self.id is not _UNSET


Incoming = Request | bytes


class QMPSession:
    """Protocol state of one client connection."""

    __slots__ = (
        "_fds", "_greeting", "_input", "_requests_held", "capabilities", "negotiating",
        "offered", "parser", "pretty",
    )

    def __init__(
        self,
        version: dict[str, Any],
        offered: tuple[str, ...] = QMP_CAPABILITIES,
        pretty: bool = False,
        budget: QMPInputBudget | None = None,
    ) -> None:
        self.parser = JSONStreamParser()
        self._input = (budget if budget is not None else QMPInputBudget()).account()
        self._requests_held = 0
        self.pretty = pretty
        self.negotiating = True
        self.capabilities: frozenset[str] = frozenset()
        self.offered = offered
        self._greeting = self.encode({"QMP": {"version": version, "capabilities": list(offered)}})
        self._fds: list[int] = []

    @property
    def oob_enabled(self) -> bool:
        return "oob" in self.capabilities

    def greeting(self) -> bytes:
        """The first message a client receives."""
        return self._greeting

    def encode(self, message: dict[str, Any]) -> bytes:
        return encode_message(message, self.pretty)

    def receive_data(self, data: bytes) -> list[Incoming]:
        """Parse ``data``; return requests to dispatch and immediate replies."""
        out: list[Incoming] = []
        for start in range(0, len(data), INPUT_CHUNK):
            chunk = data[start : start + INPUT_CHUNK] if len(data) > INPUT_CHUNK else data
            self._parse(chunk, out)
        return out

    @property
    def input_held(self) -> int:
        """Bytes of the shared input budget this connection holds."""
        return self._input.held

    def reset_input(self) -> None:
        """Forget any half-read message and queued requests; return their budget."""
        self.parser.reset()
        self._requests_held = 0
        self._input.release()

    def request_done(self, request: Request) -> None:
        """``request`` was answered: the budget its input held is free again."""
        self._requests_held = max(0, self._requests_held - request.size)
        request.size = 0
        self._charge(force=True)

    def _charge(self, force: bool = False) -> bool:
        return self._input.resize(self.parser.held_memory + self._requests_held, force)

    def _parse(self, data: bytes, out: list[Incoming]) -> None:
        parser = self.parser
        items = parser.feed(data)
        for item, size in zip(items, parser.result_sizes, strict=True):
            incoming = self._incoming(item)
            if isinstance(incoming, Request):
                incoming.size = size
                self._requests_held += size
            out.append(incoming)
        if not self._charge():
            # Over the daemon-wide total: an unfinished message is treated as
            # an over-limit one.  Requests already parsed are in memory
            # anyway; they stay charged, above the total.
            if parser.held_memory:
                out.append(self._incoming(parser.discard_message()))
            self._charge(force=True)

    def _incoming(self, item: object) -> Incoming:
        if isinstance(item, ParseFailure):
            return self.encode({"error": GenericError(item.desc).to_qmp()})
        if not isinstance(item, dict):
            return self.encode({"error": GenericError("QMP input must be a JSON object").to_qmp()})
        return self._check_request(item)

    def _check_request(self, msg: dict[str, Any]) -> Incoming:
        # Members are checked in QEMU's QDict order; the first problem wins.
        allow_oob = self.oob_enabled
        exec_key: str | None = None
        problem: str | None = None
        for key in qdict_order(list(msg)):
            value = msg[key]
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    problem = f"QMP input member '{key}' must be a string"
                    break
                if exec_key is not None:
                    problem = f"QMP input member '{key}' clashes with '{exec_key}'"
                    break
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    problem = "QMP input member 'arguments' must be an object"
                    break
            elif key != "id":
                problem = f"QMP input member '{key}' is unexpected"
                break
        if problem is None and exec_key is None:
            problem = "QMP input lacks member 'execute'"
        request_id = msg.get("id", _UNSET)
        if problem is not None:
            return self._error_bytes(request_id, GenericError(problem))
        assert exec_key is not None
        return Request(
            command=msg[exec_key],
            arguments=msg.get("arguments", {}),
            id=request_id,
            oob=exec_key == "exec-oob",
        )

    def add_passed_fd(self, fd: int) -> None:
        """A descriptor that arrived with the client's bytes (SCM_RIGHTS)."""
        self._fds.append(fd)

    def take_passed_fd(self) -> int | None:
        """The most recent descriptor passed, for getfd (older ones are closed)."""
        if not self._fds:
            return None
        fd = self._fds.pop()
        self.close_passed_fds()
        return fd

    def close_passed_fds(self) -> None:
        while self._fds:
            os.close(self._fds.pop())

    def accept_capabilities(self, enable: list[str]) -> None:
        """qmp_capabilities: leave negotiation mode with ``enable`` in effect."""
        if not self.negotiating:
            raise CommandNotFound("Capabilities negotiation is already complete, command ignored")
        unavailable = [cap for cap in QMP_CAPABILITIES if cap in enable and cap not in self.offered]
        if unavailable:
            raise GenericError(f"Capability {', '.join(unavailable)} not available")
        self.capabilities = frozenset(enable)
        self.negotiating = False

    def return_reply(self, request: Request, value: Any) -> bytes:
        if request.id is _UNSET:
            return self.encode({"return": value})
        return self.encode({"return": value, "id": request.id})

    def error_reply(self, request: Request, error: QMPError) -> bytes:
        return self._error_bytes(request.id, error)

    def _error_bytes(self, request_id: Any, error: QMPError) -> bytes:
        info = error.to_qmp()
        if self.negotiating and isinstance(error, CommandNotFound):
            info = {"class": info["class"], "desc": NEGOTIATION_HINT}
        if request_id is _UNSET:
            return self.encode({"error": info})
        return self.encode({"id": request_id, "error": info})


def event_message(
    name: str, data: dict[str, Any] | None, now: float | None = None
) -> dict[str, Any]:
    """An event as QEMU shapes it; ``data`` is left out when there is none."""
    if now is None:
        now = time.time()
    seconds = int(now)
    micro = int((now - seconds) * 1_000_000)
    msg: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": micro},
        "event": name,
    }
    if data is not None:
        msg["data"] = data
    return msg
