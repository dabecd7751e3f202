"""The NBD protocol, sans I/O: constants, the server's handshake and transmission
state machines, and the encoders both sides need.

Nothing here touches a socket or the event loop.  A state machine is fed the
bytes a peer sent (:meth:`ServerHandshake.receive_data`,
:meth:`Transmission.receive_data`), hands back events one at a time
(``next_event()``, :data:`NEED_DATA` when it needs more bytes) and collects
what must be sent in an output buffer (``data_to_send()``).  The asyncio
server in :mod:`qmpd.nbd.server` and the client in :mod:`qmpd.nbd.client`
are thin layers over this module, and the unit tests and the fuzzers drive it
with plain bytes.

What the server implements (the fixed newstyle protocol, as QEMU 7.2's
server speaks it; see the NBD specification ``doc/proto.md``):

* handshake: ``NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES``; options
  EXPORT_NAME, ABORT, LIST, STARTTLS (refused: no TLS), INFO, GO,
  STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT
  (``base:allocation`` and ``qemu:allocation-depth``); every other option is
  answered ``NBD_REP_ERR_UNSUP`` and negotiation goes on;
* transmission: 28-byte requests, validated here exactly as QEMU's server
  validates them (its error numbers and messages); the caller executes the
  commands that pass and encodes their replies with :class:`Replies`.

All integers on the wire are big-endian.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from qmpd.nbd.options import (
    OptionInvalid,
    OptionReader,
    not_present,
    option_name,
    unexpected_length,
)

# --- magics and limits --------------------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

#: Longest string (export name, description, query) the protocol carries.
MAX_STRING: Final = 4096
#: Largest READ/WRITE/CACHE payload (QEMU's NBD_MAX_BUFFER_SIZE).
MAX_PAYLOAD: Final = 32 * 1024 * 1024
#: An option longer than this is a protocol violation (the connection is dropped).
MAX_OPTION_LENGTH: Final = 32 * 1024 * 1024
#: Option payloads are buffered up to this size; longer ones are skipped
#: without being stored and answered NBD_REP_ERR_TOO_BIG.
MAX_BUFFERED_OPTION: Final = 64 * 1024
#: Extents in one block status reply (without REQ_ONE).
MAX_EXTENTS: Final = 1 << 16

DEFAULT_PORT: Final = 10809


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


#: Option names as QEMU prints them in messages.
OPTION_NAMES: Final = {
    Opt.EXPORT_NAME: "export name",
    Opt.ABORT: "abort",
    Opt.LIST: "list",
    Opt.PEEK_EXPORT: "peek export",
    Opt.STARTTLS: "starttls",
    Opt.INFO: "info",
    Opt.GO: "go",
    Opt.STRUCTURED_REPLY: "structured reply",
    Opt.LIST_META_CONTEXT: "list meta context",
    Opt.SET_META_CONTEXT: "set meta context",
    Opt.EXTENDED_HEADERS: "extended headers",
}

_REP_ERR: Final = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERR + 1
    ERR_POLICY = _REP_ERR + 2
    ERR_INVALID = _REP_ERR + 3
    ERR_PLATFORM = _REP_ERR + 4
    ERR_TLS_REQD = _REP_ERR + 5
    ERR_UNKNOWN = _REP_ERR + 6
    ERR_SHUTDOWN = _REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
    ERR_TOO_BIG = _REP_ERR + 9
    ERR_EXT_HEADER_REQD = _REP_ERR + 10


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TFlag(enum.IntFlag):
    """Transmission flags (per export, per client)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


#: Command names as QEMU's messages spell them (also the metric labels).
COMMAND_NAMES: Final = {
    Cmd.READ: "read",
    Cmd.WRITE: "write",
    Cmd.DISC: "disconnect",
    Cmd.FLUSH: "flush",
    Cmd.TRIM: "trim",
    Cmd.CACHE: "cache",
    Cmd.WRITE_ZEROES: "write zeroes",
    Cmd.BLOCK_STATUS: "block status",
}


class CmdFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(enum.IntEnum):
    """Error values on the wire (not the host's errno numbers)."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


STATE_HOLE: Final = 1
STATE_ZERO: Final = 2

BASE_ALLOCATION: Final = "base:allocation"
ALLOCATION_DEPTH: Final = "qemu:allocation-depth"
#: Context ids, as QEMU numbers them.
CONTEXT_IDS: Final = {BASE_ALLOCATION: 0, ALLOCATION_DEPTH: 1}


def errno_to_nbd(err: int) -> Errno:
    """A host errno as QEMU's server maps it onto the NBD error values."""
    import errno as _errno

    if err in (_errno.EPERM, _errno.EROFS):
        return Errno.EPERM
    if err in (_errno.EIO,):
        return Errno.EIO
    if err == _errno.ENOMEM:
        return Errno.ENOMEM
    if err in (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG):
        return Errno.ENOSPC
    if err == _errno.EOVERFLOW:
        return Errno.EOVERFLOW
    if err in (_errno.EOPNOTSUPP, _errno.ENOTSUP):
        return Errno.ENOTSUP
    if err == _errno.ESHUTDOWN:
        return Errno.ESHUTDOWN
    return Errno.EINVAL


# --- wire structures ----------------------------------------------------------------------

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_REPLY = struct.Struct(">QH")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_ERROR_HEAD = struct.Struct(">IH")
_EXTENT = struct.Struct(">II")

REQUEST_SIZE: Final = _REQUEST.size  # 28
SIMPLE_REPLY_SIZE: Final = _SIMPLE_REPLY.size  # 16
CHUNK_HEADER_SIZE: Final = _CHUNK.size  # 20


class NeedData:
    """Sentinel: the state machine needs more bytes before its next event."""

    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class ProtocolError(Exception):
    """The peer broke the protocol; the only answer is to drop the connection."""


# --- exports as the protocol sees them ----------------------------------------------------


@dataclass(frozen=True)
class ExportDescription:
    """What a client learns about an export during the handshake."""

    name: str
    size: int
    flags: TFlag
    description: str = ""
    #: Meta contexts a client may select (``base:allocation`` and friends).
    contexts: tuple[str, ...] = (BASE_ALLOCATION,)
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = MAX_PAYLOAD

    def client_flags(self, structured: bool) -> TFlag:
        """The export's flags as sent to one client (DF only with structured replies)."""
        flags = self.flags | TFlag.HAS_FLAGS
        if structured:
            flags |= TFlag.SEND_DF
        return flags


class ExportCatalog(Protocol):
    """The exports a handshake may offer (the server's export list)."""

    def lookup(self, name: str) -> ExportDescription | None: ...

    def listing(self) -> list[tuple[str, str]]:
        """``(name, description)`` of every export, in list order."""
        ...


# --- handshake (server side) --------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeDone:
    """Negotiation finished: transmission begins with ``leftover``."""

    export: ExportDescription
    structured: bool
    #: Selected meta contexts: id -> name.
    contexts: dict[int, str]
    flags: TFlag
    leftover: bytes


@dataclass(frozen=True)
class HandshakeClosed:
    """The connection must be closed once the output is sent.

    ``graceful`` is True after NBD_OPT_ABORT (or an EXPORT_NAME the server
    cannot serve), False for a protocol violation.
    """

    reason: str
    graceful: bool


HandshakeEvent = HandshakeDone | HandshakeClosed


class _HsState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTION_HEADER = "option-header"
    OPTION_DATA = "option-data"
    OPTION_SKIP = "option-skip"
    DONE = "done"


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


