"""QEMU's tools as test peers: find them (skip without them, fail under CI=true), run them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
IN_CI = os.environ.get("CI") == "true"

QEMU_SYSTEM = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"
QEMU_IO = "qemu-io"
QSD = "qemu-storage-daemon"
NBDINFO = "nbdinfo"
NBDCOPY = "nbdcopy"
SOCAT = "socat"


def have_tool(name: str) -> bool:
    return shutil.which(name) is not None


def require_tool(name: str) -> str:
    """Path of a QEMU tool; skip without it, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not installed")
        pytest.skip(f"{name} is not installed")
    return path


def run_tool(name: str, *args: str | Path, check: bool = True, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion; with ``check``, a failure shows its output."""
    argv = [require_tool(name), *map(str, args)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"{name} {' '.join(argv[1:])}: status {result.returncode}\n{result.stdout}{result.stderr}"
        )
    return result


def qemu_img(*args: str | Path, check: bool = True, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
    return run_tool(QEMU_IMG, *args, check=check, timeout=timeout)


def qemu_io(*args: str | Path, check: bool = False, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    return run_tool(QEMU_IO, *args, check=check, timeout=timeout)


#: /proc/net/unix's flag of a listening socket (__SO_ACCEPTCON).
_ACCEPTING = 0x10000


def _listening(path: Path) -> bool:
    """Whether a UNIX socket at ``path`` listens.  QEMU's tools bind the path
    itself: the file appears at bind(), before listen(), and a connection in
    between is refused.  qmpd binds a temporary name and renames it into
    place after listen(), so a path that no socket was bound to listens."""
    if not path.exists():
        return False
    names = {str(path), str(path.absolute())}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7] in names:
                return int(fields[3], 16) & _ACCEPTING != 0
    return True


def wait_for_socket(proc: subprocess.Popen[Any], path: Path, timeout: float = 30.0) -> None:
    """Wait until a UNIX socket at ``path`` listens (a QEMU tool's monitor or export)."""
    deadline = time.monotonic() + timeout
    argv = proc.args
    name = os.fsdecode(argv if isinstance(argv, (str, bytes, os.PathLike)) else argv[0])
    while not _listening(path):
        if proc.poll() is not None:
            said = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"{name} exited with status {proc.returncode}: {said!r}")
        assert time.monotonic() < deadline, f"{name} did not start"
        time.sleep(0.005)


def held_bytes(path: str | Path) -> set[int]:
    """Lock bytes anyone holds on ``path`` (OFD locks, from /proc/locks)."""
    st = os.stat(path)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # N: OFDLCK ADVISORY READ pid dev:ino start end
            if "OFDLCK" in fields and wanted in line:
                # Adjacent bytes of one holder show up merged as a range.
                out.update(range(int(fields[-2]), int(fields[-1]) + 1))
    return out


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 20) -> None:
    """SIGTERM a helper process that still runs; SIGKILL it after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
