"""The pidfile, locked as QEMU locks it so two daemons never share one."""

from __future__ import annotations

import fcntl
import os

from qmpd.errors import ConfigError


class PidFile:
    """Created and locked before anything else exists; the pid is written once ready."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create and lock the file (empty), or raise QEMU's one-line error."""
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create PID file: Could not create '{self.path}': {exc.strerror}"
                ) from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                raise ConfigError(
                    f"cannot create PID file: Cannot lock pid file: {exc.strerror}"
                ) from None
            # The holder we waited out may have unlinked the file: lock the one
            # that is at the path now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        # The mode QEMU asks for, whatever the umask.
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, 0)
        self._fd = fd

    def write_pid(self) -> None:
        """Readers see either nothing or the whole pid."""
        assert self._fd is not None
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        """Remove the file if it is still ours; a file we never locked is left alone."""
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
