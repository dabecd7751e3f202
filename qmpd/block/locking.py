"""QEMU's image locking: one-byte OFD locks that qemu-img, qemu-io and QEMU honour.

Byte ``100 + bit`` locked (shared) means "I hold permission bit"; byte
``200 + bit`` locked means "I do not share permission bit".  A conflict is
found by asking whether an exclusive lock on a byte could be taken.  Open
file description (OFD) locks belong to the open file, not the process, so
two nodes on the same file conflict even inside one qmpd, as in QEMU.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from qmpd.block.driver import PERM_ALL, PERM_NAMES, Perm

PERM_BASE = 100
SHARED_BASE = 200
_BITS = [(i, Perm(1 << i)) for i in range(4)]

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (OFD locks need l_pid = 0).
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


class LockError(Exception):
    """A lock could not be taken; the message is QEMU's."""


def _fcntl_lock(fd: int, cmd: int, lock_type: int, offset: int) -> bytes:
    request = _FLOCK.pack(lock_type, os.SEEK_SET, offset, 1, 0)
    return fcntl.fcntl(fd, cmd, request)


def lock_byte(fd: int, offset: int, shared: bool = True) -> None:
    _fcntl_lock(fd, _F_OFD_SETLK, fcntl.F_RDLCK if shared else fcntl.F_WRLCK, offset)


def unlock_byte(fd: int, offset: int) -> None:
    _fcntl_lock(fd, _F_OFD_SETLK, fcntl.F_UNLCK, offset)


def byte_is_locked_by_others(fd: int, offset: int) -> bool:
    """Would an exclusive lock on ``offset`` conflict with someone's lock?"""
    answer = _fcntl_lock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, offset)
    lock_type: int = _FLOCK.unpack(answer)[0]
    return lock_type != fcntl.F_UNLCK


def ofd_locks_available(fd: int) -> bool:
    try:
        byte_is_locked_by_others(fd, PERM_BASE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


class ImageLock:
    """The lock bytes one open file holds, kept in step with its permissions."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held = Perm.NONE  # bytes 100+bit we hold
        self.unshared = Perm.NONE  # bytes 200+bit we hold

    def _apply(self, held: Perm, unshared: Perm) -> None:
        for i, bit in _BITS:
            if held & bit and not self.held & bit:
                lock_byte(self.fd, PERM_BASE + i)
            elif not held & bit and self.held & bit:
                unlock_byte(self.fd, PERM_BASE + i)
            if unshared & bit and not self.unshared & bit:
                lock_byte(self.fd, SHARED_BASE + i)
            elif not unshared & bit and self.unshared & bit:
                unlock_byte(self.fd, SHARED_BASE + i)
        self.held, self.unshared = held, unshared

    def _check(self, perm: Perm, shared: Perm) -> None:
        for i, bit in _BITS:
            if perm & bit and byte_is_locked_by_others(self.fd, SHARED_BASE + i):
                raise LockError(f'Failed to get "{PERM_NAMES[bit]}" lock')
        for i, bit in _BITS:
            if not shared & bit and byte_is_locked_by_others(self.fd, PERM_BASE + i):
                raise LockError(f'Failed to get shared "{PERM_NAMES[bit]}" lock')

    def update(self, perm: Perm, shared: Perm) -> None:
        """Hold ``perm`` and refuse to share what ``shared`` leaves out.

        As QEMU does: first add the new bytes to the old ones, then check for
        conflicts, then drop what is no longer needed; on a conflict, go
        back to exactly the old set.
        """
        unshared = ~shared & PERM_ALL
        old_held, old_unshared = self.held, self.unshared
        try:
            self._apply(old_held | perm, old_unshared | unshared)
            self._check(perm, shared)
        except (LockError, OSError):
            self._apply(old_held, old_unshared)
            raise
        self._apply(perm, unshared)

    def release(self) -> None:
        self._apply(Perm.NONE, Perm.NONE)
