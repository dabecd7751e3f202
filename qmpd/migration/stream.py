"""QEMU 7.2's migration stream, as a ``-M none`` machine sends and accepts it.

Sans-IO: :class:`StreamWriter` returns bytes, :class:`StreamReader` takes bytes
and returns events.  Neither touches a socket, a file or the event loop.

What is on the wire
===================

Everything here was observed on ``qemu-system-x86_64 -M none -nodefaults``
7.2 (captures and the destination's answers to broken streams are kept in
``tests/migration_data/``; ``README.md`` there lists the facts).  All integers
are big-endian.  A complete stream, in order:

* ``QEVM`` magic and version 3;
* the configuration section: byte 0x07, be32 length, machine type ``none``, then
  VMState subsections (``configuration/capabilities`` only when x-ignore-shared
  is on, ``configuration/target-page-bits`` and ``configuration/uuid`` never on
  x86 unless configured);
* commands (0x08, be16 command, be16 length, data): OPEN_RETURN_PATH and PING 1
  when return-path (or postcopy-ram) is on, POSTCOPY_ADVISE when dirty-bitmaps
  (empty advise) or postcopy-ram (16 bytes) is on;
* ``ram`` section START (id 2, version 4): be64 ``0|MEM_SIZE`` (no RAM blocks),
  be64 ``EOS``; the ``dirty-bitmap`` START (id 3) with just its EOS flag when
  dirty-bitmaps is on;
* ``ram`` section END: be64 ``EOS``;
* ``timer`` FULL (id 0, version 2): int64 cpu_ticks_offset, 8 unused bytes,
  int64 cpu_clock_offset -- the only bytes that change from run to run;
* ``globalstate`` FULL (id 4, version 1): be32 strlen+1, the run state name in a
  100-byte NUL-padded buffer;
* every START/PART/END/FULL ends with a footer: 0x7e and the be32 section id;
* EOF (0x00), then 0x06, be32 length and the JSON VM description.

The reader
==========

The destination side of QEMU reads with blocking calls that, at the end of the
stream, return zeros and set a sticky I/O error; which error text a truncated
stream gets therefore depends on the exact offset.  :class:`StreamReader` parses
incrementally (it waits for more bytes instead of blocking) and, once
:meth:`StreamReader.close` says no more bytes will come, finishes the parse with
exactly those end-of-stream semantics, so that every failure carries the lines
QEMU 7.2 prints (see :class:`MigrationStreamError`).  It accepts what a QEMU 7.2
``-M none`` destination accepts, including oddities (sections in any order, a
missing ``globalstate`` meaning "running", trailing bytes after the VM
description, a missing or cut VM description), and refuses the rest with QEMU's
words.  Deliberate differences from QEMU, all refusals of things a ``-M none``
QEMU would only get from a peer using features qmpd does not have: postcopy
(LISTEN/RUN/DISCARD after an advise, PACKAGED), COLO (QEMU hangs; qmpd refuses),
dirty bitmaps that carry data, and the ``timer/icount`` subsection; their texts
start with ``qmpd:``.
"""

from __future__ import annotations

import errno
import struct
import uuid as _uuid
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

from qmpd.runstate import RunState

__all__ = [
    "EOF",
    "MAGIC",
    "MIGRATION_CAPABILITIES",
    "VERSION",
    "VM_DESCRIPTION",
    "Command",
    "Complete",
    "Configuration",
    "Event",
    "GlobalState",
    "Header",
    "MigCommand",
    "MigrationStreamError",
    "ParsedStream",
    "RPMessage",
    "RPMessageType",
    "ReturnPathReader",
    "Section",
    "SectionType",
    "StreamReader",
    "StreamWarning",
    "StreamWriter",
    "TimerState",
    "VMDescription",
    "build_stream",
    "encode_rp_message",
    "parse_stream",
]

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
MACHINE_TYPE = "none"
TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS
#: QEMU's own program name, used when rendering stderr lines for comparison.
QEMU_PROG = "qemu-system-x86_64"

#: MigrationCapability of QEMU 7.2, in QAPI order.
MIGRATION_CAPABILITIES: tuple[str, ...] = (
    "xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "compress", "events",
    "postcopy-ram", "x-colo", "release-ram", "block", "return-path",
    "pause-before-switchover", "multifd", "dirty-bitmaps", "postcopy-blocktime",
    "late-block-activate", "x-ignore-shared", "validate-uuid", "background-snapshot",
    "zero-copy-send", "postcopy-preempt",
)
#: Capabilities whose setting must agree on both sides (checked on load).
_VALIDATED_CAPABILITIES = ("x-ignore-shared",)

#: The JSON VM description a ``-M none`` QEMU 7.2 appends after EOF, byte for
#: byte (it never varies: only timer and globalstate are VMState devices).
VM_DESCRIPTION = (
    b'{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, '
    b'"vmsd_name": "timer", "version": 2, "fields": [{"name": "cpu_ticks_offset", '
    b'"type": "int64", "size": 8}, {"name": "unused", "type": "unused_buffer", '
    b'"size": 8}, {"name": "cpu_clock_offset", "type": "int64", "size": 8}]}, '
    b'{"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", '
    b'"version": 1, "fields": [{"name": "size", "type": "uint32", "size": 4}, '
    b'{"name": "runstate", "type": "buffer", "size": 100}]}]}'
)

#: Largest VM description kept for the VMDescription event; longer ones are
#: read and dropped, as QEMU drops them all.
MAX_VM_DESCRIPTION = 1 << 20


class SectionType(IntEnum):
    """The byte that starts each top-level item of the stream."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class MigCommand(IntEnum):
    """Commands (type 0x08) of QEMU 7.2; 11 and above are unknown there."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10


