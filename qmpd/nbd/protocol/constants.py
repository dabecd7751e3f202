"""NBD protocol numbers: magics, limits, option/reply/command codes, flags, errors.

All integers on the wire are big-endian.
"""

from __future__ import annotations

import enum
from typing import Final

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
#: without being stored and answered NBDREP_ERR_TOO_BIG.
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

#: The bit every error reply type has set (NBD_REP_FLAG_ERROR).
REP_ERR: Final = 1 << 31


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_ERR + 1
    ERR_POLICY = REP_ERR + 2
    ERR_INVALID = REP_ERR + 3
    ERR_PLATFORM = REP_ERR + 4
    ERR_TLS_REQD = REP_ERR + 5
    ERR_UNKNOWN = REP_ERR + 6
    ERR_SHUTDOWN = REP_ERR + 7
    ERR_BLOCK_SIZE_REQD = REP_ERR + 8
    ERR_TOO_BIG = REP_ERR + 9
    ERR_EXT_HEADER_REQD = REP_ERR + 10


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
#: qemu:dirty-bitmap:NAME's one flag.
STATE_DIRTY: Final = 1

BASE_ALLOCATION: Final = "base:allocation"
ALLOCATION_DEPTH: Final = "qemu:allocation-depth"
#: Context ids, as QEMU numbers them.
CONTEXT_IDS: Final = {BASE_ALLOCATION: 0, ALLOCATION_DEPTH: 1}
#: An exported dirty bitmap's context is this and its name; the export's
#: i-th bitmap has id DIRTY_BITMAP_ID + i.
DIRTY_BITMAP_PREFIX: Final = "qemu:dirty-bitmap:"
DIRTY_BITMAP_ID: Final = 2


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
