"""How a failed NBD request is answered: the NBD error and QEMU's message.

A request fails with :class:`NbdFailure` when the export refuses it with a
given NBD error; an I/O error keeps its errno on the wire (ENOSPC stays
ENOSPC, as QEMU's server does) with QEMU's text for the command; anything
else is EIO.  I/O errors are logged once per node and errno.
"""

from __future__ import annotations

import errno

from qmpd.block.errorlog import IO_ERRORS
from qmpd.errors import BlockDriverError
from qmpd.nbd import protocol as p


class NbdFailure(Exception):
    """A request that failed: the NBD error value and QEMU's message."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


_IO_MESSAGES = {
    p.Cmd.READ: "reading from file failed",
    p.Cmd.WRITE: "writing to file failed",
    p.Cmd.WRITE_ZEROES: "writing to file failed",
    p.Cmd.TRIM: "discard failed",
    p.Cmd.FLUSH: "flush failed",
    p.Cmd.CACHE: "caching failed",
    p.Cmd.BLOCK_STATUS: "can't get block status",
}


def error_reply(replies: p.Replies, request: p.Request, exc: BaseException,
                node_name: str, export_id: str) -> bytes:
    """The error reply of ``request``, which raised ``exc``, logged."""
    if isinstance(exc, NbdFailure):
        return replies.error(request.cookie, exc.error, exc.message)
    message = _IO_MESSAGES.get(p.Cmd(request.type), "request failed")
    if isinstance(exc, (BlockDriverError, OSError)):
        err = exc.errno or errno.EIO
        IO_ERRORS.report_errno(
            node_name, err, f"NBD {request.command_name} on export {export_id}"
        )
        return replies.error(request.cookie, p.errno_to_nbd(err), message)
    IO_ERRORS.report(
        node_name, type(exc).__name__,
        f"NBD {request.command_name} on export {export_id} failed", exc,
    )
    return replies.error(request.cookie, p.Errno.EIO, message)