_COMMAND_END = 11
#: Commands with a fixed data length; QEMU checks it before handling them.
_COMMAND_LENGTHS = {
    MigCommand.OPEN_RETURN_PATH: 0,
    MigCommand.PING: 4,
    MigCommand.POSTCOPY_LISTEN: 0,
    MigCommand.POSTCOPY_RUN: 0,
    MigCommand.PACKAGED: 4,
    MigCommand.ENABLE_COLO: 0,
    MigCommand.POSTCOPY_RESUME: 0,
}


class RPMessageType(IntEnum):
    """Return-path messages (destination to source): be16 type, be16 length, data."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6


# Section identities of a -M none QEMU 7.2: (idstr, section id, version).  The
# ids are given out at registration, in this order.
_TIMER = ("timer", 0, 2)
_BLOCK = ("block", 1, 1)
_RAM = ("ram", 2, 4)
_DIRTY_BITMAP = ("dirty-bitmap", 3, 1)
_GLOBALSTATE = ("globalstate", 4, 1)

# ram section flags (low bits of each be64; the rest is an address).
_RAM_ZERO = 0x02
_RAM_MEM_SIZE = 0x04
_RAM_PAGE = 0x08
_RAM_EOS = 0x10
_RAM_CONTINUE = 0x20
_RAM_XBZRLE = 0x40
_RAM_HOOK = 0x80
_RAM_COMPRESS_PAGE = 0x100
_RAM_PAGE_FLAGS = _RAM_ZERO | _RAM_PAGE | _RAM_COMPRESS_PAGE | _RAM_XBZRLE

# block section flags (low 9 bits of each be64).
_BLK_DEVICE_BLOCK = 0x01
_BLK_EOS = 0x02
_BLK_PROGRESS = 0x04

_DIRTY_BITMAP_EOS = 0x01

_GLOBALSTATE_LEN = 100
#: An instance id that matches any instance (QEMU's VMSTATE_INSTANCE_ID_ANY).
_INSTANCE_ID_ANY = 0xFFFFFFFF

_STRERROR = {
    errno.EPERM: "Operation not permitted",
    errno.ENOENT: "No such file or directory",
    errno.EIO: "Input/output error",
    errno.EINVAL: "Invalid argument",
    errno.ERANGE: "Numerical result out of range",
    errno.ENOTSUP: "Operation not supported",
}


def _s32(value: int) -> int:
    """A uint32 as C's ``%d`` prints it."""
    return value - (1 << 32) if value & 0x80000000 else value


def _cstr(raw: bytes) -> str:
    """A C string out of a buffer: up to the first NUL, bytes kept (surrogateescape)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _strncmp_equal(a: bytes, b: bytes, n: int) -> bool:
    """C's ``strncmp(a, b, n) == 0``, with missing bytes read as NUL."""
    for i in range(n):
        ca = a[i] if i < len(a) else 0
        cb = b[i] if i < len(b) else 0
        if ca != cb:
            return False
        if ca == 0:
            return True
    return True


# --------------------------------------------------------------------------
# Values carried by the stream
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TimerState:
    """The ``timer`` section: the guest clocks' offsets at the moment of saving.

    Both are the time the VM has spent running: ``cpu_clock_offset`` in
    nanoseconds, ``cpu_ticks_offset`` in host ticks (QEMU uses the TSC; any
    monotonic count will do).  A VM that never ran (prelaunch) sends zeros.
    """

    cpu_ticks_offset: int = 0
    cpu_clock_offset: int = 0

    def encode(self) -> bytes:
        return struct.pack(">q8xq", self.cpu_ticks_offset, self.cpu_clock_offset)

    @classmethod
    def decode(cls, payload: bytes, version: int = 2) -> TimerState:
        """From a timer section's payload (version 1 has no clock offset)."""
        ticks = struct.unpack_from(">q", payload, 0)[0]
        clock = struct.unpack_from(">q", payload, 16)[0] if version >= 2 else 0
        return cls(ticks, clock)


# --------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """Magic and version were right."""

    version: int


@dataclass(frozen=True)
class Configuration:
    """The configuration section, with whatever subsections it had."""

    machine_type: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] | None = None
    uuid: bytes | None = None


@dataclass(frozen=True)
class Command:
    """A command the destination accepted (OPEN_RETURN_PATH, PING, ...)."""

    command: int
    data: bytes

    @property
    def name(self) -> str:
        try:
            return MigCommand(self.command).name
        except ValueError:
            return f"0x{self.command:x}"

    @property
    def ping_value(self) -> int:
        """For PING: the value to send back in a PONG."""
        return int(struct.unpack(">I", self.data[:4].ljust(4, b"\0"))[0])


@dataclass(frozen=True)
class Section:
    """One section loaded and its footer checked.

    For PART and END, ``idstr``, ``instance_id`` and ``version_id`` come from
    the section's START.  ``payload`` is everything between the section header
    and its footer.
    """

    type: SectionType
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    payload: bytes


@dataclass(frozen=True)
class GlobalState:
    """The source's run state, from the ``globalstate`` section."""

    runstate: str


@dataclass(frozen=True)
class StreamWarning:
    """A line QEMU prints on stderr without failing (``warning:`` included when QEMU writes it)."""

    message: str


@dataclass(frozen=True)
class EOF:
    """The device state is complete (QEMU_VM_EOF)."""


@dataclass(frozen=True)
class VMDescription:
    """The JSON description after EOF, complete (QEMU reads it and drops it)."""

    data: bytes
    size: int


@dataclass(frozen=True)
class Complete:
    """The destination would now finish the incoming migration successfully."""


Event = (
    Header | Configuration | Command | Section | GlobalState | StreamWarning | EOF
    | VMDescription | Complete
)


