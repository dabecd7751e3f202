"""The source's stream: what a ``-M none`` QEMU 7.2 sends (sans-IO)."""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

from qmpd.migration.stream.bitmaps import BitmapWriter, MigratedBitmap
from qmpd.migration.stream.wire import (
    DIRTY_BITMAP_SECTION,
    GLOBALSTATE_LEN,
    GLOBALSTATE_SECTION,
    MACHINE_TYPE,
    MAGIC,
    RAM_EOS,
    RAM_MEM_SIZE,
    RAM_SECTION,
    TARGET_PAGE_SIZE,
    TIMER_SECTION,
    VERSION,
    VM_DESCRIPTION,
    MigCommand,
    SectionType,
    TimerState,
    pack_be32,
    pack_be64,
)

# --------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------


def _section_header(kind: SectionType, ident: tuple[str, int, int]) -> bytes:
    name, section_id, version = ident
    raw = name.encode()
    return (bytes([kind]) + pack_be32(section_id) + bytes([len(raw)]) + raw + pack_be32(0)
            + pack_be32(version))


def _footer(section_id: int) -> bytes:
    return bytes([SectionType.FOOTER]) + pack_be32(section_id)


def _command(cmd: MigCommand, data: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + struct.pack(">HH", cmd, len(data)) + data


def _globalstate_payload(runstate: str) -> bytes:
    raw = runstate.encode()
    if len(raw) >= GLOBALSTATE_LEN:
        raise ValueError(f"run state name too long: {runstate!r}")
    return pack_be32(len(raw) + 1) + raw.ljust(GLOBALSTATE_LEN, b"\0")


class StreamWriter:
    """Produces what a ``-M none`` QEMU 7.2 source sends, in its two phases.

    :meth:`setup` is what QEMU writes when the migration starts (state
    ``setup``/``active``); :meth:`complete` is what it writes at switchover,
    after the VM has stopped and the block nodes have been inactivated.  The
    capabilities that change the stream are return-path, postcopy-ram,
    dirty-bitmaps and x-ignore-shared; the others change nothing on the wire.
    """

    def __init__(self, capabilities: Mapping[str, bool] | None = None,
                 bitmaps: Sequence[MigratedBitmap] = ()) -> None:
        caps = dict(capabilities or {})
        self.postcopy_ram = caps.get("postcopy-ram", False)
        self.return_path = caps.get("return-path", False) or self.postcopy_ram
        self.dirty_bitmaps = caps.get("dirty-bitmaps", False)
        self.x_ignore_shared = caps.get("x-ignore-shared", False)
        #: The named bitmaps that travel (with the dirty-bitmaps capability).
        self.bitmaps = BitmapWriter(bitmaps if self.dirty_bitmaps else ())

    def header(self) -> bytes:
        """Magic, version and the configuration section."""
        out = pack_be32(MAGIC) + pack_be32(VERSION)
        name = MACHINE_TYPE.encode()
        out += bytes([SectionType.CONFIGURATION]) + pack_be32(len(name)) + name
        if self.x_ignore_shared:
            sub = b"configuration/capabilities"
            cap = b"x-ignore-shared"
            out += (bytes([SectionType.SUBSECTION, len(sub)]) + sub + pack_be32(1)
                    + pack_be32(1) + bytes([len(cap)]) + cap)
        return out

    def setup(self) -> bytes:
        """Header, configuration, commands and the START sections."""
        out = self.header()
        if self.return_path:
            out += _command(MigCommand.OPEN_RETURN_PATH) + _command(MigCommand.PING, pack_be32(1))
        if self.postcopy_ram:
            # RAM page-size summary (no RAM blocks: 0), then the target page size.
            out += _command(MigCommand.POSTCOPY_ADVISE, pack_be64(0) + pack_be64(TARGET_PAGE_SIZE))
        elif self.dirty_bitmaps:
            out += _command(MigCommand.POSTCOPY_ADVISE)
        out += (_section_header(SectionType.START, RAM_SECTION) + pack_be64(0 | RAM_MEM_SIZE)
                + pack_be64(RAM_EOS) + _footer(RAM_SECTION[1]))
        if self.dirty_bitmaps:
            out += (_section_header(SectionType.START, DIRTY_BITMAP_SECTION)
                    + self.bitmaps.setup() + _footer(DIRTY_BITMAP_SECTION[1]))
        return out

    def complete(self, runstate: str, timer: TimerState | None = None,
                 bits: Sequence[bytes] = ()) -> bytes:
        """The END of ram (and of the dirty bitmaps, with their ``bits`` as
        they are now), the device state, EOF and the VM description.

        ``runstate`` is the state the source was in before switchover (QEMU
        records it before stopping): ``running``, ``paused``, ``prelaunch``...
        """
        timer = timer or TimerState()
        ram_id = RAM_SECTION[1]
        out = bytes([SectionType.END]) + pack_be32(ram_id) + pack_be64(RAM_EOS) + _footer(ram_id)
        if self.bitmaps.bitmaps:
            # QEMU leaves the section out when no bitmap travels.
            bitmap_id = DIRTY_BITMAP_SECTION[1]
            out += (bytes([SectionType.END]) + pack_be32(bitmap_id)
                    + self.bitmaps.complete(bits) + _footer(bitmap_id))
        out += (_section_header(SectionType.FULL, TIMER_SECTION) + timer.encode()
                + _footer(TIMER_SECTION[1]))
        out += (_section_header(SectionType.FULL, GLOBALSTATE_SECTION)
                + _globalstate_payload(runstate) + _footer(GLOBALSTATE_SECTION[1]))
        out += bytes([SectionType.EOF])
        out += bytes([SectionType.VMDESCRIPTION]) + pack_be32(len(VM_DESCRIPTION)) + VM_DESCRIPTION
        return out