class ServerHandshake:
    """The server's side of the fixed newstyle handshake.

    Construct it, send :meth:`data_to_send` (the greeting), then feed what
    the client sends and pull events until :data:`NEED_DATA`.  After a
    :class:`HandshakeDone` or :class:`HandshakeClosed` the machine is finished;
    send the remaining output first.
    """

    def __init__(self, catalog: ExportCatalog, tls: bool = False) -> None:
        self.catalog = catalog
        self.tls = tls
        self.state = _HsState.CLIENT_FLAGS
        self._buf = bytearray()
        self._out = bytearray(
            _GREETING.pack(
                NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
            )
        )
        self.fixed = True
        self.no_zeroes = False
        self.structured = False
        #: Result of the last SET_META_CONTEXT: (export name, {id: context}).
        self.meta: tuple[str, dict[int, str]] | None = None
        self._option = 0
        self._length = 0
        self._skip = 0
        self.options_seen = 0

    # --- driving --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.state is not _HsState.DONE:
            self._buf += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> HandshakeEvent | NeedData:
        try:
            return self._step()
        except ProtocolError as exc:
            self.state = _HsState.DONE
            return HandshakeClosed(str(exc), graceful=False)

    def _step(self) -> HandshakeEvent | NeedData:
        buf = self._buf
        while True:
            state = self.state
            if state is _HsState.DONE:
                return NEED_DATA
            if state is _HsState.CLIENT_FLAGS:
                if len(buf) < 4:
                    return NEED_DATA
                flags = _U32.unpack_from(buf)[0]
                del buf[:4]
                if flags & ~int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES):
                    raise ProtocolError(f"Unknown client flags 0x{flags:x} received")
                self.fixed = bool(flags & ClientFlag.FIXED_NEWSTYLE)
                self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
                self.state = _HsState.OPTION_HEADER
            elif state is _HsState.OPTION_HEADER:
                if len(buf) < _OPTION_HEADER.size:
                    return NEED_DATA
                magic, option, length = _OPTION_HEADER.unpack_from(buf)
                del buf[: _OPTION_HEADER.size]
                if magic != IHAVEOPT:
                    raise ProtocolError("Bad magic received")
                if length > MAX_OPTION_LENGTH:
                    raise ProtocolError(
                        f"len ({length}) is larger than max len ({MAX_OPTION_LENGTH})"
                    )
                self.options_seen += 1
                self._option, self._length = option, length
                if length > MAX_BUFFERED_OPTION:
                    if option == Opt.EXPORT_NAME:
                        raise ProtocolError("export name too long")
                    self._skip = length
                    self.state = _HsState.OPTION_SKIP
                else:
                    self.state = _HsState.OPTION_DATA
            elif state is _HsState.OPTION_SKIP:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return NEED_DATA
                self.state = _HsState.OPTION_HEADER
                self._reply_error(Rep.ERR_TOO_BIG, "option too long")
            else:  # OPTION_DATA
                if len(buf) < self._length:
                    return NEED_DATA
                data = bytes(buf[: self._length])
                del buf[: self._length]
                self.state = _HsState.OPTION_HEADER
                event = self._handle_option(self._option, data)
                if event is not None:
                    self.state = _HsState.DONE
                    return event

    # --- replies --------------------------------------------------------------------------

    def _reply(self, reply: int, data: bytes = b"") -> None:
        self._out += option_reply(self._option, reply, data)

    def _reply_error(self, reply: Rep, message: str) -> None:
        self._reply(reply, message.encode("utf-8", "replace"))

    # --- options --------------------------------------------------------------------------

    def _handle_option(self, option: int, data: bytes) -> HandshakeEvent | None:
        if option == Opt.EXPORT_NAME:
            return self._export_name(data)
        try:
            if option == Opt.ABORT:
                self._reply(Rep.ACK)
                return HandshakeClosed("client sent NBD_OPT_ABORT", graceful=True)
            if option in (Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY) and data:
                raise OptionInvalid(unexpected_length(option))
            if option == Opt.LIST:
                self._list()
            elif option == Opt.STARTTLS:
                if self.tls:  # pragma: no cover - qmpd has no TLS objects yet
                    self._reply_error(Rep.ERR_UNSUP, "TLS is not supported")
                else:
                    self._reply_error(Rep.ERR_POLICY, "TLS not configured")
            elif option in (Opt.INFO, Opt.GO):
                return self._info(option, data)
            elif option == Opt.STRUCTURED_REPLY:
                if self.structured:
                    raise OptionInvalid("structured reply already negotiated")
                self.structured = True
                self._reply(Rep.ACK)
            elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
                self._meta_context(option, data)
            else:
                if not self.fixed:
                    raise ProtocolError(f"Unsupported option {option} in non-fixed handshake")
                self._reply_error(
                    Rep.ERR_UNSUP, f"Unsupported option {option} ({option_name(option)})"
                )
        except OptionInvalid as exc:
            self._reply_error(Rep.ERR_INVALID, str(exc))
        return None

    def _export_name(self, data: bytes) -> HandshakeEvent:
        name = data.decode("utf-8", "replace")
        export = self.catalog.lookup(name) if len(data) <= MAX_STRING else None
        if export is None:
            # No error path exists for NBD_OPT_EXPORT_NAME: just hang up.
            return HandshakeClosed(f"export '{name}' not present", graceful=True)
        flags = export.client_flags(self.structured)
        self._out += _EXPORT_REPLY.pack(export.size, flags)
        if not self.no_zeroes:
            self._out += bytes(124)
        return HandshakeDone(
            export, self.structured, self._selected_contexts(export), flags, self._leftover()
        )

    def _leftover(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _selected_contexts(self, export: ExportDescription) -> dict[int, str]:
        if self.meta is None or self.meta[0] != export.name:
            return {}
        return {cid: name for cid, name in self.meta[1].items() if name in export.contexts}

    def _list(self) -> None:
        for name, description in self.catalog.listing():
            raw = name.encode("utf-8", "replace")
            self._reply(
                Rep.SERVER, _U32.pack(len(raw)) + raw + description.encode("utf-8", "replace")
            )
        self._reply(Rep.ACK)

    def _info(self, option: int, data: bytes) -> HandshakeEvent | None:
        cursor = OptionReader(option, data)
        raw = cursor.name()
        requests = [cursor.u16() for _ in range(cursor.u16())]
        cursor.end()
        export = self.catalog.lookup(raw.decode("utf-8", "replace"))
        if export is None:
            self._reply_error(Rep.ERR_UNKNOWN, not_present(raw))
            return None
        if Info.NAME in requests:
            self._reply(Rep.INFO, _U16.pack(Info.NAME) + export.name.encode("utf-8", "replace"))
        if export.description:
            self._reply(
                Rep.INFO,
                _U16.pack(Info.DESCRIPTION) + export.description.encode("utf-8", "replace"),
            )
        # The minimum is 1 for GO without a BLOCK_SIZE request, else the
        # export's real alignment; qmpd's nodes take byte-granular requests.
        minimum = export.min_block
        if option == Opt.GO and Info.BLOCK_SIZE not in requests:
            minimum = 1
        elif option == Opt.INFO and Info.BLOCK_SIZE not in requests and minimum > 1:
            self._reply_error(
                Rep.ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use this export"
            )
            return None
        self._reply(
            Rep.INFO,
            _U16.pack(Info.BLOCK_SIZE)
            + struct.pack(">III", minimum, max(minimum, export.preferred_block), export.max_block),
        )
        flags = export.client_flags(self.structured)
        self._reply(Rep.INFO, _U16.pack(Info.EXPORT) + _EXPORT_REPLY.pack(export.size, flags))
        self._reply(Rep.ACK)
        if option == Opt.GO:
            return HandshakeDone(
                export, self.structured, self._selected_contexts(export), flags, self._leftover()
            )
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        is_set = option == Opt.SET_META_CONTEXT
        if is_set:
            self.meta = None  # every SET replaces the selection, even one that fails
        if is_set and not self.structured:
            raise OptionInvalid(
                f"request option '{option_name(option)}' when structured reply is not "
                "negotiated"
            )
        # As QEMU: the export first, then the queries; bytes after the last
        # query are ignored.
        cursor = OptionReader(option, data)
        raw = cursor.name()
        export = self.catalog.lookup(raw.decode("utf-8", "replace"))
        if export is None:
            self._reply_error(Rep.ERR_UNKNOWN, not_present(raw))
            return
        count = cursor.u32()
        raw_queries = [cursor.query() for _ in range(count)]
        queries = [q.decode("utf-8", "replace") for q in raw_queries if q is not None]
        matched = match_contexts(export.contexts, queries, listing=not is_set)
        selected: dict[int, str] = {}
        for context in matched:
            cid = CONTEXT_IDS[context]
            selected[cid] = context
            # LIST replies carry id 0, as QEMU's.
            self._reply(Rep.META_CONTEXT, _U32.pack(cid if is_set else 0) + context.encode())
        self._reply(Rep.ACK)
        if is_set:
            self.meta = (export.name, selected)


def match_contexts(available: Sequence[str], queries: Sequence[str], listing: bool) -> list[str]:
    """The contexts a LIST (``listing``) or SET query list selects, in ``available``
    order (QEMU's: base first).

    LIST with no query lists everything, and a bare namespace (``base:``,
    ``qemu:``) lists that namespace; SET selects exact leaf names only.
    Queries for namespaces the server does not know are ignored.
    """
    if listing and not queries:
        return list(available)
    return [
        context for context in available
        if any(q == context or (listing and q == context.split(":", 1)[0] + ":")
               for q in queries)
    ]


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
        if kind == Cmd.DISC:
            self.finished = True
            return Disconnect()
        self._small_window = kind == Cmd.WRITE and length >= 16 * self.SMALL_WINDOW
        if kind == Cmd.WRITE:
            if length > self.max_payload:
                self.finished = True
                return Rejected(
                    request, Errno.EINVAL,
                    f"len ({length}) is larger than max len ({self.max_payload})", fatal=True,
                )
            payload = bytearray(length)
            have = min(self._end - start, length)
            payload[:have] = memoryview(buf)[start : start + have]
            self._start = start + have
            if have == length:
                request.payload = payload
                return self.validate(request)
            self._header = request
            self._payload = payload
            self._filled = have
            return NEED_DATA
        return self.validate(request)

    def validate(self, request: Request) -> Request | Rejected:
        """QEMU's checks, in QEMU's order; the request itself when it passes."""
        kind = request.type
        try:
            cmd = Cmd(kind)
        except ValueError:
            return Rejected(request, Errno.EINVAL, f"invalid request type ({kind}) received")
        length = request.length
        if cmd in _BIG_PAYLOAD and length > self.max_payload:
            return Rejected(
                request, Errno.EINVAL, f"len ({length}) is larger than max len ({self.max_payload})"
            )
        if self.read_only and cmd in _WRITING:
            return Rejected(request, Errno.EINVAL, "Export is read-only")
        if cmd in _RANGED:
            size = self.size()
            if request.offset > size or length > size - request.offset:
                return Rejected(
                    request, Errno.EINVAL,
                    f"operation past EOF; From: {request.offset}, Len: {length}, Size: {size}",
                )
        allowed = int(_ALLOWED_FLAGS[cmd])
        if cmd == Cmd.READ and not self.structured:
            allowed &= ~int(CmdFlag.DF)
        if request.flags & ~allowed:
            return Rejected(
                request, Errno.EINVAL,
                f"unsupported flags for command {COMMAND_NAMES[cmd]} (got 0x{request.flags:x})",
            )
        if cmd == Cmd.BLOCK_STATUS:
            if not self.structured or not self.contexts:
                return Rejected(request, Errno.EINVAL, "CMD_BLOCK_STATUS not negotiated")
            if not length:
                return Rejected(request, Errno.EINVAL, "need non-zero length")
        return request


@dataclass(frozen=True, slots=True)
class FileSpan:
    """Reply data that is to be sent straight from a host file (sendfile).

    The protocol only needs its length; the server moves the bytes.
    """

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


#: What a READ reply's data may be: bytes, a span of a host file, or None
#: for a range that reads as zeros.
ReadData = bytes | FileSpan | None
#: One buffer of a reply, as the server sends it.
ReplyPart = bytes | FileSpan


# --- reply encoding (server side) ---------------------------------------------------------


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(cookie: int, kind: int, length: int, done: bool) -> bytes:
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE if done else 0, kind, cookie, length)


