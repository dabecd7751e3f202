"""The transmission phase: the server's request parser and validator, the client's request encoder.

:class:`Transmission` turns the client's bytes into validated
:class:`Request` events (or :class:`Rejected`, :class:`Disconnect`,
:class:`Violation`), checking each request exactly as QEMU 7.2's server does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from qmpd.nbd.protocol.constants import (
    COMMAND_NAMES,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    Errno,
)
from qmpd.nbd.protocol.sansio import NEED_DATA, NeedData

_REQUEST = struct.Struct(">IHHQQI")

REQUEST_SIZE: Final = _REQUEST.size  # 28


# --- transmission (server side) -----------------------------------------------------------


@dataclass(slots=True)
class Request:
    """One request as it came off the wire (``payload`` for WRITE only)."""

    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: bytes | bytearray | None = None

    @property
    def command_name(self) -> str:
        try:
            return COMMAND_NAMES[Cmd(self.type)]
        except ValueError:
            return "unknown"


@dataclass(slots=True)
class Rejected:
    """A request refused before execution: reply ``error``/``message``.

    ``fatal``: the request's payload could not be consumed, so the
    connection must be closed after the reply.
    """

    request: Request
    error: Errno
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: no reply; finish what is in flight, then close."""


@dataclass(frozen=True, slots=True)
class Violation:
    """The client broke framing: nothing more can be parsed.

    ``cookie``: a bad request magic is answered EINVAL with ``reason`` under
    the header's cookie before the disconnect, as QEMU does.
    """

    reason: str
    cookie: int | None = None


TransmissionEvent = Request | Rejected | Disconnect | Violation

#: Flags QEMU accepts on each command (FUA is accepted everywhere).
_ALLOWED_FLAGS: Final = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.DISC: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
_WRITING: Final = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM})
_RANGED: Final = frozenset(
    {Cmd.READ, Cmd.WRITE, Cmd.TRIM, Cmd.CACHE, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS}
)
_BIG_PAYLOAD: Final = frozenset({Cmd.READ, Cmd.WRITE, Cmd.CACHE})


@dataclass(frozen=True, slots=True)
class _Rules:
    """What :meth:`Transmission.validate` checks for one command, as plain ints and
    bools: an enum lookup per request is a good part of a 4 KiB request's cost."""

    cmd: Cmd
    big_payload: bool
    writing: bool
    ranged: bool
    allowed: int


_RULES: Final = {
    int(cmd): _Rules(cmd, cmd in _BIG_PAYLOAD, cmd in _WRITING, cmd in _RANGED,
                     int(_ALLOWED_FLAGS[cmd]))
    for cmd in Cmd
}
_DF: Final = int(CmdFlag.DF)
_READ: Final = int(Cmd.READ)
_WRITE: Final = int(Cmd.WRITE)
_DISC: Final = int(Cmd.DISC)
_BLOCK_STATUS: Final = int(Cmd.BLOCK_STATUS)


