"""The destination's stream reader: incremental, with QEMU 7.2's refusals (sans-IO)."""

from __future__ import annotations

import dataclasses
import errno
import struct
import uuid as _uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass

from qmpd.migration.stream import bitmaps
from qmpd.migration.stream.wire import (
    BLK_DEVICE_BLOCK,
    BLK_EOS,
    BLK_PROGRESS,
    BLOCK_SECTION,
    COMMAND_END,
    COMMAND_LENGTHS,
    DIRTY_BITMAP_SECTION,
    EOF,
    GLOBALSTATE_LEN,
    GLOBALSTATE_SECTION,
    INSTANCE_ID_ANY,
    MACHINE_TYPE,
    MAGIC,
    MAX_VM_DESCRIPTION,
    MIGRATION_CAPABILITIES,
    RAM_COMPRESS_PAGE,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_HOOK,
    RAM_MEM_SIZE,
    RAM_PAGE_FLAGS,
    RAM_SECTION,
    TARGET_PAGE_BITS,
    TARGET_PAGE_SIZE,
    TIMER_SECTION,
    VALIDATED_CAPABILITIES,
    VERSION,
    Command,
    Complete,
    Configuration,
    Event,
    GlobalState,
    Header,
    LoadFail,
    MigCommand,
    MigrationStreamError,
    Section,
    SectionType,
    StreamWarning,
    VMDescription,
    cstr,
    pack_be32,
    pack_be64,
    s32,
    strncmp_equal,
)
from qmpd.runstate import RunState

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
    _Field("size", "u32"), _Field("runstate", "bytes", GLOBALSTATE_LEN),
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
        #: Takes each chunk of the dirty-bitmap section as it is read (it may
        #: raise BitmapRefused); without one, chunks other than EOS are refused.
        self.bitmap_sink: Callable[[bitmaps.BitmapChunk], None] | None = None
        # The dirty-bitmap chunks' names, which carry over to later chunks.
        self._bitmap_node: str | None = None
        self._bitmap_name: str | None = None
        self._entries = [_Entry(n, v) for n, _, v in (
            TIMER_SECTION, BLOCK_SECTION, RAM_SECTION, DIRTY_BITMAP_SECTION, GLOBALSTATE_SECTION)]

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
        except LoadFail as fail:
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
        start = self._pos - self._base
        if len(self._buf) - start >= size:
            # The bytes are here (nearly always): no nested generator.
            self._pos += size
            return int.from_bytes(self._buf[start : start + size], "big")
        raw = yield from self._read(size)
        return int.from_bytes(raw.ljust(size, b"\0"), "big")

    # Plain functions handing out _uint's generator: one level less per read.
    def _u8(self) -> Generator[None, None, int]:
        return self._uint(1)

    def _be16(self) -> Generator[None, None, int]:
        return self._uint(2)

    def _be32(self) -> Generator[None, None, int]:
        return self._uint(4)

    def _be64(self) -> Generator[None, None, int]:
        return self._uint(8)

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
            raise LoadFail(errno.EINVAL, "Not a migration stream")
        version = yield from self._be32()
        if version == 2:
            raise LoadFail(errno.ENOTSUP, "SaveVM v2 format is obsolete and don't work anymore")
        if version != VERSION:
            raise LoadFail(errno.ENOTSUP, "Unsupported migration stream version")
        self._emit(Header(version))

        kind = yield from self._u8()
        if kind != SectionType.CONFIGURATION:
            raise LoadFail(errno.EINVAL, "Configuration section missing")
        yield from self._configuration()

        while True:
            kind = yield from self._u8()
            if self._ferror:
                raise LoadFail(errno.EIO)
            if kind == SectionType.EOF:
                break
            if kind in (SectionType.START, SectionType.FULL):
                yield from self._section_start_full(SectionType(kind))
            elif kind in (SectionType.PART, SectionType.END):
                yield from self._section_part_end(SectionType(kind))
            elif kind == SectionType.COMMAND:
                yield from self._command()
            else:
                raise LoadFail(errno.EINVAL, f"Unknown savevm section type {kind}")
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
        if not strncmp_equal(raw_name, local, length):
            shown = cstr(raw_name[:length])
            raise LoadFail(errno.EINVAL,
                           f"Machine type received is '{shown}' and local is '{MACHINE_TYPE}'")
        page_bits = values.get("target_page_bits")
        if isinstance(page_bits, int) and page_bits != TARGET_PAGE_BITS:
            raise LoadFail(errno.EINVAL, f"Received TARGET_PAGE_BITS is {s32(page_bits)} "
                                         f"but local is {TARGET_PAGE_BITS}")
        caps = values.get("capabilities")
        received = set(caps) if isinstance(caps, tuple) else set()
        for cap in VALIDATED_CAPABILITIES:
            mine = bool(self._caps.get(cap, False))
            theirs = cap in received
            if mine != theirs:
                raise LoadFail(errno.EINVAL, f"Capability {cap} is {'on' if mine else 'off'}, "
                                             f"but received capability is "
                                             f"{'on' if theirs else 'off'}")
        uuid = values.get("uuid.data")
        self._emit(Configuration(
            machine_type=cstr(raw_name[:length]),
            target_page_bits=page_bits if isinstance(page_bits, int) else None,
            capabilities=caps if isinstance(caps, tuple) else None,
            uuid=uuid if isinstance(uuid, bytes) else None,
        ))

    def _vmsd(self, vmsd: _Vmsd, version: int) -> Generator[None, None, dict[str, object]]:
        """vmstate_load_state's behaviour for the few descriptions we know."""
        if version > vmsd.version:
            raise LoadFail(errno.EINVAL, f"{vmsd.name}: incoming version_id {version} is too new "
                                         f"for local version_id {vmsd.version}")
        if version < vmsd.minimum:
            raise LoadFail(errno.EINVAL, f"{vmsd.name}: incoming version_id {version} is too old "
                                         f"for local minimum version_id  {vmsd.minimum}")
        values: dict[str, object] = {}
        for fld in vmsd.fields:
            if version < fld.version:
                continue
            try:
                values[fld.name] = yield from self._field(fld, values)
            except LoadFail as fail:
                raise fail.add(f"Failed to load {vmsd.name}:{fld.name}") from None
            if self._ferror:
                raise LoadFail(errno.EIO, f"Failed to load {vmsd.name}:{fld.name}")
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
            name = cstr(raw)
            if name not in MIGRATION_CAPABILITIES:
                raise LoadFail(errno.EINVAL, f"Received unknown capability {name}")
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
            if len(raw_name) != length or not strncmp_equal(prefix, raw_name, len(prefix)):
                return
            name = cstr(raw_name)
            sub = next((s for s in vmsd.subsections if s.name == name), None)
            if sub is None:
                if name.startswith("timer/icount"):
                    raise LoadFail(errno.ENOENT, "qmpd: icount state in the migration stream "
                                                 "is not supported")
                raise LoadFail(errno.ENOENT)
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
        if instance not in (0, INSTANCE_ID_ANY):
            return None
        return next((e for e in self._entries if e.idstr == idstr), None)

    def _section_start_full(self, kind: SectionType) -> Generator[None, None, None]:
        section_id = yield from self._be32()
        raw, ok = yield from self._counted()
        if not ok:
            raise LoadFail(errno.EINVAL, f"Unable to read ID string for section {section_id}")
        instance = yield from self._be32()
        version = yield from self._be32()
        if self._ferror:
            raise LoadFail(errno.EIO, "qemu_loadvm_section_start_full: Failed to read "
                                      "instance/version ID: -5")
        idstr = cstr(raw)
        entry = self._entry(idstr, instance)
        if entry is None:
            raise LoadFail(errno.EINVAL,
                           f"Unknown savevm section or instance '{idstr}' {instance}. "
                                         "Make sure that your current VM setup matches your saved "
                                         "VM setup, including any hotplugged devices")
        if version > entry.version:
            raise LoadFail(errno.EINVAL, f"savevm: unsupported version {s32(version)} for "
                                         f"'{idstr}' v{entry.version}")
        entry.load_section_id = section_id
        entry.load_version_id = version
        start = self._mark = self._pos
        try:
            runstate = yield from self._load(entry, version)
        except LoadFail as fail:
            self._mark = None
            raise fail.add(f"error while loading state for instance 0x{instance:x} "
                           f"of device '{idstr}'") from None
        yield from self._section_footer(section_id, idstr, start, kind, instance, version)
        if runstate is not None:
            self._emit(GlobalState(runstate))

    def _section_part_end(self, kind: SectionType) -> Generator[None, None, None]:
        section_id = yield from self._be32()
        if self._ferror:
            raise LoadFail(errno.EIO, "qemu_loadvm_section_part_end: Failed to read section ID: -5")
        entry = next((e for e in self._entries if e.load_section_id == section_id), None)
        if entry is None:
            raise LoadFail(errno.EINVAL, f"Unknown savevm section {s32(section_id)}")
        start = self._mark = self._pos
        try:
            runstate = yield from self._load(entry, entry.load_version_id)
        except LoadFail as fail:
            self._mark = None
            raise fail.add(f"error while loading state section id {s32(section_id)}"
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
            raise LoadFail(errno.EINVAL, "check_section_footer: Read section footer failed: -5")
        if mark != SectionType.FOOTER:
            raise LoadFail(errno.EINVAL, f"Missing section footer for {idstr}")
        read_id = yield from self._be32()
        if read_id != section_id:
            raise LoadFail(errno.EINVAL, f"Mismatched section id in footer for {idstr} - "
                                         f"read 0x{read_id:x} expected 0x{section_id:x}")
        self._emit(Section(kind, section_id, idstr, instance, version, payload))

    def _load(self, entry: _Entry, version: int) -> Generator[None, None, str | None]:
        """Load one section's payload; returns the run state for globalstate."""
        if entry.idstr == "ram":
            yield from self._load_ram(version)
        elif entry.idstr == "timer":
            yield from self._vmsd(_TIMER_VMSD, s32(version))
        elif entry.idstr == "globalstate":
            values = yield from self._vmsd(_GLOBALSTATE_VMSD, s32(version))
            raw = values["runstate"]
            assert isinstance(raw, bytes)
            name = cstr(raw[: GLOBALSTATE_LEN - 1])
            if name not in _RUNSTATES:
                raise LoadFail(errno.EINVAL, f"invalid parameter value: {name}")
            return name
        elif entry.idstr == "block":
            yield from self._load_block()
        else:
            yield from self._load_dirty_bitmap()
        return None

    def _load_ram(self, version: int) -> Generator[None, None, None]:
        if version != RAM_SECTION[2]:
            raise LoadFail(errno.EINVAL)
        while True:
            value = yield from self._be64()
            addr = value & ~(TARGET_PAGE_SIZE - 1)
            flags = value & (TARGET_PAGE_SIZE - 1)
            if flags & RAM_COMPRESS_PAGE and not self._caps.get("compress", False):
                raise LoadFail(errno.EINVAL, "Received an unexpected compressed page")
            if flags & RAM_PAGE_FLAGS:
                # A -M none machine has no RAM blocks: every page is refused.
                if flags & RAM_CONTINUE:
                    first = "Ack, bad migration stream!"
                else:
                    raw, _ok = yield from self._counted()
                    first = f"Can't find block {cstr(raw)}"
                raise LoadFail(errno.EINVAL, first, f"Illegal RAM offset {addr:x}")
            kind = flags & ~RAM_CONTINUE
            if kind == RAM_MEM_SIZE:
                if addr:
                    raw, _ok = yield from self._counted()
                    yield from self._be64()
                    raise LoadFail(errno.EINVAL,
                                   f'Unknown ramblock "{cstr(raw)}", cannot accept migration')
            elif kind == RAM_EOS:
                pass
            elif kind == RAM_HOOK:
                raise LoadFail(errno.EINVAL)
            else:
                raise LoadFail(errno.EINVAL, f"Unknown combination of migration flags: 0x{flags:x}")
            if self._ferror:
                raise LoadFail(errno.EIO)
            if kind == RAM_EOS:
                return

    def _load_block(self) -> Generator[None, None, None]:
        while True:
            value = yield from self._be64()
            flags = value & 0x1FF
            if flags & BLK_DEVICE_BLOCK:
                # qmpd has no guest block devices, like a -M none QEMU.
                raw, _ok = yield from self._counted()
                raise LoadFail(errno.EINVAL, f"Error unknown block device {cstr(raw)}", raw=True)
            if not flags & (BLK_PROGRESS | BLK_EOS):
                raise LoadFail(errno.EINVAL, f"Unknown block migration flags: 0x{flags:x}",
                               raw=True)
            if self._ferror:
                raise LoadFail(errno.EIO)
            if flags & BLK_EOS:
                return

    def _load_dirty_bitmap(self) -> Generator[None, None, None]:
        """Chunks up to EOS, each emitted with the names it refers to."""
        while True:
            flags = yield from self._u8()
            if flags & bitmaps.FLAG_EXTRA:
                flags = flags << 8 | (yield from self._u8())
                if flags & bitmaps.FLAG_EXTRA:
                    flags = flags << 16 | (yield from self._be16())
            if flags & bitmaps.FLAG_DEVICE_NAME:
                raw, ok = yield from self._counted()
                if not ok:
                    raise LoadFail(errno.EINVAL, "Unable to read node alias string")
                self._bitmap_node = cstr(raw)
            if flags & bitmaps.FLAG_BITMAP_NAME:
                raw, ok = yield from self._counted()
                if not ok:
                    raise LoadFail(errno.EINVAL, "Unable to read bitmap alias string")
                self._bitmap_name = cstr(raw)
            chunk = bitmaps.BitmapChunk(flags, self._bitmap_node, self._bitmap_name)
            if flags & bitmaps.FLAG_START:
                granularity = yield from self._be32()
                start_flags = yield from self._u8()
                chunk = dataclasses.replace(chunk, granularity=granularity,
                                            start_flags=start_flags)
            elif flags & bitmaps.FLAG_COMPLETE:
                pass
            elif flags & bitmaps.FLAG_BITS:
                sector = yield from self._be64()
                count = yield from self._be32()
                data = None
                if not flags & bitmaps.FLAG_ZEROES:
                    size = yield from self._be64()
                    if size > bitmaps.MAX_BUFFER:
                        raise LoadFail(errno.EIO, "Bitmap migration stream buffer allocation "
                                                  "request is too large")
                    data = yield from self._read(size)
                    if len(data) != size:
                        raise LoadFail(errno.EIO, "Failed to read bitmap bits")
                chunk = dataclasses.replace(
                    chunk, first_byte=(sector << 9) & (1 << 64) - 1, nr_bytes=count << 9,
                    data=data)
            if self._ferror:
                raise LoadFail(errno.EIO)
            if chunk.kind != "eos" or flags != bitmaps.FLAG_EOS:
                if self.bitmap_sink is None:
                    raise LoadFail(errno.EINVAL, "qmpd: dirty bitmaps in the migration "
                                                 "stream are not supported")
                try:
                    self.bitmap_sink(chunk)
                except bitmaps.BitmapRefused as exc:
                    raise LoadFail(exc.errno, exc.message) from None
            if flags & bitmaps.FLAG_EOS:
                return

    def _command(self) -> Generator[None, None, None]:
        cmd = yield from self._be16()
        length = yield from self._be16()
        if self._ferror:
            raise LoadFail(errno.EIO)
        if cmd == MigCommand.INVALID or cmd >= COMMAND_END:
            raise LoadFail(errno.EINVAL, f"MIG_CMD 0x{cmd:x} unknown (len 0x{length:x})")
        command = MigCommand(cmd)
        expected = COMMAND_LENGTHS.get(command)
        if expected is not None and length != expected:
            raise LoadFail(errno.ERANGE, f"{command.name} received with bad length - "
                                         f"expecting {expected}, got {length}")
        data = b""
        if command == MigCommand.OPEN_RETURN_PATH:
            if self.return_path_open:
                self._warn("CMD_OPEN_RETURN_PATH called when RP already open")
            self.return_path_open = True
        elif command == MigCommand.PING:
            value = yield from self._be32()
            data = pack_be32(value)
            if not self.return_path_open:
                raise LoadFail(errno.EPERM, f"CMD_PING (0x{value:x}) received with no return path")
        elif command == MigCommand.POSTCOPY_ADVISE:
            data = yield from self._postcopy_advise(length)
        elif command in (MigCommand.POSTCOPY_LISTEN, MigCommand.POSTCOPY_RUN,
                         MigCommand.POSTCOPY_RAM_DISCARD):
            if self._postcopy_state == 0:
                raise LoadFail(errno.EPERM, f"CMD_{command.name} in wrong postcopy state (0)")
            raise LoadFail(errno.EPERM, "qmpd: postcopy migration is not supported")
        elif command == MigCommand.POSTCOPY_RESUME:
            self._warn("loadvm_postcopy_handle_resume: illegal resume received")
        elif command == MigCommand.RECV_BITMAP:
            raw, _ok = yield from self._counted()
            if len(raw) + 1 != length:
                raise LoadFail(errno.EINVAL,
                               f"loadvm_handle_recv_bitmap: invalid payload length ({length})")
            raise LoadFail(errno.EINVAL,
                           f"loadvm_handle_recv_bitmap: block '{cstr(raw)}' not found")
        elif command == MigCommand.PACKAGED:
            raise LoadFail(errno.EIO, "qmpd: packaged (postcopy) migration is not supported")
        else:  # ENABLE_COLO
            raise LoadFail(errno.EINVAL, "qmpd: COLO is not supported")
        self._emit(Command(cmd, data))

    def _postcopy_advise(self, length: int) -> Generator[None, None, bytes]:
        if self._postcopy_state != 0:
            raise LoadFail(errno.EPERM,
                           f"CMD_POSTCOPY_ADVISE in wrong postcopy state ({self._postcopy_state})")
        self._postcopy_state = 1
        postcopy = bool(self._caps.get("postcopy-ram", False))
        if length == 0:
            if postcopy:
                raise LoadFail(errno.EINVAL, "RAM postcopy is enabled but have 0 byte advise")
            return b""
        if length != 16:
            raise LoadFail(errno.EINVAL, f"CMD_POSTCOPY_ADVISE invalid length ({length})")
        if not postcopy:
            raise LoadFail(errno.EINVAL, "RAM postcopy is disabled but have 16 byte advise")
        summary = yield from self._be64()
        if summary != 0:
            raise LoadFail(errno.EPERM, f"Postcopy needs matching RAM page sizes "
                                         f"(s={summary:x} d=0)")
        page_size = yield from self._be64()
        if page_size != TARGET_PAGE_SIZE:
            raise LoadFail(errno.EPERM, f"Postcopy needs matching target page sizes "
                                         f"(s={page_size} d={TARGET_PAGE_SIZE})")
        return pack_be64(summary) + pack_be64(page_size)
