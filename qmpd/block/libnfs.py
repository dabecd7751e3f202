"""A thin ctypes layer over the system's libnfs (``libnfs.so.13``, NFSv3).

Only the synchronous calls are used, each on the one thread that owns its
context (libnfs contexts are not thread-safe).  Without the library,
:func:`load` raises :class:`NfsUnavailable` naming the package.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from typing import Any

PACKAGE = "libnfs13"

_lib: Any = None
_load_lock = threading.Lock()


class NfsUnavailable(Exception):
    """libnfs cannot be loaded."""


class NfsError(OSError):
    """A failed libnfs call: its (negative) errno and libnfs's message."""


def load() -> Any:
    """The library, loaded once; raises :class:`NfsUnavailable` without it."""
    global _lib
    with _load_lock:
        if _lib is not None:
            return _lib
        names = ["libnfs.so.13"]
        found = ctypes.util.find_library("nfs")
        if found:
            names.append(found)
        lib = None
        for name in names:
            try:
                lib = ctypes.CDLL(name, use_errno=True)
                break
            except OSError:
                continue
        if lib is None:
            raise NfsUnavailable(
                f"NFS support needs libnfs (libnfs.so.13, package {PACKAGE}), "
                "which is not installed")
        c_p, c_int, u64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32
        sigs: dict[str, tuple[Any, list[Any]]] = {
            "nfs_init_context": (c_p, []),
            "nfs_destroy_context": (None, [c_p]),
            "nfs_get_error": (ctypes.c_char_p, [c_p]),
            "nfs_set_uid": (None, [c_p, c_int]),
            "nfs_set_gid": (None, [c_p, c_int]),
            "nfs_set_tcp_syncnt": (None, [c_p, c_int]),
            "nfs_set_readahead": (None, [c_p, u32]),
            "nfs_set_pagecache": (None, [c_p, u32]),
            "nfs_set_debug": (None, [c_p, c_int]),
            "nfs_set_timeout": (None, [c_p, c_int]),
            "nfs_mount": (c_int, [c_p, ctypes.c_char_p, ctypes.c_char_p]),
            "nfs_open": (c_int, [c_p, ctypes.c_char_p, c_int, ctypes.POINTER(c_p)]),
            "nfs_close": (c_int, [c_p, c_p]),
            "nfs_pread": (c_int, [c_p, c_p, u64, u64, c_p]),
            "nfs_pwrite": (c_int, [c_p, c_p, u64, u64, c_p]),
            "nfs_fsync": (c_int, [c_p, c_p]),
            "nfs_ftruncate": (c_int, [c_p, c_p, u64]),
            "nfs_fstat64": (c_int, [c_p, c_p, c_p]),
            "nfs_pagecache_invalidate": (None, [c_p, c_p]),
        }
        for fname, (res, args) in sigs.items():
            fn = getattr(lib, fname)
            fn.restype = res
            fn.argtypes = args
        _lib = lib
        return lib


#: struct nfs_stat_64: 17 uint64 fields (room left for more); size is the
#: 8th, blocks the 10th.
_STAT_FIELDS = 32
_ST_SIZE = 7
_ST_BLOCKS = 9

#: Largest single pread/pwrite (libnfs splits further by the server's limits).
_CHUNK = 1 << 20


class NfsFile:
    """One context, mounted, with one open file.  Every method blocks: call
    them from the context's own thread."""

    def __init__(self) -> None:
        self.lib = load()
        self.ctx: Any = self.lib.nfs_init_context()
        if not self.ctx:
            raise NfsError(errno.ENOMEM, "Failed to init NFS context")
        self.fh: Any = None

    def _error(self, ret: int, what: str) -> NfsError:
        msg = self.lib.nfs_get_error(self.ctx) or b""
        err = -ret if ret < 0 else errno.EIO
        return NfsError(err, f"{what}: {msg.decode(errors='replace') or os.strerror(err)}")

    def configure(self, *, uid: int | None, gid: int | None, syncnt: int | None,
                  readahead: int | None, pagecache: int | None, debug: int | None,
                  timeout_ms: int) -> None:
        lib, ctx = self.lib, self.ctx
        lib.nfs_set_timeout(ctx, timeout_ms)
        if uid is not None:
            lib.nfs_set_uid(ctx, uid)
        if gid is not None:
            lib.nfs_set_gid(ctx, gid)
        if syncnt is not None:
            lib.nfs_set_tcp_syncnt(ctx, syncnt)
        if readahead is not None:
            lib.nfs_set_readahead(ctx, readahead)
        if pagecache is not None:
            lib.nfs_set_pagecache(ctx, pagecache)
        if debug is not None:
            lib.nfs_set_debug(ctx, debug)

    def mount(self, host: str, export: str) -> None:
        ret = self.lib.nfs_mount(self.ctx, host.encode(), export.encode())
        if ret != 0:
            raise self._error(ret, "Failed to mount nfs share")

    def open(self, path: str, writable: bool) -> None:
        fh = ctypes.c_void_p()
        flags = os.O_RDWR if writable else os.O_RDONLY
        ret = self.lib.nfs_open(self.ctx, path.encode(), flags, ctypes.byref(fh))
        if ret != 0:
            raise self._error(ret, f"Failed to open file {path}")
        self.fh = fh

    def stat(self) -> tuple[int, int]:
        """(size, allocated bytes) of the open file, asked of the server."""
        buf = (ctypes.c_uint64 * _STAT_FIELDS)()
        ret = self.lib.nfs_fstat64(self.ctx, self.fh, ctypes.byref(buf))
        if ret != 0:
            raise self._error(ret, "Failed to fstat file")
        return int(buf[_ST_SIZE]), int(buf[_ST_BLOCKS]) * 512

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes; past the end of the file reads as zeros."""
        buf = ctypes.create_string_buffer(length)
        got = 0
        while got < length:
            n = min(length - got, _CHUNK)
            ret = self.lib.nfs_pread(self.ctx, self.fh, offset + got, n,
                                     ctypes.byref(buf, got))
            if ret < 0:
                raise self._error(ret, "NFS read failed")
            if ret == 0:
                break  # end of file: the buffer is zeros already
            got += ret
        return buf.raw

    def pwrite(self, offset: int, data: bytes) -> None:
        buf = ctypes.create_string_buffer(data, len(data))
        done = 0
        while done < len(data):
            n = min(len(data) - done, _CHUNK)
            ret = self.lib.nfs_pwrite(self.ctx, self.fh, offset + done, n,
                                      ctypes.byref(buf, done))
            if ret < 0:
                raise self._error(ret, "NFS write failed")
            if ret == 0:
                raise NfsError(errno.EIO, "NFS write failed: nothing written")
            done += ret

    def fsync(self) -> None:
        ret = self.lib.nfs_fsync(self.ctx, self.fh)
        if ret != 0:
            raise self._error(ret, "NFS fsync failed")

    def truncate(self, size: int) -> None:
        ret = self.lib.nfs_ftruncate(self.ctx, self.fh, size)
        if ret != 0:
            raise self._error(ret, "NFS truncate failed")

    def invalidate_pagecache(self) -> None:
        self.lib.nfs_pagecache_invalidate(self.ctx, self.fh)

    def close(self) -> None:
        if self.fh is not None:
            self.lib.nfs_close(self.ctx, self.fh)
            self.fh = None
        if self.ctx:
            self.lib.nfs_destroy_context(self.ctx)
            self.ctx = None
