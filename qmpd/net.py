"""Socket addresses, and UNIX socket files: bind, stale files and removal, in one place.

Rules shared by QMP monitors, the NBD server and incoming migration:

- the file at the path appears only once the socket listens: it is bound under
  a temporary name in the same directory and hard-linked into place, so a
  client that connects as soon as the file exists is never refused;
- a path where another process is listening is never taken over: binding
  fails with EADDRINUSE ("Address already in use");
- only a dead socket file (nobody listening) is removed before binding;
- at exit the file is removed only if it is still the one we bound.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

#: sun_path's size on Linux, terminating NUL included.
UNIX_PATH_MAX = 108

_names = itertools.count()


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class InetAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


SocketAddress = UnixAddress | InetAddress


@dataclass(frozen=True)
class StdioAddress:
    """The process's stdin and stdout (``--chardev stdio``)."""

    def __str__(self) -> str:
        return "stdio"


@dataclass(slots=True)
class UnixListener:
    """A bound, listening UNIX socket and the file it owns."""

    sock: socket.socket
    path: str
    inode: int

    def unlink(self) -> None:
        """Remove the socket file, unless someone else's now sits at the path."""
        unlink_if_same(self.path, self.inode)


def is_listening(path: str) -> bool:
    """Whether a process accepts connections on the UNIX socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError, NotADirectoryError):
        return False
    except BlockingIOError:
        return True  # a full backlog: alive, only busy
    except OSError:
        return False
    finally:
        probe.close()
    return True


def remove_stale(path: str) -> None:
    """Unlink a dead socket file at ``path``; refuse a live one; leave other files."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        return  # bind() fails with EADDRINUSE, as it should
    if is_listening(path):
        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def bind_unix(path: str, backlog: int = 128, mode: int | None = 0o600) -> UnixListener:
    """Listen on ``path``; the file appears only once the socket accepts connections.

    ``mode`` None leaves the file as bind() makes it (0777 less the umask).
    """
    remove_stale(path)
    directory, base = os.path.split(path)
    temp = os.path.join(directory, f".{base}.{os.getpid()}.{next(_names)}")
    if len(os.fsencode(temp)) >= UNIX_PATH_MAX:
        temp = os.path.join(directory, f".q{os.getpid()}.{next(_names)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # On Linux the socket inode's mode set before bind() is the file's,
        # so it is never reachable by others, even for an instant.
        if mode is not None:
            os.fchmod(sock.fileno(), mode)
        if len(os.fsencode(temp)) >= UNIX_PATH_MAX:
            sock.bind(path)  # no room for a temporary name: bind in place
            if mode is not None:
                os.chmod(path, mode)
            sock.listen(backlog)
        else:
            sock.bind(temp)
            try:
                if mode is not None:
                    os.chmod(temp, mode)
                sock.listen(backlog)
                try:
                    os.link(temp, path)
                except FileExistsError:
                    # Someone bound the path since we looked: theirs if alive.
                    remove_stale(path)
                    try:
                        os.link(temp, path)
                    except FileExistsError:
                        raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE),
                                      path) from None
            finally:
                os.unlink(temp)
        inode = os.stat(path).st_ino
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return UnixListener(sock, path, inode)


def unlink_if_same(path: str, inode: int) -> None:
    """Remove ``path`` only if it is still the socket file with ``inode``."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


class ConnectFailed(OSError):
    """Connecting to a peer failed; str() is QEMU's text."""


async def connect(address: UnixAddress | InetAddress) -> socket.socket:
    """A connected, non-blocking socket to ``address`` (QEMU's texts on failure)."""
    loop = asyncio.get_running_loop()
    if isinstance(address, UnixAddress):
        where = address.path
        families: list[tuple[int, Any]] = [(socket.AF_UNIX, address.path)]
    else:
        where = f"{address.host}:{address.port}"
        try:
            infos = await loop.getaddrinfo(address.host, address.port,
                                           type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ConnectFailed(errno.EHOSTUNREACH,
                                f"address resolution failed for {where}: {exc.strerror}"
                                ) from None
        families = [(info[0], info[4]) for info in infos]
    last: OSError | None = None
    for family, target in families:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    code = last.errno if last is not None and last.errno else errno.ECONNREFUSED
    raise ConnectFailed(code, f"Failed to connect to '{where}': {os.strerror(code)}")


def bind_inet(host: str, port: int, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking TCP socket (SO_REUSEADDR, as QEMU sets it)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    last: OSError | None = None
    for family, kind, proto, _name, target in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(target)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.setblocking(False)
        return sock
    raise last or OSError(errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
