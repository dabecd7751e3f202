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
_SHARED_SHIFT = SHARED_BASE - PERM_BASE
_PERM_ALL = int(PERM_ALL)

# struct flock on Linux: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (OFD locks need l_pid = 0).
_FLOCK = struct.Struct("hhqqi4x")
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


class LockError(Exception):
    """A lock could not be taken; the message is QEMU's."""


def _fcntl_lock(fd: int, cmd: int, lock_type: int, offset: int, length: int = 1) -> bytes:
    request = _FLOCK.pack(lock_type, os.SEEK_SET, offset, length, 0)
    return fcntl.fcntl(fd, cmd, request)


def lock_byte(fd: int, offset: int, shared: bool = True) -> None:
    _fcntl_lock(fd, _F_OFD_SETLK, fcntl.F_RDLCK if shared else fcntl.F_WRLCK, offset)


def unlock_byte(fd: int, offset: int) -> None:
    _fcntl_lock(fd, _F_OFD_SETLK, fcntl.F_UNLCK, offset)


def byte_is_locked_by_others(fd: int, offset: int, length: int = 1) -> bool:
    """Would an exclusive lock on the range conflict with someone's lock?"""
    answer = _fcntl_lock(fd, _F_OFD_GETLK, fcntl.F_WRLCK, offset, length)
    lock_type: int = _FLOCK.unpack(answer)[0]
    return lock_type != fcntl.F_UNLCK


def _runs(bits: int) -> list[tuple[int, int]]:
    """The runs of adjacent set bits of a permission mask: (first bit, count)."""
    runs = []
    i = 0
    while bits >> i:
        if bits >> i & 1:
            start = i
            while bits >> i & 1:
                i += 1
            runs.append((start, i - start))
        else:
            i += 1
    return runs


def _set_runs(fd: int, base: int, bits: int, lock_type: int) -> None:
    # The kernel merges adjacent bytes of one owner into one range anyway, so
    # a run of bytes locked in one call leaves exactly the state that one
    # call per byte (QEMU's way) leaves: other processes see the same bytes.
    for start, count in _runs(bits):
        _fcntl_lock(fd, _F_OFD_SETLK, lock_type, base + start, count)


def _span(bits: int) -> tuple[int, int]:
    """The smallest (first bit, count) covering every set bit."""
    low = (bits & -bits).bit_length() - 1
    return low, bits.bit_length() - low


def ofd_locks_available(fd: int) -> bool:
    try:
        byte_is_locked_by_others(fd, PERM_BASE)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True


def _let_go(base: int, dropped: int, kept: int) -> list[tuple[int, int]]:
    """The ranges that unlock the bytes of ``dropped``: one when no byte kept
    lies between them (unlocking a byte not held changes nothing, so the bytes
    other processes see are the ones a call per byte would leave)."""
    if not dropped:
        return []
    low = (dropped & -dropped).bit_length() - 1
    high = dropped.bit_length() - 1
    if kept >> low & ((2 << (high - low)) - 1):
        return [(base + i, 1) for i in range(low, high + 1) if dropped >> i & 1]
    return [(base + low, high - low + 1)]


def _let_go_plan(old_held: int, held: int, old_unshared: int, unshared: int) -> tuple[bytes, ...]:
    """The unlock requests that take the bytes from the old sets down to the
    new ones (each a subset of the old): both sets in one request when no kept
    byte lies between the dropped ones (inactivation: write and resize, held
    and unshared)."""
    dropped = old_held & ~held | (old_unshared & ~unshared) << _SHARED_SHIFT
    if not dropped:
        return ()
    low = (dropped & -dropped).bit_length() - 1
    span = dropped.bit_length() - low
    if (held | unshared << _SHARED_SHIFT) >> low & ((1 << span) - 1):
        ranges = _let_go(PERM_BASE, old_held & ~held, held) \
            + _let_go(SHARED_BASE, old_unshared & ~unshared, unshared)
    else:
        ranges = [(PERM_BASE + low, span)]
    return tuple(_FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0)
                 for start, length in ranges)


#: _let_go_plan by (old held, held, old unshared, unshared), four bits each:
#: at most 3^8 entries (each new set is a subset of the old one), made on use
#: but for the usual inactivations (a read-write or read-only format node's
#: file lets go of write and resize), made here: not in a handover's downtime.
_PLANS: dict[int, tuple[bytes, ...]] = {}
_WRITE_RESIZE = int(Perm.WRITE | Perm.RESIZE)
for _held, _unshared in ((0b1011, 0b1010), (0b0001, 0b1010)):
    _PLANS[_held << 12 | (_held & ~_WRITE_RESIZE) << 8 | _unshared << 4
           | _unshared & ~_WRITE_RESIZE] = _let_go_plan(
        _held, _held & ~_WRITE_RESIZE, _unshared, _unshared & ~_WRITE_RESIZE)


