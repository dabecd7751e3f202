"""The NBD protocol, sans I/O: constants, the server's handshake and transmission
state machines, and the encoders both sides need.

Nothing here touches a socket or the event loop.  A state machine is fed the
bytes a peer sent (:meth:`ServerHandshake.receive_data`,
:meth:`Transmission.receive_data`), hands back events one at a time
(``next_event()``, :data:`NEED_DATA` when it needs more bytes) and collects
what must be sent in an output buffer (``data_to_send()``).  The asyncio
server in :mod:`qmpd.nbd.server` and the client in :mod:`qmpd.nbd.client`
are thin layers over this package, and the unit tests and the fuzzers drive it
with plain bytes.

Modules: :mod:`.constants` (numbers and flags), :mod:`.sansio` (NEED_DATA,
ProtocolError), :mod:`.options` (reading option payloads as QEMU does),
:mod:`.handshake`, :mod:`.transmission` and :mod:`.replies`, each with both
sides of its phase.  Everything public is re-exported here, so
``from qmpd.nbd import protocol as p; p.Transmission`` works.

What the server implements (the fixed newstyle protocol, as QEMU 7.2's
server speaks it; see the NBD specification ``doc/proto.md``):

* handshake: ``NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES``; options
  EXPORT_NAME, ABORT, LIST, STARTTLS (with TLS credentials: required
  before any other option, see :class:`StartTls`), INFO, GO,
  STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT
  (``base:allocation``, ``qemu:allocation-depth``, ``qemu:dirty-bitmap:NAME``);
  every other option is
  answered ``NBD_REP_ERR_UNSUP`` and negotiation goes on;
* transmission: 28-byte requests, validated here exactly as QEMU's server
  validates them (its error numbers and messages); the caller executes the
  commands that pass and encodes their replies with :class:`Replies`.

All integers on the wire are big-endian.
"""

from qmpd.nbd.protocol.constants import (
    ALLOCATION_DEPTH,
    BASE_ALLOCATION,
    COMMAND_NAMES,
    CONTEXT_IDS,
    DEFAULT_PORT,
    DIRTY_BITMAP_ID,
    DIRTY_BITMAP_PREFIX,
    IHAVEOPT,
    MAX_BUFFERED_OPTION,
    MAX_EXTENTS,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_NAMES,
    OPTION_REPLY_MAGIC,
    REP_ERR,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_DIRTY,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TFlag,
    errno_to_nbd,
)
from qmpd.nbd.protocol.handshake import (
    OPTION_REPLY_HEADER_SIZE,
    ExportCatalog,
    ExportDescription,
    ExportInfo,
    HandshakeClosed,
    HandshakeDone,
    HandshakeEvent,
    OptionReply,
    ServerHandshake,
    StartTls,
    client_flags_bytes,
    context_id,
    info_request_data,
    match_contexts,
    meta_request_data,
    option_reply,
    option_request,
    parse_export_info,
    parse_greeting,
    parse_option_reply_header,
)
from qmpd.nbd.protocol.replies import (
    CHUNK_HEADER_SIZE,
    SIMPLE_REPLY_SIZE,
    FileSpan,
    ReadData,
    Replies,
    ReplyHeader,
    ReplyPart,
    block_status_chunk,
    chunk_header,
    data_chunk_header,
    error_chunk,
    hole_chunk,
    merge_extents,
    none_chunk,
    parse_chunk_header,
    parse_error_payload,
    parse_extents,
    parse_reply_magic,
    parse_simple_reply,
    simple_reply,
)
from qmpd.nbd.protocol.sansio import (
    NEED_DATA,
    NeedData,
    ProtocolError,
)
from qmpd.nbd.protocol.transmission import (
    REQUEST_SIZE,
    Disconnect,
    Rejected,
    Request,
    Transmission,
    TransmissionEvent,
    Violation,
    request_header,
)

__all__ = [
    "ALLOCATION_DEPTH",
    "BASE_ALLOCATION",
    "CHUNK_HEADER_SIZE",
    "COMMAND_NAMES",
    "CONTEXT_IDS",
    "DEFAULT_PORT",
    "DIRTY_BITMAP_ID",
    "DIRTY_BITMAP_PREFIX",
    "IHAVEOPT",
    "MAX_BUFFERED_OPTION",
    "MAX_EXTENTS",
    "MAX_OPTION_LENGTH",
    "MAX_PAYLOAD",
    "MAX_STRING",
    "NBDMAGIC",
    "NEED_DATA",
    "OPTION_NAMES",
    "OPTION_REPLY_HEADER_SIZE",
    "OPTION_REPLY_MAGIC",
    "REP_ERR",
    "REQUEST_MAGIC",
    "REQUEST_SIZE",
    "SIMPLE_REPLY_MAGIC",
    "SIMPLE_REPLY_SIZE",
    "STATE_DIRTY",
    "STATE_HOLE",
    "STATE_ZERO",
    "STRUCTURED_REPLY_MAGIC",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "Disconnect",
    "Errno",
    "ExportCatalog",
    "ExportDescription",
    "ExportInfo",
    "FileSpan",
    "HandshakeClosed",
    "HandshakeDone",
    "HandshakeEvent",
    "HandshakeFlag",
    "Info",
    "NeedData",
    "Opt",
    "OptionReply",
    "ProtocolError",
    "ReadData",
    "Rejected",
    "Rep",
    "Replies",
    "ReplyFlag",
    "ReplyHeader",
    "ReplyPart",
    "ReplyType",
    "Request",
    "ServerHandshake",
    "StartTls",
    "TFlag",
    "Transmission",
    "TransmissionEvent",
    "Violation",
    "block_status_chunk",
    "chunk_header",
    "client_flags_bytes",
    "context_id",
    "data_chunk_header",
    "errno_to_nbd",
    "error_chunk",
    "hole_chunk",
    "info_request_data",
    "match_contexts",
    "merge_extents",
    "meta_request_data",
    "none_chunk",
    "option_reply",
    "option_request",
    "parse_chunk_header",
    "parse_error_payload",
    "parse_export_info",
    "parse_extents",
    "parse_greeting",
    "parse_option_reply_header",
    "parse_reply_magic",
    "parse_simple_reply",
    "request_header",
    "simple_reply",
]
