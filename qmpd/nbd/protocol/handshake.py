"""The fixed newstyle handshake: the server's state machine, the client's encoders and parsers.

The server side (:class:`ServerHandshake`) is fed the client's bytes and
hands back :class:`HandshakeDone` or :class:`HandshakeClosed`, and with TLS
required :class:`StartTls` (the I/O layer puts the connection under TLS,
then feeds the decrypted bytes); option payloads are read field by field as
QEMU 7.2 reads them (:mod:`.options`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from qmpd.nbd.protocol.constants import (
    BASE_ALLOCATION,
    CONTEXT_IDS,
    DIRTY_BITMAP_ID,
    DIRTY_BITMAP_PREFIX,
    IHAVEOPT,
    MAX_BUFFERED_OPTION,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TFlag,
)
from qmpd.nbd.protocol.options import (
    OptionInvalid,
    OptionReader,
    not_present,
    option_name,
    unexpected_length,
)
from qmpd.nbd.protocol.sansio import NEED_DATA, NeedData, ProtocolError

_GREETING = struct.Struct(">QQH")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_EXPORT_REPLY = struct.Struct(">QH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


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
    #: The negotiation failed (QEMU logs "option negotiation failed: <reason>")
    #: though the output is still sent before closing.
    failed: bool = False


@dataclass(frozen=True)
class StartTls:
    """The client asked for TLS and got its ACK: once that is sent, the I/O
    layer makes the TLS handshake on the connection, starting with ``leftover``
    (bytes the client sent after the option, the start of its TLS hello), and
    feeds every decrypted byte afterwards.  Negotiation then goes on."""

    leftover: bytes


HandshakeEvent = HandshakeDone | HandshakeClosed | StartTls


class _HsState(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTION_HEADER = "option-header"
    OPTION_DATA = "option-data"
    OPTION_SKIP = "option-skip"
    #: Skipping the payload of an option refused before TLS.
    PRE_TLS_SKIP = "pre-tls-skip"
    DONE = "done"


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


class ServerHandshake:
    """The server's side of the fixed newstyle handshake.

    Construct it, send :meth:`data_to_send` (the greeting), then feed what
    the client sends and pull events until :data:`NEED_DATA`.  After a
    :class:`HandshakeDone` or :class:`HandshakeClosed` the machine is finished;
    send the remaining output first.

    With ``tls`` (the server has TLS credentials) every option but STARTTLS
    is refused with NBD_REP_ERR_TLS_REQD until the client has sent STARTTLS
    (which yields :class:`StartTls`), as QEMU 7.2: exports are neither
    listed nor opened in the clear.
    """

    def __init__(self, catalog: ExportCatalog, tls: bool = False) -> None:
        self.catalog = catalog
        self.tls = tls
        #: STARTTLS was accepted: what follows comes over TLS.
        self.tls_started = False
        #: The last option refused for want of TLS (logged when the client gives up).
        self.refused_before_tls: str | None = None
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
                self._option, self._length = option, length
                if self.tls and not self.tls_started:
                    self._before_tls(option, length)
                elif length > MAX_BUFFERED_OPTION:
                    if option == Opt.EXPORT_NAME:
                        raise ProtocolError("export name too long")
                    self._skip = length
                    self.state = _HsState.OPTION_SKIP
                else:
                    self.state = _HsState.OPTION_DATA
            elif state is _HsState.OPTION_SKIP:
                if not self._skipped(buf):
                    return NEED_DATA
                self.state = _HsState.OPTION_HEADER
                self._reply_error(Rep.ERR_TOO_BIG, "option too long")
            elif state is _HsState.PRE_TLS_SKIP:
                if not self._skipped(buf):
                    return NEED_DATA
                self.state = _HsState.OPTION_HEADER
                event = self._refuse_before_tls(self._option, self._length)
                if event is not None:
                    self.state = _HsState.DONE if not isinstance(event, StartTls) \
                        else _HsState.OPTION_HEADER
                    return event
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

    def _skipped(self, buf: bytearray) -> bool:
        """Drop what is left of an option not read into memory; True once all of it went."""
        n = min(self._skip, len(buf))
        del buf[:n]
        self._skip -= n
        return not self._skip

    def _reply_error(self, reply: Rep, message: str) -> None:
        self._reply(reply, message.encode("utf-8", "replace"))

    # --- before TLS (QEMU 7.2's nbd_negotiate_options with tlscreds) ----------------------

    def _before_tls(self, option: int, length: int) -> None:
        """An option header while TLS is required: fatal ones at once, else skip the payload."""
        if not self.fixed:
            raise ProtocolError(f"Unsupported option 0x{option:x}")
        if option == Opt.EXPORT_NAME:
            # No error reply exists for EXPORT_NAME: hang up.
            raise ProtocolError(f"Option 0x{option:x} not permitted before TLS")
        self._skip = length
        self.state = _HsState.PRE_TLS_SKIP

    def _refuse_before_tls(self, option: int, length: int) -> HandshakeEvent | None:
        if option == Opt.STARTTLS:
            if length:
                text = unexpected_length(option)
                self._reply_error(Rep.ERR_INVALID, text)
                return HandshakeClosed(text, graceful=True, failed=True)
            self._reply(Rep.ACK)
            self.tls_started = True
            return StartTls(self._leftover())
        text = f"Option 0x{option:x} not permitted before TLS"
        self._reply_error(Rep.ERR_TLS_REQD, text)
        if option == Opt.ABORT:
            # A client that gave up after a refusal failed for want of TLS
            # (QEMU logs nothing here; qmpd says why).
            refused = self.refused_before_tls
            return HandshakeClosed(refused or "client sent NBD_OPT_ABORT", graceful=True,
                                   failed=refused is not None)
        self.refused_before_tls = text
        return None

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
                if self.tls:
                    self._reply_error(Rep.ERR_INVALID, "TLS already enabled")
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
            cid = context_id(export.contexts, context)
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
    ``qemu:``) or ``qemu:dirty-bitmap:`` lists what it starts; SET selects
    exact leaf names only.  Queries for namespaces the server does not know
    are ignored.
    """
    if listing and not queries:
        return list(available)
    return [
        context for context in available
        if any(q == context or (listing and q.endswith(":") and context.startswith(q)
                                and (q.count(":") == 1 or q == DIRTY_BITMAP_PREFIX))
               for q in queries)
    ]


def context_id(available: Sequence[str], context: str) -> int:
    """The id QEMU gives ``context``: fixed ones, then the export's bitmaps in order."""
    fixed = CONTEXT_IDS.get(context)
    if fixed is not None:
        return fixed
    bitmaps = [c for c in available if c.startswith(DIRTY_BITMAP_PREFIX)]
    return DIRTY_BITMAP_ID + bitmaps.index(context)


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


@dataclass
class OptionReply:
    option: int
    reply: int
    data: bytes


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