class Transmission:
    """The server's transmission phase: requests in, validated events out.

    ``size`` is called for every ranged request (an export can grow);
    ``read_only``, ``structured`` and ``contexts`` are what the handshake
    agreed.  Validation follows QEMU 7.2's server: every refusal is EINVAL
    (even a write to a read-only export), with QEMU's message.

    Bytes come in either through :meth:`receive_data` or, without copying,
    through :meth:`get_buffer` / :meth:`buffer_updated` (receive straight
    into the returned buffer: a WRITE's payload lands in the very bytearray
    that is handed to the block layer).
    """

    #: Size of the parse buffer for request headers.
    BUFFER_SIZE = 256 * 1024
    #: After a large WRITE, the next header most likely starts another one:
    #: take only this much into the parse buffer, so that the payload is
    #: received in place instead of being copied out of the parse buffer.
    SMALL_WINDOW = 4096
    #: Payloads smaller than this are not worth recycling.
    RECYCLE_MIN = 64 * 1024
    #: Recycled payloads kept: several, as completions come in bunches (one
    #: spare served 57% of a 1 MiB QD4 stream over rbd) ...
    SPARES = 4
    #: ... and this many bytes at most beyond the first (which may be one
    #: payload of any size, as before).
    SPARE_BYTES = 8 * 1024 * 1024

    def __init__(
        self,
        size: Callable[[], int],
        read_only: bool,
        structured: bool,
        contexts: dict[int, str] | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.size = size
        self.read_only = read_only
        self.structured = structured
        self.contexts = dict(contexts or {})
        self.max_payload = max_payload
        self._buf = bytearray(self.BUFFER_SIZE)
        self._start = 0
        self._end = 0
        self._header: Request | None = None  # a WRITE waiting for its payload
        self._payload = bytearray()
        self._spares: list[bytearray] = []  # see recycle()
        self._filled = 0
        self._small_window = False
        self.finished = False  # after DISC or a violation nothing more is parsed

    @property
    def receiving(self) -> bool:
        """Whether part of a request has arrived (more of it is on its way)."""
        return self._header is not None or self._end > self._start

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events."""
        return self._end - self._start + (self._filled if self._header is not None else 0)

    @property
    def filling_payload(self) -> bool:
        """Whether :meth:`get_buffer` returns a WRITE's payload (fill it all at once)."""
        return self._header is not None and self._filled < len(self._payload)

    @property
    def payload_missing(self) -> int:
        """Bytes of a WRITE's payload still to come (0 when none is being received)."""
        return len(self._payload) - self._filled if self._header is not None else 0

    @property
    def header_first(self) -> bool:
        """Whether the next bytes should be parsed before more are taken: after a
        large WRITE, the next request is likely another whose payload is best
        received in place (see :attr:`SMALL_WINDOW`)."""
        return self._small_window and not self.filling_payload

    # --- input ----------------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty)."""
        if self._header is not None and self._filled < len(self._payload):
            return memoryview(self._payload)[self._filled :]
        buf = self._buf
        if self._start == self._end:
            self._start = self._end = 0
        elif len(buf) - self._end < REQUEST_SIZE * 16:
            # Move the unparsed tail to the front; grow only when it is full.
            tail = self._end - self._start
            buf[:tail] = buf[self._start : self._end]
            self._start, self._end = 0, tail
            if len(buf) - tail < REQUEST_SIZE * 16:
                buf.extend(bytes(len(buf)))
        if self._small_window:
            return memoryview(buf)[self._end : self._end + self.SMALL_WINDOW]
        return memoryview(buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._header is not None and self._filled < len(self._payload):
            self._filled += nbytes
        else:
            self._end += nbytes

    def receive_data(self, data: bytes) -> None:
        if self.finished:
            return
        view = memoryview(data)
        while view:
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    # --- events -----------------------------------------------------------------------------

    def next_event(self) -> TransmissionEvent | NeedData:
        if self.finished:
            return NEED_DATA
        header = self._header
        if header is not None:
            if self._filled < len(self._payload):
                return NEED_DATA
            header.payload = self._payload
            self._header = None
            self._payload = bytearray()
            return self.validate(header)
        start = self._start
        if self._end - start < REQUEST_SIZE:
            return NEED_DATA
        buf = self._buf
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(buf, start)
        start += REQUEST_SIZE
        self._start = start
        if magic != REQUEST_MAGIC:
            self.finished = True
            return Violation(f"invalid magic (got 0x{magic:x})", cookie)
        request = Request(flags, kind, cookie, offset, length)
        if kind == _DISC:
            self.finished = True
            return Disconnect()
        self._small_window = kind == _WRITE and length >= 16 * self.SMALL_WINDOW
        if kind == _WRITE:
            if length > self.max_payload:
                self.finished = True
                return Rejected(
                    request, Errno.EINVAL,
                    f"len ({length}) is larger than max len ({self.max_payload})", fatal=True,
                )
            have = min(self._end - start, length)
            self._start = start + have
            if have == length:  # all here: one copy, no zero-filling first
                request.payload = buf[start : start + have]
                if not flags and not self.read_only and offset + length <= self.size():
                    return request  # (validate's verdict, in fewer steps)
                return self.validate(request)
            payload = self._take_spare(length)
            payload[:have] = memoryview(buf)[start : start + have]
            self._header = request
            self._payload = payload
            self._filled = have
            return NEED_DATA
        if kind == _READ and not flags and length <= self.max_payload \
                and offset + length <= self.size():
            return request  # (validate's verdict for the usual READ, in fewer steps)
        return self.validate(request)

    def event_ready(self) -> bool:
        """Whether :meth:`next_event` may return something other than NeedData."""
        if self.finished:
            return False
        if self._header is not None:
            return self._filled >= len(self._payload)
        return self._end - self._start >= REQUEST_SIZE

    def recycle(self, payload: bytes | bytearray) -> None:
        """A WRITE's payload that nothing refers to any more: the next WRITE of
        the same length may be received into it (streamed WRITEs of one size
        then cost no allocation and no zero-filling of a fresh buffer)."""
        if not isinstance(payload, bytearray) or len(payload) < self.RECYCLE_MIN:
            return
        spares = self._spares
        if any(spare is payload for spare in spares):
            return  # twice would hand one buffer to two WRITEs
        if not spares or (len(spares) < self.SPARES and sum(map(len, spares)) + len(payload)
                          <= self.SPARE_BYTES):
            spares.append(payload)

    def _take_spare(self, length: int) -> bytearray:
        """A recycled payload of ``length`` bytes, or a new one."""
        spares = self._spares
        for index, spare in enumerate(spares):
            if len(spare) == length:
                return spares.pop(index)
        return bytearray(length)

    def validate(self, request: Request) -> Request | Rejected:
        """QEMU's checks, in QEMU's order; the request itself when it passes."""
        kind = request.type
        rules = _RULES.get(kind)
        if rules is None:
            return Rejected(request, Errno.EINVAL, f"invalid request type ({kind}) received")
        length = request.length
        if rules.big_payload and length > self.max_payload:
            return Rejected(
                request, Errno.EINVAL, f"len ({length}) is larger than max len ({self.max_payload})"
            )
        if rules.writing and self.read_only:
            return Rejected(request, Errno.EINVAL, "Export is read-only")
        if rules.ranged:
            size = self.size()
            if request.offset > size or length > size - request.offset:
                return Rejected(
                    request, Errno.EINVAL,
                    f"operation past EOF; From: {request.offset}, Len: {length}, Size: {size}",
                )
        allowed = rules.allowed
        if kind == _READ and not self.structured:
            allowed &= ~_DF
        if request.flags & ~allowed:
            return Rejected(
                request, Errno.EINVAL,
                f"unsupported flags for command {COMMAND_NAMES[rules.cmd]} "
                f"(got 0x{request.flags:x})",
            )
        if kind == _BLOCK_STATUS:
            if not self.structured or not self.contexts:
                return Rejected(request, Errno.EINVAL, "CMD_BLOCK_STATUS not negotiated")
            if not length:
                return Rejected(request, Errno.EINVAL, "need non-zero length")
        return request


# --- client side --------------------------------------------------------------------------


def request_header(
    kind: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)
