"""QEMU 7.2's migration stream, as a ``-M none`` machine sends and accepts it.

Sans-IO: :class:`StreamWriter` (``writer.py``) returns bytes,
:class:`StreamReader` (``reader.py``) takes bytes and returns events, and
:class:`ReturnPathReader` (``return_path.py``) does the same for the return
path; ``wire.py`` holds what they share.  None touches a socket, a file or
the event loop.

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
dirty bitmaps that carry data (unless :attr:`StreamReader.bitmap_sink` takes
them, chunk by chunk, as :class:`~qmpd.migration.stream.bitmaps.BitmapChunk`),
and the ``timer/icount`` subsection; their texts start with ``qmpd:``.
"""

from __future__ import annotations

from qmpd.migration.stream.reader import (
    StreamReader,
)
from qmpd.migration.stream.return_path import (
    ReturnPathReader,
    RPMessage,
    encode_rp_message,
)
from qmpd.migration.stream.wire import (
    EOF,
    MAGIC,
    MIGRATION_CAPABILITIES,
    VERSION,
    VM_DESCRIPTION,
    Command,
    Complete,
    Configuration,
    Event,
    GlobalState,
    Header,
    MigCommand,
    MigrationStreamError,
    RPMessageType,
    Section,
    SectionType,
    StreamWarning,
    TimerState,
    VMDescription,
)
from qmpd.migration.stream.writer import (
    StreamWriter,
)

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
    "encode_rp_message",
]
