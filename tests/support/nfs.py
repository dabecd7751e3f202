"""A throw-away NFS server for the tests: rpcbind and nfs-ganesha (FSAL_VFS)
exporting a temporary directory on 127.0.0.1 as ``/export``.

Everything it writes (configuration, logs, pid files, ganesha's recovery
directory) lies under its own directory; :meth:`NfsServer.stop` stops every
process it started.  An rpcbind that already runs is used, not replaced.
"""

from __future__ import annotations

import ctypes
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.tools import IN_CI, stop_process

PACKAGES = "nfs-ganesha nfs-ganesha-vfs rpcbind libnfs13 qemu-block-extra"
HOST = "127.0.0.1"
EXPORT = "/export"
QEMU_NFS_DRIVER = Path("/usr/lib/x86_64-linux-gnu/qemu/block-nfs.so")

_CONF = """\
NFS_CORE_PARAM {{ Protocols = 3, 4; Bind_addr = {host}; Enable_NLM = false;
  Enable_RQUOTA = false; Mount_Path_Pseudo = true; }}
NFSV4 {{ Graceless = true; RecoveryRoot = {dir}/recovery; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{ Export_Id = 1; Path = {export}; Pseudo = {pseudo}; Access_Type = RW;
  Protocols = 3; Transports = TCP; Squash = No_Root_Squash;
  Attr_Expiration_Time = 0; FSAL {{ Name = VFS; }} }}
"""


def missing() -> str | None:
    """What is missing to run an NFS server and its clients, None if nothing."""
    for tool in ("rpcbind", "ganesha.nfsd"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (packages: {PACKAGES})"
    if not Path("/usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so").exists():
        return "nfs-ganesha-vfs is not installed"
    try:
        ctypes.CDLL("libnfs.so.13")
    except OSError:
        return "libnfs13 is not installed"
    if not QEMU_NFS_DRIVER.exists():
        return "QEMU's nfs driver (qemu-block-extra) is not installed"
    return None


def require_nfs() -> None:
    """Skip without the packages, fail in CI."""
    reason = missing()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"NFS tests need {PACKAGES} in CI: {reason}")
        pytest.skip(reason)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0


class NfsServer:
    """ganesha (and rpcbind if none runs) serving ``self.export`` as ``/export``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.export = workdir / "export"
        self.export.mkdir(parents=True, exist_ok=True)
        (workdir / "recovery").mkdir(exist_ok=True)
        self.conf = workdir / "ganesha.conf"
        self.conf.write_text(_CONF.format(host=HOST, dir=workdir, export=self.export,
                                          pseudo=EXPORT))
        self.rpcbind: subprocess.Popen[bytes] | None = None
        self.ganesha: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"nfs://{HOST}{EXPORT}/{name}"

    def blockdev(self, name: str) -> dict[str, object]:
        return {"driver": "nfs", "server": {"type": "inet", "host": HOST},
                "path": f"{EXPORT}/{name}"}

    def start(self) -> None:
        if not _listening(111):
            self.rpcbind = subprocess.Popen(["rpcbind", "-f", "-w"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._wait(111, self.rpcbind, "rpcbind")
        self.start_ganesha()

    def start_ganesha(self) -> None:
        assert not _listening(2049), "an NFS server already listens on port 2049"
        self.ganesha = subprocess.Popen(
            ["ganesha.nfsd", "-F", "-f", str(self.conf), "-L", str(self.dir / "ganesha.log"),
             "-p", str(self.dir / "ganesha.pid"), "-N", "NIV_EVENT"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait(2049, self.ganesha, "ganesha")
        # The export answers once its mount daemon is registered.
        deadline = time.monotonic() + 20
        while subprocess.run(["qemu-img", "info", "-U", self.url("nonexistent")],
                             capture_output=True, text=True,
                             timeout=30).stderr.find("NOENT") < 0:
            assert time.monotonic() < deadline, "ganesha's export did not come up"
            time.sleep(0.1)

    def _wait(self, port: int, proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + 20
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = self.dir / "ganesha.log"
                raise RuntimeError(f"{name} did not start: "
                                   f"{log.read_text(errors='replace') if log.exists() else ''}")
            time.sleep(0.05)

    def stop_ganesha(self) -> None:
        proc, self.ganesha = self.ganesha, None
        stop_process(proc, 10)

    def stop(self) -> None:
        self.stop_ganesha()
        proc, self.rpcbind = self.rpcbind, None
        stop_process(proc, 10)
