"""NBD over TLS in bulk (issue 13): more data in flight than the socket holds, so
that the server encrypts replies ahead while the client has not read the last
ones, and decrypts many records per call into WRITE payloads.  Every byte must
arrive intact and in order: libnbd (nbdcopy, 64 requests of 256 KiB in flight,
and 4 KiB requests) and QEMU's client (qemu-img convert) read and write a
random image, compared with qemu-img compare."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import QmpdProcess
from tests.support.certs import Pki
from tests.support.tools import qemu_img, run_tool

pytestmark = pytest.mark.qemu

SIZE = 48 * 1024 * 1024


def random_image(path: Path, seed: int) -> Path:
    block = os.urandom(1024 * 1024) if seed else bytes(1024 * 1024)
    with open(path, "wb") as f:
        for i in range(SIZE // len(block)):
            f.write(bytes([i & 0xFF]) + block[1:])
    return path


def test_bulk_reads_and_writes_arrive_intact(tmp_path: Path, pki: Pki) -> None:
    image = random_image(tmp_path / "disk.raw", 1)
    sock = tmp_path / "nbd.sock"
    daemon = QmpdProcess(
        tmp_path,
        "--object", f"tls-creds-x509,id=tls0,dir={pki.dir('server')},endpoint=server",
        "--blockdev", f"driver=file,node-name=disk,filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock},tls-creds=tls0",
        "--export", "type=nbd,id=e,node-name=disk,name=e,writable=on",
    )
    try:
        uri = f"nbds+unix:///e?socket={sock}&tls-certificates={pki.dir('client')}"
        copy = tmp_path / "copy.raw"
        # Whole reads (no extents: every byte is read), large then small requests.
        run_tool("nbdcopy", "--no-extents", uri, copy)
        qemu_img("compare", "-f", "raw", "-F", "raw", image, copy)
        copy.unlink()
        run_tool("nbdcopy", "--no-extents", "--request-size=4096", "--requests=16",
                 "--connections=1", uri, copy)
        qemu_img("compare", "-f", "raw", "-F", "raw", image, copy)
        # QEMU's client.
        copy.unlink()
        qemu_img("convert", "--object",
                 f"tls-creds-x509,id=c0,dir={pki.dir('client')},endpoint=client",
                 "--image-opts",
                 f"driver=nbd,server.type=unix,server.path={sock},tls-hostname=localhost,"
                 "export=e,tls-creds=c0",
                 "-O", "raw", copy)
        qemu_img("compare", "-f", "raw", "-F", "raw", image, copy)
        # Writes: large requests, then small ones, each read back.
        for n, small in enumerate((False, True)):
            source = random_image(tmp_path / f"source{n}.raw", 1)
            sizes = ["--request-size=4096", "--requests=16", "--connections=1"] if small else []
            run_tool("nbdcopy", "-S", "0", "--flush", *sizes, source, uri)
            qemu_img("compare", "-f", "raw", "-F", "raw", source, image)
    finally:
        daemon.stop()
