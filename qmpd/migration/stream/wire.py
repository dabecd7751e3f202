"""The wire format shared by the reader and the writer: constants, events, errors."""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

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
VALIDATED_CAPABILITIES = ("x-ignore-shared",)

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


COMMAND_END = 11
#: Commands with a fixed data length; QEMU checks it before handling them.
COMMAND_LENGTHS = {
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
TIMER_SECTION = ("timer", 0, 2)
BLOCK_SECTION = ("block", 1, 1)
RAM_SECTION = ("ram", 2, 4)
DIRTY_BITMAP_SECTION = ("dirty-bitmap", 3, 1)
GLOBALSTATE_SECTION = ("globalstate", 4, 1)

# ram section flags (low bits of each be64; the rest is an address).
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS_PAGE = 0x100
RAM_PAGE_FLAGS = RAM_ZERO | RAM_PAGE | RAM_COMPRESS_PAGE | RAM_XBZRLE

# block section flags (low 9 bits of each be64).
BLK_DEVICE_BLOCK = 0x01
BLK_EOS = 0x02
BLK_PROGRESS = 0x04

DIRTY_BITMAP_EOS = 0x01

GLOBALSTATE_LEN = 100
#: An instance id that matches any instance (QEMU's VMSTATE_INSTANCE_ID_ANY).
INSTANCE_ID_ANY = 0xFFFFFFFF

_STRERROR = {
    errno.EPERM: "Operation not permitted",
    errno.ENOENT: "No such file or directory",
    errno.EIO: "Input/output error",
    errno.EINVAL: "Invalid argument",
    errno.ERANGE: "Numerical result out of range",
    errno.ENOTSUP: "Operation not supported",
}


def pack_be32(value: int) -> bytes:
    return struct.pack(">I", value)


def pack_be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def s32(value: int) -> int:
    """A uint32 as C's ``%d`` prints it."""
    return value - (1 << 32) if value & 0x80000000 else value


def cstr(raw: bytes) -> str:
    """A C string out of a buffer: up to the first NUL, bytes kept (surrogateescape)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def strncmp_equal(a: bytes, b: bytes, n: int) -> bool:
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


class LoadFail(Exception):
    """Internal: a load step failed; lines gather on the way up like QEMU's prints."""

    def __init__(self, err: int, *lines: str, raw: bool = False) -> None:
        super().__init__(err)
        self.err = err
        self.lines = list(lines)
        self.unprefixed: set[int] = set(range(len(lines))) if raw else set()

    def add(self, line: str) -> LoadFail:
        self.lines.append(line)
        return self
