"""Creating an image file (QEMU 7.2's ``raw_co_create`` of file-posix).

Blocking: run it in an I/O thread.  The file is created if missing, locked
as a writer that lets nobody resize it, truncated to zero, then grown to its
size with the preallocation asked for.  ``nocow`` sets the no-copy-on-write
attribute where the filesystem has one (btrfs); ``extent-size-hint`` is
checked as QEMU checks it but, as QEMU does on filesystems without extent
size hints (all but XFS), not applied.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from qmpd.block.driver import PERM_ALL, Perm
from qmpd.block.locking import ImageLock, LockError, ofd_locks_available
from qmpd.block.qcow2.create import CreateError, as_int64

_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_NOCOW_FL = 0x00800000
_ZEROS = bytes(65536)

#: The default extent size hint (1 MiB) and the largest one (UINT32_MAX).
DEFAULT_EXTENT_SIZE_HINT = 1 << 20
_MAX_EXTENT_SIZE_HINT = (1 << 32) - 1


def _set_nocow(fd: int) -> None:
    """FS_NOCOW_FL where the filesystem knows it; failures are ignored, as QEMU does."""
    try:
        raw = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("l", 0))
        flags = struct.unpack("l", raw)[0] | _FS_NOCOW_FL
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", flags))
    except OSError:
        pass


def truncate_file(fd: int, size: int, prealloc: str) -> None:
    """file-posix's handle_aiocb_truncate: resize, allocating the new part as asked."""
    current = os.fstat(fd).st_size
    if current > size and prealloc != "off":
        raise CreateError("Cannot use preallocation for shrinking files", errno.ENOTSUP)
    if prealloc == "falloc":
        if size != current:
            try:
                os.posix_fallocate(fd, current, size - current)
            except OSError as exc:
                raise CreateError(f"Could not preallocate new data: {exc.strerror}",
                                  exc.errno or errno.EIO) from None
            if current == 0:
                # QEMU writes the first block so that alignment probing sees data.
                os.pwrite(fd, bytes(min(size, 512 if size < 4096 else 4096)), 0)
        return
    if prealloc == "full":
        try:
            os.ftruncate(fd, size)
            pos, left = current, size - current
            while left > 0:
                pos += os.pwrite(fd, _ZEROS[:min(left, len(_ZEROS))], pos)
                left = size - pos
            os.fsync(fd)
        except OSError as exc:
            raise CreateError(f"Could not resize file: {exc.strerror}",
                              exc.errno or errno.EIO) from None
        return
    if prealloc == "off":
        try:
            os.ftruncate(fd, size)
        except OSError as exc:
            raise CreateError(f"Could not resize file: {exc.strerror}",
                              exc.errno or errno.EIO) from None
        return
    raise CreateError(f"Unsupported preallocation mode: {prealloc}", errno.ENOTSUP)


def open_new(filename: str, extent_size_hint: int = DEFAULT_EXTENT_SIZE_HINT
             ) -> tuple[int, ImageLock | None]:
    """The first, synchronous part of raw_co_create: create or open, lock as a writer."""
    if extent_size_hint & ((1 << 64) - 1) > _MAX_EXTENT_SIZE_HINT:
        raise CreateError("Extent size hint is too large")
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CreateError(f"Could not create '{filename}': {exc.strerror}",
                          exc.errno or errno.EIO) from None
    try:
        lock = ImageLock(fd) if ofd_locks_available(fd) else None
        if lock is not None:
            try:
                lock.update(int(Perm.WRITE | Perm.RESIZE), int(PERM_ALL & ~Perm.RESIZE))
            except LockError as exc:
                raise CreateError(str(exc), errno.EAGAIN) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, lock


def fill(fd: int, lock: ImageLock | None, size: int, prealloc: str = "off",
         nocow: bool = False) -> None:
    """The rest (blocking, for an I/O thread): empty, resize, preallocate; then close."""
    try:
        truncate_file(fd, 0, "off")
        if nocow:
            _set_nocow(fd)
        truncate_file(fd, as_int64(size), prealloc)
    finally:
        if lock is not None:
            lock.release()
        os.close(fd)


def create_file(filename: str, size: int, prealloc: str = "off", nocow: bool = False,
                extent_size_hint: int = DEFAULT_EXTENT_SIZE_HINT) -> None:
    """Create (or empty) ``filename`` and give it ``size`` bytes; QEMU's texts on failure."""
    fd, lock = open_new(filename, extent_size_hint)
    fill(fd, lock, size, prealloc, nocow)
