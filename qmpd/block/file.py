"""The ``file`` protocol driver: a host file, read and written with pread/pwrite."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import threading
from typing import Any

from qmpd.block.accounting import WriteGenerations
from qmpd.block.blocking import BlockingRead, CacheReload, OpenJob, WouldBlock
from qmpd.block.driver import BlockDriver, BlockDriverError, BlockStatus, NodeState, Perm
from qmpd.block.extent import HostSpan, preadv_full, read_span
from qmpd.block.locking import ImageLock, LockError, ofd_locks_available
from qmpd.block.mounts import MOUNTS

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_TMPFS_MAGIC = 0x01021994
_LOCAL_FILESYSTEMS = frozenset({
    0xEF53,  # ext2, ext3, ext4
    0x58465342,  # xfs
    0x9123683E,  # btrfs
    0xF2F52010,  # f2fs
    _TMPFS_MAGIC,
})
#: Largest request done on the event loop itself for a memory-backed file.
_INLINE_MAX = 1 << 20
#: The same for reads into and writes from callers' buffers (bulk copies of
#: jobs, several in flight): past it, copies in the I/O threads overlap.
_INLINE_VIEW_MAX = 128 << 10


def _filesystem_type(fd: int) -> int:
    """The magic number of the filesystem ``fd`` lies on (statfs's f_type), 0 if unknown."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc.fstatfs(fd, buf) != 0:
        return 0
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little")


def _path_filesystem_type(path: str) -> int:
    """statfs's f_type for ``path``, 0 if unknown (only call it where no mount can hang)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        return 0
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little")


def page_cache_is_shared(fs_type: int) -> bool:
    """Whether every writer of a regular file on this filesystem goes through
    this host's page cache, so that no page of it can be stale here.

    True only for local filesystems (ext2/3/4, xfs, btrfs, f2fs, tmpfs); a
    network, cluster or FUSE filesystem may be written by another host.
    """
    return fs_type in _LOCAL_FILESYSTEMS


def _lock_error(exc: LockError | OSError) -> BlockDriverError:
    """A failed lock update as the graph reports it (QEMU's texts)."""
    if isinstance(exc, LockError):
        return BlockDriverError(str(exc), errno.EAGAIN)
    return BlockDriverError(f"Failed to lock image: {exc.strerror}", exc.errno or errno.EIO)


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    """Read ``length`` bytes; what lies past the end of the file reads as zeros."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            parts.append(bytes(length - got))
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _pread_now(fd: int, length: int, offset: int) -> bytes:
    """:func:`_pread_full` from the page cache alone; :class:`WouldBlock` where
    a page would have to come from the disk."""
    buf = bytearray(length)
    try:
        preadv_full(fd, memoryview(buf), offset, os.RWF_NOWAIT)
    except BlockingIOError:
        raise WouldBlock(f"{length} bytes at {offset} are not in the page cache") from None
    return bytes(buf)


def _pread_ranges(fd: int, ranges: list[tuple[int, int]]) -> list[bytes]:
    """Metadata reads: exactly the ranges, no read-ahead around them (after
    the page cache was dropped, the default window would have the disk
    deliver far more than was asked for), several ones asked of the disk
    at once."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    try:
        for offset, length in ranges[1:]:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        return [_pread_full(fd, length, offset) for offset, length in ranges]
    finally:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)


_DIRECT_ALIGN = 4096
_bounce = threading.local()


def _bounce_buffer(size: int) -> memoryview:
    """A page-aligned buffer of at least ``size`` bytes, reused per I/O thread."""
    buf: mmap.mmap | None = getattr(_bounce, "buf", None)
    if buf is None or len(buf) < size:
        if buf is not None:
            buf.close()
        buf = mmap.mmap(-1, max(size, 1 << 20))
        _bounce.buf = buf
    return memoryview(buf)[:size]


def _direct_pread(fd: int, length: int, offset: int) -> bytes:
    """O_DIRECT read: page-aligned memory, and an aligned window around the range."""
    start = offset - offset % _DIRECT_ALIGN
    end = -(-(offset + length) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    view = _bounce_buffer(end - start)
    try:
        got = os.preadv(fd, [view], start)
        data = bytes(view[offset - start : offset - start + length])
    finally:
        view.release()
    if got < offset - start + length:
        # Past the end of the file reads as zeros.
        valid = max(got - (offset - start), 0)
        data = data[:valid] + bytes(length - valid)
    return data


def _direct_pwrite(fd: int, data: bytes | memoryview, offset: int) -> None:
    """O_DIRECT write; an unaligned range is read, patched and written back."""
    start = offset - offset % _DIRECT_ALIGN
    end = -(-(offset + len(data)) // _DIRECT_ALIGN) * _DIRECT_ALIGN
    unaligned_tail = end != offset + len(data)
    size = os.fstat(fd).st_size if unaligned_tail else 0
    view = _bounce_buffer(end - start)
    try:
        if start != offset or unaligned_tail:
            os.preadv(fd, [view], start)
        view[offset - start : offset - start + len(data)] = data
        done = 0
        while done < end - start:
            done += os.pwritev(fd, [view[done:]], start + done)
    finally:
        view.release()
    if unaligned_tail and end > size:
        # Do not let the alignment padding grow the file.
        os.ftruncate(fd, max(size, offset + len(data)))


def _direct_preadv(fd: int, buf: memoryview, offset: int) -> None:
    """O_DIRECT read into ``buf`` (through the aligned bounce buffer)."""
    buf[:] = _direct_pread(fd, buf.nbytes, offset)


#: A span is copied in pieces of this size, each written while still cached.
_SPAN_PIECE = 256 << 10


def _copy_span(span: HostSpan, fd: int, offset: int) -> None:
    """Copy ``span`` to ``offset`` of ``fd`` through its scratch buffer, a piece
    at a time (in an I/O thread)."""
    done = 0
    while done < span.length:
        n = min(_SPAN_PIECE, span.length - done)
        view = span.scratch[:n]
        read_span(span, view, done)
        _pwrite_full(fd, view, offset + done)
        done += n


def _pwrite_full(fd: int, data: bytes | memoryview, offset: int) -> None:
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    offset += written
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


_WRITE_OR_RESIZE = int(Perm.WRITE | Perm.RESIZE)
# Read once: a member read through its class is a descriptor call.
_ACTIVE, _INACTIVE = NodeState.ACTIVE, NodeState.INACTIVE

#: What opening does in an I/O thread: (fd, flags, size, filesystem type, OFD locks work).
_Opened = tuple[int, int, int, int, bool]


class FileDriver(BlockDriver):
    """Options: ``filename``, ``locking`` (on/off/auto), ``drop-cache``, ``aio``."""

    format_name = "file"
    is_protocol = True

    def __init__(self, node: Any) -> None:
        super().__init__(node)
        self.path = ""
        self.fd = -1
        self.lock: ImageLock | None = None
        self.drop_cache = True
        # drop-cache given explicitly: drop even where the page cache is shared.
        self._drop_cache_asked = False
        self._shared_page_cache = False
        self._size = 0
        self._inline = False
        self._gens = WriteGenerations()
        self._page_cache_inconsistent = False
        # auto-read-only: the descriptor is read-write only while a parent
        # holds write or resize (QEMU's dynamic auto-read-only).
        self._auto_read_only = False
        self._flags = 0

    async def open(self, options: dict[str, Any]) -> None:
        # Open, check and size the file in one I/O-thread job (one hop per node).
        job = self.begin_open(options)
        await job.finish(await job.start(self.node.graph.run_io))

    def begin_open(self, options: dict[str, Any]) -> OpenJob:
        node = self.node
        self.path = options["filename"]
        asked = options.get("drop-cache")
        self.drop_cache = True if asked is None else bool(asked)
        self._drop_cache_asked = asked is not None
        locking = options.get("locking", "auto")
        flags = os.O_CLOEXEC | (os.O_RDONLY if node.read_only else os.O_RDWR)
        if node.cache_direct:
            flags |= os.O_DIRECT
        auto_read_only = bool(options.get("_auto_read_only")) and not node.read_only
        probe_locks = locking == "auto"

        # With no remote mount anywhere to reach through a link, on a local
        # filesystem, the open costs less than the hop to an I/O thread: the
        # statfs has just looked the path up, so the open finds it cached.
        # The reads after it run here too on tmpfs; elsewhere only what the
        # page cache holds (the rest waits for an I/O thread).  O_NONBLOCK
        # keeps a FIFO (or a device) from blocking the loop.
        fs_type = _path_filesystem_type(self.path) \
            if not node.cache_direct and MOUNTS.all_local() else 0
        quick = fs_type in _LOCAL_FILESYSTEMS
        open_flags = flags | os.O_NONBLOCK if quick else flags
        cached_only = quick and fs_type != _TMPFS_MAGIC

        def run() -> _Opened:
            return self._open_blocking(open_flags, auto_read_only, probe_locks)

        async def finish(opened: _Opened) -> None:
            self.fd, self._flags, self._size, fs_type, lockable = opened
            self._inline = fs_type == _TMPFS_MAGIC and not node.cache_direct
            self._shared_page_cache = page_cache_is_shared(fs_type)
            self._auto_read_only = auto_read_only
            if locking == "on" or (locking == "auto" and lockable):
                self.lock = ImageLock(self.fd)

        def reader(opened: _Opened) -> BlockingRead:
            if cached_only:
                fd = opened[0]
                return lambda ranges: [_pread_now(fd, n, offset) for offset, n in ranges]
            return self._reader_after_open(opened)

        return OpenJob(run, finish, reader, waits=not quick)

    def _reader_after_open(self, opened: _Opened) -> BlockingRead:
        """The blocking reader the file will have once ``opened`` is installed."""
        fd, _flags, _size, fs_type, _lockable = opened
        inline = fs_type == _TMPFS_MAGIC and not self.node.cache_direct
        return self._reader(fd, inline, self._drops(page_cache_is_shared(fs_type)))

    def _open_blocking(
        self, flags: int, auto_read_only: bool, probe_locks: bool
    ) -> _Opened:
        """In an I/O thread: (fd, flags, size, filesystem type of a regular file
        or 0, OFD locks work)."""
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            if not (auto_read_only and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM)):
                raise BlockDriverError(f"Could not open '{self.path}': {exc.strerror}",
                                       exc.errno or errno.EIO) from None
            flags = (flags & ~os.O_RDWR) | os.O_RDONLY
            try:
                fd = os.open(self.path, flags)
            except OSError as exc2:
                raise BlockDriverError(f"Could not open '{self.path}': {exc2.strerror}",
                                       exc2.errno or errno.EIO) from None
        try:
            if flags & os.O_NONBLOCK:
                os.set_blocking(fd, True)
                flags &= ~os.O_NONBLOCK
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise BlockDriverError(f"Could not open '{self.path}': Is a directory",
                                       errno.EISDIR)
            self._check_type(st.st_mode)
            size = self._length(fd, st)
            # A device node's filesystem (devtmpfs) says nothing of its data.
            fs_type = _filesystem_type(fd) if stat.S_ISREG(st.st_mode) else 0
            return fd, flags, size, fs_type, probe_locks and ofd_locks_available(fd)
        except BaseException:
            os.close(fd)
            raise

    def _check_type(self, mode: int) -> None:
        if not stat.S_ISREG(mode):
            raise BlockDriverError(
                f"'{self.format_name}' driver requires '{self.path}' to be a regular file",
                errno.EINVAL,
            )

    def _length(self, fd: int, st: os.stat_result | None = None) -> int:
        return (st or os.fstat(fd)).st_size

    async def close(self) -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        if self.lock is not None:
            try:
                self.lock.release()
            except OSError:
                pass
        await self.node.graph.run_io(os.close, fd)

    # --- I/O --------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if self._inline and length <= _INLINE_MAX:
            return _pread_full(self.fd, length, offset)
        if self.node.cache_direct:
            return await self.node.graph.run_io(_direct_pread, self.fd, length, offset)
        return await self.node.graph.run_io(_pread_full, self.fd, length, offset)

    async def read_into(self, offset: int, buf: memoryview) -> None:
        if self._inline and buf.nbytes <= _INLINE_VIEW_MAX:
            preadv_full(self.fd, buf, offset)
        elif self.node.cache_direct:
            await self.node.graph.run_io(_direct_preadv, self.fd, buf, offset)
        else:
            await self.node.graph.run_io(preadv_full, self.fd, buf, offset)

    def host_file(self, offset: int, length: int) -> tuple[int, int] | None:
        if self.fd < 0 or self.node.cache_direct or offset + length > self._size:
            return None
        return self.fd, offset

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None:
        await self._write(offset, data, fua)

    def read_now(self, offset: int, length: int) -> bytes | None:
        if self._inline and length <= _INLINE_MAX:
            return _pread_full(self.fd, length, offset)
        return None

    def write_now(self, offset: int, data: bytes, fua: bool) -> bool:
        if not self._inline or fua or len(data) > _INLINE_MAX:
            return False
        _pwrite_full(self.fd, data, offset)
        self._written(offset + len(data))
        return True

    async def write_view(self, offset: int, view: memoryview, fua: bool = False) -> None:
        await self._write(offset, view, fua, _INLINE_VIEW_MAX)

    async def write_span(self, offset: int, span: HostSpan, fua: bool = False) -> None:
        if self.node.cache_direct:
            await super().write_span(offset, span, fua)
            return
        await self.node.graph.run_io(_copy_span, span, self.fd, offset)
        self._written(offset + span.length)
        if fua:
            await self.flush()

    async def _write(self, offset: int, data: bytes | memoryview, fua: bool,
                     inline_max: int = _INLINE_MAX) -> None:
        if self._inline and len(data) <= inline_max:
            _pwrite_full(self.fd, data, offset)
        elif self.node.cache_direct:
            await self.node.graph.run_io(_direct_pwrite, self.fd, data, offset)
        else:
            await self.node.graph.run_io(_pwrite_full, self.fd, data, offset)
        self._written(offset + len(data))
        if fua:
            await self.flush()

    def _written(self, end: int) -> None:
        self._gens.written += 1  # counted once complete: a flush must cover it
        if end > self._size:
            self._size = end

    async def write_zeroes(
        self, offset: int, length: int, may_unmap: bool = False, fua: bool = False
    ) -> None:
        mode = (
            _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE if may_unmap else _FALLOC_FL_ZERO_RANGE
        )
        try:
            if offset + length > self._size and may_unmap:
                raise OSError(errno.EOPNOTSUPP, "extends the file")
            await self.node.graph.run_io(_fallocate, self.fd, mode, offset, length)
        except OSError:
            writer = _direct_pwrite if self.node.cache_direct else _pwrite_full
            await self.node.graph.run_io(writer, self.fd, bytes(length), offset)
        self._gens.written += 1
        self._size = max(self._size, offset + length)
        if fua:
            await self.flush()

    async def discard(self, offset: int, length: int) -> None:
        if not self.node.discard_unmap:
            return
        try:
            await self.node.graph.run_io(
                _fallocate, self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
            )
        except OSError:
            pass  # discard is advisory
        self._gens.written += 1

    async def flush(self) -> None:
        # After a failed fdatasync the kernel may have dropped the dirty pages
        # and reports the error once: no later flush can vouch for the data
        # (QEMU's page_cache_inconsistent), so every one fails.
        if self._page_cache_inconsistent:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        # Nothing written through this descriptor since the last flush: no
        # fdatasync (it costs milliseconds on a real disk).
        await self._gens.flush(self._fdatasync)

    async def _fdatasync(self) -> None:
        try:
            await self.node.graph.run_io(os.fdatasync, self.fd)
        except OSError:
            self._page_cache_inconsistent = True
            raise

    def has_pending_writes(self) -> bool:
        return self._gens.pending()

    async def truncate(self, size: int) -> None:
        await self.node.graph.run_io(os.ftruncate, self.fd, size)
        self._gens.written += 1
        self._size = size

    async def block_status(self, offset: int, length: int) -> BlockStatus:
        def probe() -> BlockStatus:
            end = min(offset + length, self._size)
            if offset >= end:
                return BlockStatus(length=length, data=False, zero=True, offset=offset)
            try:
                data_at = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to EOF
                    return BlockStatus(length=end - offset, data=False, zero=True, offset=offset)
                return BlockStatus(length=end - offset, data=True, zero=False, offset=offset)
            if data_at > offset:
                return BlockStatus(
                    length=min(data_at, end) - offset, data=False, zero=True, offset=offset
                )
            hole_at = os.lseek(self.fd, offset, os.SEEK_HOLE)
            return BlockStatus(
                length=min(hole_at, end) - offset, data=True, zero=False, offset=offset
            )

        return await self.node.graph.run_io(probe)

    # --- information ------------------------------------------------------------

    def image_info(self) -> dict[str, Any]:
        return {"dirty-flag": False}

    def size(self) -> int:
        return self._size

    def allocated_size(self) -> int | None:
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError:
            return None

    def filename(self) -> str:
        return self.path

    def exact_filename(self) -> str:
        return self.path

    def filename_options(self) -> dict[str, Any]:
        return {"filename": self.path}

    # --- permissions and activation -----------------------------------------------

    def locks_held(self) -> tuple[int, int] | None:
        lock = self.lock
        return (lock.held, lock.unshared) if lock is not None else None

    async def set_perm(self, perm: Perm, shared: Perm) -> None:
        if self._auto_read_only:
            await self._reopen(bool(perm & (Perm.WRITE | Perm.RESIZE)))
        # An inactive node keeps whatever locks it had when it was inactivated
        # (none, for a node opened inactive): QEMU returns early here too.
        # One being inactivated still changes them: its users ask for less.
        self._update_lock(perm, shared)

    def _update_lock(self, perm: int, shared: int) -> None:
        lock = self.lock
        if lock is None or self.node.state is _INACTIVE:
            return
        try:
            lock.update(perm, shared)
        except (LockError, OSError) as exc:
            raise _lock_error(exc) from None

    def set_perm_now(self, perm: int, shared: int) -> bool:
        if self._auto_read_only and self.fd >= 0 \
                and self._reopen_flags(bool(perm & _WRITE_OR_RESIZE)) != self._flags:
            return False  # a reopen opens the file again: in an I/O thread
        lock = self.lock
        if lock is not None and self.node.state is not _INACTIVE:  # _update_lock, inline
            try:
                lock.update(perm, shared)
            except (LockError, OSError) as exc:
                raise _lock_error(exc) from None
        return True

    def rehearse_inactivation(self) -> None:
        lock = self.lock
        if lock is not None and self.node.state is _ACTIVE and not self.has_pending_writes():
            lock.rehearse_let_go(_WRITE_OR_RESIZE)

    def inactivate_now(self) -> bool:
        # inactivate is flush: nothing to sync (and no earlier sync failed)
        # means nothing to wait for.
        return not self._page_cache_inconsistent and not self._gens.pending()

    def _reopen_flags(self, writable: bool) -> int:
        return (self._flags & ~(os.O_RDWR | os.O_RDONLY | os.O_WRONLY)) | (
            os.O_RDWR if writable else os.O_RDONLY
        )

    async def _reopen(self, writable: bool) -> None:
        """Switch the descriptor between read-only and read-write in place.

        The new open file takes the lock bytes before it replaces the old one
        under the same descriptor number, so the image is never unlocked.
        """
        flags = self._reopen_flags(writable)
        if flags == self._flags or self.fd < 0:
            return
        try:
            new = await self.node.graph.run_io(os.open, self.path, flags)
        except OSError as exc:
            raise BlockDriverError(f"Could not open '{self.path}': {exc.strerror}",
                                   exc.errno or errno.EIO) from None
        try:
            if self.lock is not None:
                self.lock.copy_to(new)
            os.dup2(new, self.fd, inheritable=False)
        finally:
            os.close(new)
        self._flags = flags

    async def invalidate_cache(self) -> None:
        if self.fd < 0:
            raise BlockDriverError("The file descriptor is not open")
        await super().invalidate_cache()

    def begin_reload(self) -> CacheReload | None:
        if self.fd < 0:
            return None
        fd = self.fd
        dirty = self._gens.pending()
        drop = self._drops_page_cache()
        length = self._length

        def refresh() -> int:
            if drop:
                # Pages another host wrote may be stale here (NFS): drop them.
                if dirty:
                    os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return length(fd)

        generation = self._gens.written

        async def finish(size: int) -> None:
            self._size = size
            if dirty and drop:
                self._gens.covered(generation)

        return CacheReload(refresh, finish, waits=drop)

    def _drops_page_cache(self) -> bool:
        return self._drops(self._shared_page_cache)

    def _drops(self, shared_page_cache: bool) -> bool:
        # Where every writer shares this host's page cache (a local filesystem:
        # the handover is between two daemons on this host), none of its pages
        # can be stale and dropping them would only make the re-reads go to the
        # disk; QEMU 7.2 drops them anyway (README: differences).
        return (self.drop_cache and not self.node.cache_direct
                and (self._drop_cache_asked or not shared_page_cache))

    def reads_inline(self) -> bool:
        return self._inline

    def reads_cached(self) -> bool:
        return self._inline or not (self.node.cache_direct or self._drops_page_cache())

    def blocking_reader(self) -> BlockingRead | None:
        if self.fd < 0:
            return None
        return self._reader(self.fd, self._inline, self._drops_page_cache())

    def _reader(self, fd: int, inline: bool, drops: bool) -> BlockingRead:
        if self.node.cache_direct:
            return lambda ranges: [_direct_pread(fd, n, offset) for offset, n in ranges]
        if inline or not drops:
            # memory, or a page cache kept at activation: nothing to read ahead
            return lambda ranges: [_pread_full(fd, n, offset) for offset, n in ranges]
        return lambda ranges: _pread_ranges(fd, ranges)


class HostDeviceDriver(FileDriver):
    """``host_device``: the file driver's options, on a block or character device."""

    format_name = "host_device"

    def _check_type(self, mode: int) -> None:
        if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
            raise BlockDriverError(
                f"'{self.format_name}' driver requires '{self.path}' to be either "
                "a character or block device",
                errno.EINVAL,
            )

    def _length(self, fd: int, st: os.stat_result | None = None) -> int:
        # st_size is 0 for devices; seeking to the end gives a block device's size.
        return os.lseek(fd, 0, os.SEEK_END)