def data_chunk_header(cookie: int, offset: int, data_length: int, done: bool) -> bytes:
    """Header and offset of an OFFSET_DATA chunk; the data follows."""
    return chunk_header(cookie, ReplyType.OFFSET_DATA, 8 + data_length, done) + _U64.pack(offset)


def hole_chunk(cookie: int, offset: int, size: int, done: bool) -> bytes:
    return chunk_header(cookie, ReplyType.OFFSET_HOLE, 12, done) + _HOLE.pack(offset, size)


def error_chunk(cookie: int, error: int, message: str) -> bytes:
    raw = message.encode("utf-8", "replace")[:MAX_STRING]
    return chunk_header(cookie, ReplyType.ERROR, 6 + len(raw), True) + _ERROR_HEAD.pack(
        error, len(raw)
    ) + raw


def block_status_chunk(
    cookie: int, context_id: int, extents: Sequence[tuple[int, int]], done: bool
) -> bytes:
    body = _U32.pack(context_id) + b"".join(_EXTENT.pack(n, f) for n, f in extents)
    return chunk_header(cookie, ReplyType.BLOCK_STATUS, len(body), done) + body


def none_chunk(cookie: int) -> bytes:
    return chunk_header(cookie, ReplyType.NONE, 0, True)


class Replies:
    """Reply encoders for one connection: simple or structured as negotiated.

    As QEMU's server: successful commands other than READ and BLOCK_STATUS
    get a simple reply; errors are an ERROR chunk (with the message) once
    structured replies are negotiated, a simple reply otherwise.
    """

    def __init__(self, structured: bool) -> None:
        self.structured = structured

    def ok(self, cookie: int) -> bytes:
        return simple_reply(cookie)

    def error(self, cookie: int, error: int, message: str) -> bytes:
        if self.structured:
            return error_chunk(cookie, error, message)
        return simple_reply(cookie, error)

    def read_parts(
        self, cookie: int, offset: int, pieces: Sequence[tuple[int, int, ReadData]]
    ) -> list[ReplyPart]:
        """The buffers of a successful READ reply.

        ``pieces`` covers the request in order: ``(offset, length, data)``,
        with ``data`` None for a range that reads as zeros.
        """
        out: list[ReplyPart]
        if not self.structured:
            out = [simple_reply(cookie)]
            for _off, length, data in pieces:
                out.append(data if data is not None else bytes(length))
            return out
        if not pieces:
            return [none_chunk(cookie)]
        out = []
        last = len(pieces) - 1
        for index, (off, length, data) in enumerate(pieces):
            done = index == last
            if data is None:
                out.append(hole_chunk(cookie, off, length, done))
            else:
                out.append(data_chunk_header(cookie, off, length, done))
                out.append(data)
        return out

    def block_status(
        self, cookie: int, per_context: Sequence[tuple[int, Sequence[tuple[int, int]]]]
    ) -> bytes:
        last = len(per_context) - 1
        return b"".join(
            block_status_chunk(cookie, cid, extents, index == last)
            for index, (cid, extents) in enumerate(per_context)
        )


