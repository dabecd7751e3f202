"""Whether every mounted file system is local, from ``/proc/self/mountinfo``.

Opening a file on a local file system takes microseconds, less than a hop
to an I/O thread; on a network file system (or FUSE, or an automount) it can
block for as long as the server is away.  While the mount table holds only
local file systems no path can reach a remote one, symbolic links included,
so the file driver may open on the event loop.  The table is re-read only
when the kernel signals a change on the open mountinfo file.
"""

from __future__ import annotations

import os
import select

#: File system types whose open() does not wait for another machine or process.
LOCAL_TYPES = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "zfs", "jfs", "reiserfs",
    "vfat", "msdos", "exfat", "iso9660", "udf", "squashfs", "erofs", "overlay",
    "tmpfs", "ramfs", "devtmpfs", "hugetlbfs", "proc", "sysfs", "cgroup", "cgroup2",
    "devpts", "mqueue", "debugfs", "tracefs", "securityfs", "pstore", "bpf",
    "configfs", "fusectl", "binfmt_misc", "efivarfs", "nsfs", "selinuxfs",
})

_PATH = "/proc/self/mountinfo"


def mount_types(table: str) -> set[str]:
    """The file system types named in a mountinfo text (the field after ``-``)."""
    types = set()
    for line in table.splitlines():
        _, sep, tail = line.partition(" - ")
        if sep:
            types.add(tail.split(" ", 1)[0])
    return types


class MountWatch:
    """Answers :meth:`all_local` from a cached mount table, re-read on change."""

    def __init__(self, path: str = _PATH, local_types: frozenset[str] = LOCAL_TYPES) -> None:
        self._path = path
        self._local_types = local_types
        self._fd = -1
        self._poll: select.poll | None = None
        self._local = False

    def all_local(self) -> bool:
        """True when every mounted file system's type is a local one."""
        if self._poll is None:
            self._open()
        elif self._poll.poll(0):
            self._reload()
        return self._local

    def _open(self) -> None:
        try:
            self._fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._local = False  # no table: assume the worst, forever
            self._poll = select.poll()
            return
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLPRI | select.POLLERR)
        self._reload()

    def _reload(self) -> None:
        if self._fd < 0:
            return
        chunks = []
        try:
            os.lseek(self._fd, 0, os.SEEK_SET)
            while chunk := os.read(self._fd, 65536):
                chunks.append(chunk)
        except OSError:
            self._local = False
            return
        types = mount_types(b"".join(chunks).decode("utf-8", "replace"))
        self._local = bool(types) and types <= self._local_types

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._poll = None


#: The process's one watch (mount tables are per process, not per node).
MOUNTS = MountWatch()