class MigrationStreamError(Exception):
    """The destination refuses the stream.

    ``lines`` are the lines QEMU 7.2 prints on stderr for this failure, in order,
    without the ``qemu-system-x86_64: `` prefix (the last one is always
    ``load of migration failed: <strerror>``); ``str()`` joins them.  QEMU's
    block-migration loader prints two of its lines without the prefix: those
    indices are in ``unprefixed``.  ``errno`` is the (positive) error number;
    ``offset`` is how many bytes the destination had consumed when it gave up.
    """

    def __init__(self, err: int, lines: Iterable[str], *, offset: int = 0,
                 unprefixed: Iterable[int] = ()) -> None:
        self.errno = err
        self.strerror = _STRERROR.get(err, f"Unknown error {err}")
        self.lines = (*lines, f"load of migration failed: {self.strerror}")
        self.unprefixed = frozenset(unprefixed)
        self.offset = offset
        super().__init__("\n".join(self.lines))

    @property
    def reason(self) -> str:
        """The first, most specific line."""
        return self.lines[0]

    def render(self, prog: str = QEMU_PROG) -> str:
        """The stderr text, as ``prog`` would print it."""
        return "".join(
            (line if i in self.unprefixed else f"{prog}: {line}") + "\n"
            for i, line in enumerate(self.lines)
        )


class _Fail(Exception):
    """Internal: a load step failed; lines gather on the way up like QEMU's prints."""

    def __init__(self, err: int, *lines: str, raw: bool = False) -> None:
        super().__init__(err)
        self.err = err
        self.lines = list(lines)
        self.unprefixed: set[int] = set(range(len(lines))) if raw else set()

    def add(self, line: str) -> _Fail:
        self.lines.append(line)
        return self


# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


def _be32(value: int) -> bytes:
    return struct.pack(">I", value)


def _be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def _section_header(kind: SectionType, ident: tuple[str, int, int]) -> bytes:
    name, section_id, version = ident
    raw = name.encode()
    return bytes([kind]) + _be32(section_id) + bytes([len(raw)]) + raw + _be32(0) + _be32(version)


def _footer(section_id: int) -> bytes:
    return bytes([SectionType.FOOTER]) + _be32(section_id)