class ImageLock:
    """The lock bytes one open file holds, kept in step with its permissions.

    Permission sets are handled as plain ints here: this runs for every node
    at every activation, and IntFlag arithmetic costs more than the syscalls.
    """

    __slots__ = ("fd", "held", "unshared")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held = 0  # bits whose byte 100+bit we hold
        self.unshared = 0  # bits whose byte 200+bit we hold

    def _apply(self, held: int, unshared: int) -> None:
        fd = self.fd
        _set_runs(fd, PERM_BASE, held & ~self.held, fcntl.F_RDLCK)
        _set_runs(fd, PERM_BASE, self.held & ~held, fcntl.F_UNLCK)
        _set_runs(fd, SHARED_BASE, unshared & ~self.unshared, fcntl.F_RDLCK)
        _set_runs(fd, SHARED_BASE, self.unshared & ~unshared, fcntl.F_UNLCK)
        self.held, self.unshared = held, unshared

    def _check(self, perm: int, shared: int) -> None:
        # One test over the span of the bytes that matter answers the usual
        # case (nobody in the way); only when something is in the way are the
        # bytes tested one by one, in QEMU's order, for QEMU's message.
        fd = self.fd
        unshared = ~shared & _PERM_ALL
        if perm and byte_is_locked_by_others(fd, SHARED_BASE + _span(perm)[0], _span(perm)[1]):
            for i in range(4):
                if perm & (1 << i) and byte_is_locked_by_others(fd, SHARED_BASE + i):
                    raise LockError(f'Failed to get "{PERM_NAMES[Perm(1 << i)]}" lock')
        if unshared and byte_is_locked_by_others(
            fd, PERM_BASE + _span(unshared)[0], _span(unshared)[1]
        ):
            for i in range(4):
                if unshared & (1 << i) and byte_is_locked_by_others(fd, PERM_BASE + i):
                    raise LockError(f'Failed to get shared "{PERM_NAMES[Perm(1 << i)]}" lock')

    def update(self, perm: int, shared: int) -> None:
        """Hold ``perm`` and refuse to share what ``shared`` leaves out.

        As QEMU does: first add the new bytes to the old ones, then check for
        conflicts, then drop what is no longer needed; on a conflict, go
        back to exactly the old set.
        """
        perm_i = int(perm)
        shared_i = int(shared)
        unshared = ~shared_i & _PERM_ALL
        old_held, old_unshared = self.held, self.unshared
        if perm_i == old_held and unshared == old_unshared:
            return
        if perm_i | old_held == old_held and unshared | old_unshared == old_unshared:
            # Only bytes to let go (inactivation): nothing can conflict, and
            # QEMU's raw_handle_perm_lock checks nothing either.  The requests
            # depend on the four sets only: made once, then reused.
            key = old_held << 12 | perm_i << 8 | old_unshared << 4 | unshared
            plan = _PLANS.get(key)
            if plan is None:
                plan = _PLANS[key] = _let_go_plan(old_held, perm_i, old_unshared, unshared)
            fd = self.fd
            for request in plan:
                fcntl.fcntl(fd, _F_OFD_SETLK, request)
            self.held, self.unshared = perm_i, unshared
            return
        try:
            self._apply(old_held | perm_i, old_unshared | unshared)
            self._check(perm_i, shared_i)
        except (LockError, OSError):
            self._apply(old_held, old_unshared)
            raise
        self._apply(perm_i, unshared)

    def rehearse_let_go(self, bits: int) -> None:
        """Look up the requests that would let go of ``bits`` (held and
        unshared), and ask the kernel whether anyone else holds the bytes
        held here (F_OFD_GETLK: a question, it takes and drops nothing).
        Changes nothing: the plan made here is not kept, no lock is touched."""
        old_held, old_unshared = self.held, self.unshared
        if not old_held:
            return
        held, unshared = old_held & ~bits, old_unshared & ~bits
        if _PLANS.get(old_held << 12 | held << 8 | old_unshared << 4 | unshared) is None:
            _let_go_plan(old_held, held, old_unshared, unshared)
        low, count = _span(old_held)
        byte_is_locked_by_others(self.fd, PERM_BASE + low, count)

    def copy_to(self, fd: int) -> None:
        """Take the bytes held here on another open file of the same image."""
        other = ImageLock(fd)
        other._apply(self.held, self.unshared)

    def release(self) -> None:
        self._apply(0, 0)