def merge_extents(extents: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join neighbouring extents with equal flags (lengths stay below 2^32)."""
    out: list[tuple[int, int]] = []
    for length, flags in extents:
        if out and out[-1][1] == flags and out[-1][0] + length < (1 << 32):
            out[-1] = (out[-1][0] + length, flags)
        else:
            out.append((length, flags))
    return out


# --- client side --------------------------------------------------------------------------


def client_flags_bytes(no_zeroes: bool = True) -> bytes:
    flags = ClientFlag.FIXED_NEWSTYLE | (ClientFlag.NO_ZEROES if no_zeroes else 0)
    return _U32.pack(flags)


def option_request(option: int, data: bytes = b"") -> bytes:
    return _OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def info_request_data(name: str, infos: Sequence[int]) -> bytes:
    raw = name.encode()
    return (
        _U32.pack(len(raw)) + raw + _U16.pack(len(infos)) + b"".join(_U16.pack(i) for i in infos)
    )


def meta_request_data(name: str, queries: Sequence[str]) -> bytes:
    raw = name.encode()
    parts = [_U32.pack(len(raw)), raw, _U32.pack(len(queries))]
    for query in queries:
        q = query.encode()
        parts += [_U32.pack(len(q)), q]
    return b"".join(parts)


def request_header(
    kind: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    return _REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)


@dataclass
class OptionReply:
    option: int
    reply: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.reply & _REP_ERR)


@dataclass
class ReplyHeader:
    """A parsed simple reply or structured chunk header (client side)."""

    structured: bool
    cookie: int
    error: int = 0
    flags: int = 0
    type: int = 0
    length: int = 0


def parse_greeting(data: bytes) -> int:
    """The server's handshake flags; ProtocolError for a server we cannot talk to."""
    magic, opt_magic, flags = _GREETING.unpack(data)
    if magic != NBDMAGIC:
        raise ProtocolError("server did not send NBDMAGIC")
    if opt_magic != IHAVEOPT:
        raise ProtocolError("server does not speak the newstyle protocol")
    value: int = flags
    return value


def parse_option_reply_header(data: bytes) -> tuple[int, int, int]:
    magic, option, reply, length = _OPTION_REPLY.unpack(data)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError("bad option reply magic")
    return option, reply, length


OPTION_REPLY_HEADER_SIZE: Final = _OPTION_REPLY.size


def parse_reply_magic(data: bytes) -> int:
    value: int = _U32.unpack_from(data)[0]
    return value


def parse_simple_reply(data: bytes) -> ReplyHeader:
    magic, error, cookie = _SIMPLE_REPLY.unpack(data)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError("bad simple reply magic")
    return ReplyHeader(False, cookie, error=error)


def parse_chunk_header(data: bytes) -> ReplyHeader:
    magic, flags, kind, cookie, length = _CHUNK.unpack(data)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError("bad structured reply magic")
    return ReplyHeader(True, cookie, flags=flags, type=kind, length=length)


def parse_error_payload(payload: bytes) -> tuple[int, str]:
    error, length = _ERROR_HEAD.unpack_from(payload)
    return error, payload[6 : 6 + length].decode("utf-8", "replace")


def parse_extents(payload: bytes) -> tuple[int, list[tuple[int, int]]]:
    context = _U32.unpack_from(payload)[0]
    extents = [_EXTENT.unpack_from(payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]
    return context, extents


def parse_export_info(data: bytes) -> tuple[int, int]:
    size, flags = _EXPORT_REPLY.unpack(data)
    return size, flags


@dataclass
class ExportInfo:
    """What a client learned about an export (client side of INFO/GO)."""

    name: str
    size: int = 0
    flags: int = 0
    description: str = ""
    canonical_name: str | None = None
    block_size: tuple[int, int, int] | None = None
    contexts: dict[int, str] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFlag.READ_ONLY)