def _command(cmd: MigCommand, data: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + struct.pack(">HH", cmd, len(data)) + data


def _globalstate_payload(runstate: str) -> bytes:
    raw = runstate.encode()
    if len(raw) >= _GLOBALSTATE_LEN:
        raise ValueError(f"run state name too long: {runstate!r}")
    return _be32(len(raw) + 1) + raw.ljust(_GLOBALSTATE_LEN, b"\0")


class StreamWriter:
    """Produces what a ``-M none`` QEMU 7.2 source sends, in its two phases.

    :meth:`setup` is what QEMU writes when the migration starts (state
    ``setup``/``active``); :meth:`complete` is what it writes at switchover,
    after the VM has stopped and the block nodes have been inactivated.  The
    capabilities that change the stream are return-path, postcopy-ram,
    dirty-bitmaps and x-ignore-shared; the others change nothing on the wire.
    """

    def __init__(self, capabilities: Mapping[str, bool] | None = None) -> None:
        caps = dict(capabilities or {})
        self.postcopy_ram = caps.get("postcopy-ram", False)
        self.return_path = caps.get("return-path", False) or self.postcopy_ram
        self.dirty_bitmaps = caps.get("dirty-bitmaps", False)
        self.x_ignore_shared = caps.get("x-ignore-shared", False)

    def header(self) -> bytes:
        """Magic, version and the configuration section."""
        out = _be32(MAGIC) + _be32(VERSION)
        name = MACHINE_TYPE.encode()
        out += bytes([SectionType.CONFIGURATION]) + _be32(len(name)) + name
        if self.x_ignore_shared:
            sub = b"configuration/capabilities"
            cap = b"x-ignore-shared"
            out += (bytes([SectionType.SUBSECTION, len(sub)]) + sub + _be32(1)
                    + _be32(1) + bytes([len(cap)]) + cap)
        return out

    def setup(self) -> bytes:
        """Header, configuration, commands and the START sections."""
        out = self.header()
        if self.return_path:
            out += _command(MigCommand.OPEN_RETURN_PATH) + _command(MigCommand.PING, _be32(1))
        if self.postcopy_ram:
            # RAM page-size summary (no RAM blocks: 0), then the target page size.
            out += _command(MigCommand.POSTCOPY_ADVISE, _be64(0) + _be64(TARGET_PAGE_SIZE))
        elif self.dirty_bitmaps:
            out += _command(MigCommand.POSTCOPY_ADVISE)
        out += (_section_header(SectionType.START, _RAM) + _be64(0 | _RAM_MEM_SIZE)
                + _be64(_RAM_EOS) + _footer(_RAM[1]))
        if self.dirty_bitmaps:
            out += (_section_header(SectionType.START, _DIRTY_BITMAP)
                    + bytes([_DIRTY_BITMAP_EOS]) + _footer(_DIRTY_BITMAP[1]))
        return out

    def complete(self, runstate: str, timer: TimerState | None = None) -> bytes:
        """The END of ram, the device state, EOF and the VM description.

        ``runstate`` is the state the source was in before switchover (QEMU
        records it before stopping): ``running``, ``paused``, ``prelaunch``...
        """
        timer = timer or TimerState()
        ram_id = _RAM[1]
        out = bytes([SectionType.END]) + _be32(ram_id) + _be64(_RAM_EOS) + _footer(ram_id)
        out += _section_header(SectionType.FULL, _TIMER) + timer.encode() + _footer(_TIMER[1])
        out += (_section_header(SectionType.FULL, _GLOBALSTATE)
                + _globalstate_payload(runstate) + _footer(_GLOBALSTATE[1]))
        out += bytes([SectionType.EOF])
        out += bytes([SectionType.VMDESCRIPTION]) + _be32(len(VM_DESCRIPTION)) + VM_DESCRIPTION
        return out


def build_stream(runstate: str, timer: TimerState | None = None, *,
                 capabilities: Mapping[str, bool] | None = None) -> bytes:
    """A whole stream as QEMU 7.2 ``-M none`` sends it from ``runstate``."""
    writer = StreamWriter(capabilities)
    return writer.setup() + writer.complete(runstate, timer)


def encode_rp_message(kind: RPMessageType | int, data: bytes = b"") -> bytes:
    """One return-path message; SHUT and PONG carry a be32."""
    return struct.pack(">HH", kind, len(data)) + data


# --------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------

@dataclass
class _Entry:
    """A section the destination knows, with what the last START told it."""

    idstr: str
    version: int
    load_section_id: int = 0
    load_version_id: int = 0


@dataclass(frozen=True)
class _Field:
    name: str
    kind: str  # "u32", "i64", "bytes", "vbuffer", "caps"
    size: int = 0
    version: int = 0


@dataclass(frozen=True)
class _Vmsd:
    name: str
    version: int
    minimum: int
    fields: tuple[_Field, ...]
    subsections: tuple[_Vmsd, ...] = ()


_CONFIG_SUBSECTIONS = (
    _Vmsd("configuration/target-page-bits", 1, 1, (_Field("target_page_bits", "u32"),)),
    _Vmsd("configuration/capabilities", 1, 1,
          (_Field("caps_count", "u32"), _Field("capabilities", "caps"))),
    _Vmsd("configuration/uuid", 1, 1, (_Field("uuid.data", "bytes", 16),)),
)
_CONFIGURATION = _Vmsd("configuration", 0, 0,
                       (_Field("len", "u32"), _Field("name", "vbuffer")), _CONFIG_SUBSECTIONS)
_TIMER_VMSD = _Vmsd("timer", 2, 1, (
    _Field("cpu_ticks_offset", "i64"), _Field("unused", "bytes", 8),
    _Field("cpu_clock_offset", "i64", version=2),
))
_GLOBALSTATE_VMSD = _Vmsd("globalstate", 1, 1, (
    _Field("size", "u32"), _Field("runstate", "bytes", _GLOBALSTATE_LEN),
))

_RUNSTATES = frozenset(s.value for s in RunState)


class StreamReader:
    """Incremental reader of an incoming stream: ``feed(bytes) -> [events]``.

    Events come in stream order: :class:`Header`, :class:`Configuration`,
    :class:`Command`\\ s and :class:`Section`\\ s (a :class:`GlobalState` right
    after the globalstate section), :class:`StreamWarning`\\ s where QEMU prints
    one, :class:`EOF`, :class:`VMDescription` (when complete), and finally
    :class:`Complete`, which is when QEMU's destination finishes loading.  Bytes
    after that are counted in :attr:`trailing` and otherwise ignored.

    :meth:`feed` and :meth:`close` raise :class:`MigrationStreamError` with
    QEMU's text as soon as the stream is known to be bad (events of that call
    are dropped; :attr:`warnings` keeps every warning); the reader then stays
    failed.  :meth:`close` must be called when the peer closes the channel: it
    finishes the parse with QEMU's end-of-stream semantics, so truncation is
    reported exactly as QEMU reports it at that offset.

    ``capabilities`` are the destination's migration capabilities (those that
    change what it accepts: x-ignore-shared, postcopy-ram, compress).
    """

    def __init__(self, capabilities: Mapping[str, bool] | None = None) -> None:
        self._caps = dict(capabilities or {})
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._pos = 0  # stream offset of the next byte to consume
        self._mark: int | None = None  # keep bytes from here (payload capture)
        self._closed = False
        self._ferror = False  # QEMUFile's sticky error (-EIO) once reads ran dry
        self._events: list[Event] = []
        self._failed: MigrationStreamError | None = None
        self._done = False
        self._gen: Generator[None, None, None] | None = None
        self.warnings: list[str] = []
        self.trailing = 0
        self.return_path_open = False
        self._postcopy_state = 0
        self._entries = [_Entry(n, v) for n, _, v in (_TIMER, _BLOCK, _RAM, _DIRTY_BITMAP,
                                                       _GLOBALSTATE)]

    # -- public -------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once :class:`Complete` has been returned."""
        return self._done

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._pos

    def feed(self, data: bytes) -> list[Event]:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise RuntimeError("feed() after close()")
        if self._done:
            self.trailing += len(data)
            return []
        self._buf += data
        return self._pump()

    def close(self) -> list[Event]:
        """The peer closed the stream: finish the parse or raise."""
        if self._failed is not None:
            raise self._failed
        if self._done or self._closed:
            self._closed = True
            return []
        self._closed = True
        return self._pump()

    # -- driver -------------------------------------------------------------

    def _pump(self) -> list[Event]:
        if self._gen is None:
            self._gen = self._parse()
        try:
            self._gen.send(None)
        except StopIteration:
            self._done = True
        except _Fail as fail:
            self._failed = MigrationStreamError(fail.err, fail.lines, offset=self._pos,
                                                unprefixed=fail.unprefixed)
            self._events.clear()
            raise self._failed from None
        keep = self._pos if self._mark is None else min(self._mark, self._pos)
        if keep - self._base > 65536:
            del self._buf[: keep - self._base]
            self._base = keep
        events, self._events = self._events, []
        return events

    def _emit(self, event: Event) -> None:
        self._events.append(event)

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        self._emit(StreamWarning(message))

    # -- reading with QEMUFile's semantics --------------------------------------

    def _avail(self) -> int:
        return self._base + len(self._buf) - self._pos

    def _read(self, n: int) -> Generator[None, None, bytes]:
        """Up to ``n`` bytes; short (and the sticky error set) only at the end of stream."""
        while self._avail() < n and not self._closed:
            yield
        start = self._pos - self._base
        chunk = bytes(self._buf[start : start + n])
        self._pos += len(chunk)
        if len(chunk) < n:
            self._ferror = True
        return chunk

    def _skip(self, n: int, keep: int) -> Generator[None, None, bytes]:
        """Consume ``n`` bytes as they come, returning the first ``keep`` of them."""
        kept = bytearray()
        while n > 0:
            if self._avail() == 0:
                if self._closed:
                    self._ferror = True
                    break
                yield
                continue
            start = self._pos - self._base
            take = min(n, self._avail())
            if len(kept) < keep:
                kept += self._buf[start : start + min(take, keep - len(kept))]
            self._pos += take
            n -= take
            if self._mark is None and self._pos - self._base > 65536:
                del self._buf[: self._pos - self._base]
                self._base = self._pos
        return bytes(kept)

    def _uint(self, size: int) -> Generator[None, None, int]:
        raw = yield from self._read(size)
        return int.from_bytes(raw.ljust(size, b"\0"), "big")

    def _u8(self) -> Generator[None, None, int]:
        return (yield from self._uint(1))

    def _be16(self) -> Generator[None, None, int]:
        return (yield from self._uint(2))

    def _be32(self) -> Generator[None, None, int]:
        return (yield from self._uint(4))

    def _be64(self) -> Generator[None, None, int]:
        return (yield from self._uint(8))

    def _peek(self, n: int, offset: int) -> Generator[None, None, bytes]:
        while self._avail() < offset + n and not self._closed:
            yield
        start = self._pos - self._base + offset
        chunk = bytes(self._buf[start : start + n])
        if len(chunk) < n:
            self._ferror = True
        return chunk

    def _counted(self) -> Generator[None, None, tuple[bytes, bool]]:
        """A u8-length string; ok is False when empty or cut short."""
        n = yield from self._u8()
        raw = yield from self._read(n)
        return raw, (n > 0 and len(raw) == n)

    # -- the stream ---------------------------------------------------------

    def _parse(self) -> Generator[None, None, None]:
        magic = yield from self._be32()
        if magic != MAGIC:
            raise _Fail(errno.EINVAL, "Not a migration stream")
        version = yield from self._be32()
        if version == 2:
            raise _Fail(errno.ENOTSUP, "SaveVM v2 format is obsolete and don't work anymore")
        if version != VERSION:
            raise _Fail(errno.ENOTSUP, "Unsupported migration stream version")
        self._emit(Header(version))

        kind = yield from self._u8()
        if kind != SectionType.CONFIGURATION:
            raise _Fail(errno.EINVAL, "Configuration section missing")
        yield from self._configuration()

        while True:
            kind = yield from self._u8()
            if self._ferror:
                raise _Fail(errno.EIO)
            if kind == SectionType.EOF:
                break
            if kind in (SectionType.START, SectionType.FULL):
                yield from self._section_start_full(SectionType(kind))
            elif kind in (SectionType.PART, SectionType.END):
                yield from self._section_part_end(SectionType(kind))
            elif kind == SectionType.COMMAND:
                yield from self._command()
            else:
                raise _Fail(errno.EINVAL, f"Unknown savevm section type {kind}")
        self._emit(EOF())

        kind = yield from self._u8()
        if kind != SectionType.VMDESCRIPTION:
            self._warn(f"Expected vmdescription section, but got {kind}")
        else:
            size = yield from self._be32()
            ok = not self._ferror
            data = yield from self._skip(size, MAX_VM_DESCRIPTION)
            if ok and not self._ferror:
                self._emit(VMDescription(data, size))
        self._emit(Complete())

    def _configuration(self) -> Generator[None, None, None]:
        values = yield from self._vmsd(_CONFIGURATION, 0)
        raw_name = values["name"]
        assert isinstance(raw_name, bytes)
        length = values["len"]
        assert isinstance(length, int)
        local = MACHINE_TYPE.encode()
        if not _strncmp_equal(raw_name, local, length):
            shown = _cstr(raw_name[:length])
            raise _Fail(errno.EINVAL,
                        f"Machine type received is '{shown}' and local is '{MACHINE_TYPE}'")
        page_bits = values.get("target_page_bits")
        if isinstance(page_bits, int) and page_bits != TARGET_PAGE_BITS:
            raise _Fail(errno.EINVAL, f"Received TARGET_PAGE_BITS is {_s32(page_bits)} "
                                      f"but local is {TARGET_PAGE_BITS}")
        caps = values.get("capabilities")
        received = set(caps) if isinstance(caps, tuple) else set()
        for cap in _VALIDATED_CAPABILITIES:
            mine = bool(self._caps.get(cap, False))
            theirs = cap in received
            if mine != theirs:
                raise _Fail(errno.EINVAL, f"Capability {cap} is {'on' if mine else 'off'}, "
                                          f"but received capability is "
                                          f"{'on' if theirs else 'off'}")
        uuid = values.get("uuid.data")
        self._emit(Configuration(
            machine_type=_cstr(raw_name[:length]),
            target_page_bits=page_bits if isinstance(page_bits, int) else None,
            capabilities=caps if isinstance(caps, tuple) else None,
            uuid=uuid if isinstance(uuid, bytes) else None,
        ))

    def _vmsd(self, vmsd: _Vmsd, version: int) -> Generator[None, None, dict[str, object]]:
        """vmstate_load_state's behaviour for the few descriptions we know."""
        if version > vmsd.version:
            raise _Fail(errno.EINVAL, f"{vmsd.name}: incoming version_id {version} is too new "
                                      f"for local version_id {vmsd.version}")
        if version < vmsd.minimum:
            raise _Fail(errno.EINVAL, f"{vmsd.name}: incoming version_id {version} is too old "
                                      f"for local minimum version_id  {vmsd.minimum}")
        values: dict[str, object] = {}
        for fld in vmsd.fields:
            if version < fld.version:
                continue
            try:
                values[fld.name] = yield from self._field(fld, values)
            except _Fail as fail:
                raise fail.add(f"Failed to load {vmsd.name}:{fld.name}") from None
            if self._ferror:
                raise _Fail(errno.EIO, f"Failed to load {vmsd.name}:{fld.name}")
        yield from self._subsections(vmsd, values)
        return values

    def _field(self, fld: _Field, values: dict[str, object]) -> Generator[None, None, object]:
        if fld.kind == "u32":
            return (yield from self._be32())
        if fld.kind == "i64":
            raw = yield from self._read(8)
            return int(struct.unpack(">q", raw.ljust(8, b"\0"))[0])
        if fld.kind == "bytes":
            return (yield from self._read(fld.size))
        if fld.kind == "vbuffer":
            length = values["len"]
            assert isinstance(length, int)
            return (yield from self._read(length))
        # "caps": caps_count counted strings, each a capability name.
        count = values["caps_count"]
        assert isinstance(count, int)
        names: list[str] = []
        for _ in range(count):
            raw, _ok = yield from self._counted()
            name = _cstr(raw)
            if name not in MIGRATION_CAPABILITIES:
                raise _Fail(errno.EINVAL, f"Received unknown capability {name}")
            names.append(name)
        return tuple(names)

    def _subsections(self, vmsd: _Vmsd, values: dict[str, object]) -> Generator[None, None, None]:
        prefix = vmsd.name.encode()
        while True:
            first = yield from self._peek(1, 0)
            if first != bytes([SectionType.SUBSECTION]):
                return
            raw_len = yield from self._peek(1, 1)
            length = raw_len[0] if raw_len else 0
            if length < len(prefix) + 1:
                return
            raw_name = yield from self._peek(length, 2)
            if len(raw_name) != length or not _strncmp_equal(prefix, raw_name, len(prefix)):
                return
            name = _cstr(raw_name)
            sub = next((s for s in vmsd.subsections if s.name == name), None)
            if sub is None:
                if name.startswith("timer/icount"):
                    raise _Fail(errno.ENOENT, "qmpd: icount state in the migration stream "
                                              "is not supported")
                raise _Fail(errno.ENOENT)
            yield from self._read(2 + length)
            version = yield from self._be32()
            # QEMU keeps only the low byte of a subsection's version.
            sub_values = yield from self._vmsd(sub, version & 0xFF)
            values.update(sub_values)
            if sub.name == "configuration/uuid":
                raw_uuid = sub_values["uuid.data"]
                assert isinstance(raw_uuid, bytes)
                text = str(_uuid.UUID(bytes=raw_uuid.ljust(16, b"\0")))
                self._warn(f"warning: UUID is received {text}, but local uuid isn't set")

    def _entry(self, idstr: str, instance: int) -> _Entry | None:
        if instance not in (0, _INSTANCE_ID_ANY):
            return None
        return next((e for e in self._entries if e.idstr == idstr), None)

    def _section_start_full(self, kind: SectionType) -> Generator[None, None, None]:
        section_id = yield from self._be32()
        raw, ok = yield from self._counted()
        if not ok:
            raise _Fail(errno.EINVAL, f"Unable to read ID string for section {section_id}")
        instance = yield from self._be32()
        version = yield from self._be32()
        if self._ferror:
            raise _Fail(errno.EIO, "qemu_loadvm_section_start_full: Failed to read "
                                   "instance/version ID: -5")
        idstr = _cstr(raw)
        entry = self._entry(idstr, instance)
        if entry is None:
            raise _Fail(errno.EINVAL, f"Unknown savevm section or instance '{idstr}' {instance}. "
                                      "Make sure that your current VM setup matches your saved "
                                      "VM setup, including any hotplugged devices")
        if version > entry.version:
            raise _Fail(errno.EINVAL, f"savevm: unsupported version {_s32(version)} for "
                                      f"'{idstr}' v{entry.version}")
        entry.load_section_id = section_id
        entry.load_version_id = version
        start = self._mark = self._pos
        try:
            runstate = yield from self._load(entry, version)
        except _Fail as fail:
            self._mark = None
            raise fail.add(f"error while loading state for instance 0x{instance:x} "
                           f"of device '{idstr}'") from None
        yield from self._section_footer(section_id, idstr, start, kind, instance, version)
        if runstate is not None:
            self._emit(GlobalState(runstate))

    def _section_part_end(self, kind: SectionType) -> Generator[None, None, None]:
        section_id = yield from self._be32()
        if self._ferror:
            raise _Fail(errno.EIO, "qemu_loadvm_section_part_end: Failed to read section ID: -5")
        entry = next((e for e in self._entries if e.load_section_id == section_id), None)
        if entry is None:
            raise _Fail(errno.EINVAL, f"Unknown savevm section {_s32(section_id)}")
        start = self._mark = self._pos
        try:
            runstate = yield from self._load(entry, entry.load_version_id)
        except _Fail as fail:
            self._mark = None
            raise fail.add(f"error while loading state section id {_s32(section_id)}"
                           f"({entry.idstr})") from None
        yield from self._section_footer(section_id, entry.idstr, start, kind, 0,
                                        entry.load_version_id)
        if runstate is not None:
            self._emit(GlobalState(runstate))

    def _section_footer(self, section_id: int, idstr: str, start: int, kind: SectionType,
                        instance: int, version: int) -> Generator[None, None, None]:
        end = self._pos
        self._mark = None
        payload = bytes(self._buf[start - self._base : end - self._base])
        mark = yield from self._u8()
        if self._ferror:
            raise _Fail(errno.EINVAL, "check_section_footer: Read section footer failed: -5")
        if mark != SectionType.FOOTER:
            raise _Fail(errno.EINVAL, f"Missing section footer for {idstr}")
        read_id = yield from self._be32()
        if read_id != section_id:
            raise _Fail(errno.EINVAL, f"Mismatched section id in footer for {idstr} - "
                                      f"read 0x{read_id:x} expected 0x{section_id:x}")
        self._emit(Section(kind, section_id, idstr, instance, version, payload))

    def _load(self, entry: _Entry, version: int) -> Generator[None, None, str | None]:
        """Load one section's payload; returns the run state for globalstate."""
        if entry.idstr == "ram":
            yield from self._load_ram(version)
        elif entry.idstr == "timer":
            yield from self._vmsd(_TIMER_VMSD, _s32(version))
        elif entry.idstr == "globalstate":
            values = yield from self._vmsd(_GLOBALSTATE_VMSD, _s32(version))
            raw = values["runstate"]
            assert isinstance(raw, bytes)
            name = _cstr(raw[: _GLOBALSTATE_LEN - 1])
            if name not in _RUNSTATES:
                raise _Fail(errno.EINVAL, f"invalid parameter value: {name}")
            return name
        elif entry.idstr == "block":
            yield from self._load_block()
        else:
            yield from self._load_dirty_bitmap()
        return None

    def _load_ram(self, version: int) -> Generator[None, None, None]:
        if version != _RAM[2]:
            raise _Fail(errno.EINVAL)
        while True:
            value = yield from self._be64()
            addr = value & ~(TARGET_PAGE_SIZE - 1)
            flags = value & (TARGET_PAGE_SIZE - 1)
            if flags & _RAM_COMPRESS_PAGE and not self._caps.get("compress", False):
                raise _Fail(errno.EINVAL, "Received an unexpected compressed page")
            if flags & _RAM_PAGE_FLAGS:
                # A -M none machine has no RAM blocks: every page is refused.
                if flags & _RAM_CONTINUE:
                    first = "Ack, bad migration stream!"
                else:
                    raw, _ok = yield from self._counted()
                    first = f"Can't find block {_cstr(raw)}"
                raise _Fail(errno.EINVAL, first, f"Illegal RAM offset {addr:x}")
            kind = flags & ~_RAM_CONTINUE
            if kind == _RAM_MEM_SIZE:
                if addr:
                    raw, _ok = yield from self._counted()
                    yield from self._be64()
                    raise _Fail(errno.EINVAL,
                                f'Unknown ramblock "{_cstr(raw)}", cannot accept migration')
            elif kind == _RAM_EOS:
                pass
            elif kind == _RAM_HOOK:
                raise _Fail(errno.EINVAL)
            else:
                raise _Fail(errno.EINVAL, f"Unknown combination of migration flags: 0x{flags:x}")
            if self._ferror:
                raise _Fail(errno.EIO)
            if kind == _RAM_EOS:
                return

    def _load_block(self) -> Generator[None, None, None]:
        while True:
            value = yield from self._be64()
            flags = value & 0x1FF
            if flags & _BLK_DEVICE_BLOCK:
                # qmpd has no guest block devices, like a -M none QEMU.
                raw, _ok = yield from self._counted()
                raise _Fail(errno.EINVAL, f"Error unknown block device {_cstr(raw)}", raw=True)
            if not flags & (_BLK_PROGRESS | _BLK_EOS):
                raise _Fail(errno.EINVAL, f"Unknown block migration flags: 0x{flags:x}", raw=True)
            if self._ferror:
                raise _Fail(errno.EIO)
            if flags & _BLK_EOS:
                return

    def _load_dirty_bitmap(self) -> Generator[None, None, None]:
        flags = yield from self._u8()
        if self._ferror:
            raise _Fail(errno.EIO)
        if flags != _DIRTY_BITMAP_EOS:
            raise _Fail(errno.EINVAL, "qmpd: dirty bitmaps in the migration stream are "
                                      "not supported")

    def _command(self) -> Generator[None, None, None]:
        cmd = yield from self._be16()
        length = yield from self._be16()
        if self._ferror:
            raise _Fail(errno.EIO)
        if cmd == MigCommand.INVALID or cmd >= _COMMAND_END:
            raise _Fail(errno.EINVAL, f"MIG_CMD 0x{cmd:x} unknown (len 0x{length:x})")
        command = MigCommand(cmd)
        expected = _COMMAND_LENGTHS.get(command)
        if expected is not None and length != expected:
            raise _Fail(errno.ERANGE, f"{command.name} received with bad length - "
                                      f"expecting {expected}, got {length}")
        data = b""
        if command == MigCommand.OPEN_RETURN_PATH:
            if self.return_path_open:
                self._warn("CMD_OPEN_RETURN_PATH called when RP already open")
            self.return_path_open = True
        elif command == MigCommand.PING:
            value = yield from self._be32()
            data = _be32(value)
            if not self.return_path_open:
                raise _Fail(errno.EPERM, f"CMD_PING (0x{value:x}) received with no return path")
        elif command == MigCommand.POSTCOPY_ADVISE:
            data = yield from self._postcopy_advise(length)
        elif command in (MigCommand.POSTCOPY_LISTEN, MigCommand.POSTCOPY_RUN,
                         MigCommand.POSTCOPY_RAM_DISCARD):
            if self._postcopy_state == 0:
                raise _Fail(errno.EPERM, f"CMD_{command.name} in wrong postcopy state (0)")
            raise _Fail(errno.EPERM, "qmpd: postcopy migration is not supported")
        elif command == MigCommand.POSTCOPY_RESUME:
            self._warn("loadvm_postcopy_handle_resume: illegal resume received")
        elif command == MigCommand.RECV_BITMAP:
            raw, _ok = yield from self._counted()
            if len(raw) + 1 != length:
                raise _Fail(errno.EINVAL,
                            f"loadvm_handle_recv_bitmap: invalid payload length ({length})")
            raise _Fail(errno.EINVAL, f"loadvm_handle_recv_bitmap: block '{_cstr(raw)}' not found")
        elif command == MigCommand.PACKAGED:
            raise _Fail(errno.EIO, "qmpd: packaged (postcopy) migration is not supported")
        else:  # ENABLE_COLO
            raise _Fail(errno.EINVAL, "qmpd: COLO is not supported")
        self._emit(Command(cmd, data))

    def _postcopy_advise(self, length: int) -> Generator[None, None, bytes]:
        if self._postcopy_state != 0:
            raise _Fail(errno.EPERM,
                        f"CMD_POSTCOPY_ADVISE in wrong postcopy state ({self._postcopy_state})")
        self._postcopy_state = 1
        postcopy = bool(self._caps.get("postcopy-ram", False))
        if length == 0:
            if postcopy:
                raise _Fail(errno.EINVAL, "RAM postcopy is enabled but have 0 byte advise")
            return b""
        if length != 16:
            raise _Fail(errno.EINVAL, f"CMD_POSTCOPY_ADVISE invalid length ({length})")
        if not postcopy:
            raise _Fail(errno.EINVAL, "RAM postcopy is disabled but have 16 byte advise")
        summary = yield from self._be64()
        if summary != 0:
            raise _Fail(errno.EPERM, f"Postcopy needs matching RAM page sizes "
                                      f"(s={summary:x} d=0)")
        page_size = yield from self._be64()
        if page_size != TARGET_PAGE_SIZE:
            raise _Fail(errno.EPERM, f"Postcopy needs matching target page sizes "
                                      f"(s={page_size} d={TARGET_PAGE_SIZE})")
        return _be64(summary) + _be64(page_size)


# --------------------------------------------------------------------------
# Whole-stream helper
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedStream:
    """What a complete incoming stream said."""

    version: int
    configuration: Configuration
    #: The source's run state; None when the stream had no globalstate section.
    runstate: str | None
    timer: TimerState | None
    sections: tuple[Section, ...]
    commands: tuple[Command, ...]
    return_path: bool
    vmdesc: bytes | None
    warnings: tuple[str, ...]
    trailing: int
    events: tuple[Event, ...] = field(repr=False, default=())

    @property
    def machine_type(self) -> str:
        return self.configuration.machine_type

    @property
    def effective_runstate(self) -> str:
        """What QEMU's destination goes by: a missing globalstate counts as running."""
        return self.runstate if self.runstate is not None else RunState.RUNNING.value


def parse_stream(data: bytes, *, capabilities: Mapping[str, bool] | None = None) -> ParsedStream:
    """Read a whole stream as a QEMU 7.2 ``-M none`` destination would.

    :raise MigrationStreamError: with QEMU's text, if the destination refuses it.
    """
    reader = StreamReader(capabilities)
    events = reader.feed(data)
    events += reader.close()
    version = 0
    config = Configuration(machine_type="")
    runstate: str | None = None
    timer: TimerState | None = None
    vmdesc: bytes | None = None
    sections: list[Section] = []
    commands: list[Command] = []
    for event in events:
        if isinstance(event, Header):
            version = event.version
        elif isinstance(event, Configuration):
            config = event
        elif isinstance(event, GlobalState):
            runstate = event.runstate
        elif isinstance(event, Section):
            sections.append(event)
            if event.idstr == "timer":
                timer = TimerState.decode(event.payload, event.version_id)
        elif isinstance(event, Command):
            commands.append(event)
        elif isinstance(event, VMDescription):
            vmdesc = event.data
    return ParsedStream(
        version=version, configuration=config, runstate=runstate, timer=timer,
        sections=tuple(sections), commands=tuple(commands),
        return_path=reader.return_path_open, vmdesc=vmdesc,
        warnings=tuple(reader.warnings), trailing=reader.trailing, events=tuple(events),
    )


# --------------------------------------------------------------------------
# Return path (destination -> source)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class RPMessage:
    """One return-path message; :attr:`value` for SHUT and PONG."""

    type: int
    data: bytes

    @property
    def value(self) -> int:
        return int(struct.unpack(">I", self.data[:4].ljust(4, b"\0"))[0])


_RP_LENGTHS: dict[int, int] = {RPMessageType.SHUT: 4, RPMessageType.PONG: 4}


class ReturnPathReader:
    """The source's side of the return path: ``feed(bytes) -> [RPMessage]``.

    QEMU 7.2's destination sends PONG(n) for each PING(n) and SHUT(0) when it
    finished loading (SHUT(1) on failure).  Malformed messages raise
    :class:`MigrationStreamError` with qmpd's own wording.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[RPMessage]:
        self._buf += data
        out: list[RPMessage] = []
        while len(self._buf) >= 4:
            kind, length = struct.unpack_from(">HH", self._buf)
            expected = _RP_LENGTHS.get(kind)
            if kind == RPMessageType.INVALID or kind > RPMessageType.RESUME_ACK or (
                expected is not None and length != expected
            ):
                raise MigrationStreamError(
                    errno.EINVAL,
                    [f"qmpd: invalid return path message 0x{kind:04x} length 0x{length:04x}"],
                )
            if len(self._buf) < 4 + length:
                break
            out.append(RPMessage(kind, bytes(self._buf[4 : 4 + length])))
            del self._buf[: 4 + length]
        return out

    def close(self) -> None:
        """Raise if the channel closed in the middle of a message."""
        if self._buf:
            raise MigrationStreamError(errno.EIO, ["qmpd: return path closed mid-message"])
