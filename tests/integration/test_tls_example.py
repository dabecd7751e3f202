"""README's "TLS, a worked example": its certificate commands, daemon flags and curl run.

The certificate block runs verbatim with ``sh`` in a temporary directory;
the daemon's command runs with its QMP and HTTPS options as written, on
127.0.0.1 and free ports; the ``curl`` command runs as written, told that
``storage1.example.com`` is 127.0.0.1.  The NBD options and client commands
(qemu-img, qemu-nbd, nbdinfo, nbdcopy) run against qemu-storage-daemon 7.2,
which shows they are QEMU's; qmpd's NBD over TLS is tested with that path.
"""

from __future__ import annotations

import re
import shlex
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import QmpdProcess
from tests.support.qmp import QmpClient
from tests.support.tools import REPO, require_tool

#: Options of the daemon's command that belong to paths tested elsewhere.
_ELSEWHERE = ("--blockdev", "--nbd-server", "--export")


def _blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the worked example, in order."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## TLS, a worked example\n", 1)[1].split("\n## ", 1)[0]
    return [(m.group(1), m.group(2))
            for m in re.finditer(r"```(\w*)\n(.*?)```", section, re.DOTALL)]


def _command(block: str) -> list[str]:
    return shlex.split(block.replace("\\\n", " "), comments=True)


def test_readme_tls_example(tmp_path: Path) -> None:
    require_tool("openssl")
    require_tool("curl")
    blocks = [text for lang, text in _blocks() if lang == "sh"]
    certs, daemon = blocks[0], blocks[1]
    curl = next(text for text in blocks if text.startswith("curl "))
    subprocess.run(["sh", "-e", "-c", certs], cwd=tmp_path, check=True,
                   capture_output=True)
    for path in ("pki/server/server-cert.pem", "pki/server/server-key.pem",
                 "pki/server/ca-cert.pem", "pki/client/client-cert.pem",
                 "pki/client/client-key.pem", "pki/client/ca-cert.pem"):
        assert (tmp_path / path).is_file(), path
    assert b"ENCRYPTED" in (tmp_path / "pki/server/server-key.pem").read_bytes()

    argv = _command(daemon)
    assert argv[0] == "qmpd"
    args: list[str] = []
    it = iter(argv[1:])
    for option in it:
        value = next(it)
        if option in _ELSEWHERE:
            continue
        value = value.replace("host=0.0.0.0,port=4444", "host=127.0.0.1,port=0")
        value = value.replace("0.0.0.0:9443", "127.0.0.1:0")
        args += [option, value]
    proc = QmpdProcess(tmp_path, *args, "--log-level", "info")
    try:
        qmp_port = http_port = 0
        for part in proc.banner.split(", "):
            if part.startswith("QMP on tcp:"):
                qmp_port = int(part.rsplit(":", 1)[1])
            if part.startswith("HTTP on https://"):
                http_port = int(part.rsplit(":", 1)[1])
        assert qmp_port and http_port, proc.banner
        # QMP over TLS with the example's client identity.
        ctx = ssl.create_default_context(cafile=str(tmp_path / "pki/client/ca-cert.pem"))
        ctx.load_cert_chain(str(tmp_path / "pki/client/client-cert.pem"),
                            str(tmp_path / "pki/client/client-key.pem"))
        client = QmpClient(("127.0.0.1", qmp_port), tls=ctx,
                           server_hostname="storage1.example.com", negotiate=True)
        assert client.cmd("query-status")["return"]["status"] == "running"
        client.close()
        # The README's curl, as written, with the name resolved here.
        command = _command(curl)
        command = [a.replace(":9443/", f":{http_port}/") for a in command]
        command[1:1] = ["-sS", "--max-time", "15",
                        "--resolve", f"storage1.example.com:{http_port}:127.0.0.1"]
        out = subprocess.run(command, cwd=tmp_path, check=True, capture_output=True,
                             text=True).stdout
        assert "qmpd_ready 1.0" in out
        # Without the client certificate, nothing.
        bare = [a for a in command if a not in ("--cert", "--key") and
                not a.endswith(("client-cert.pem", "client-key.pem"))]
        refused = subprocess.run(bare, cwd=tmp_path, capture_output=True, text=True)
        assert refused.returncode != 0 and "qmpd_" not in refused.stdout
    finally:
        proc.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.qemu("qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo", "nbdcopy")
def test_readme_nbd_clients_against_qsd(tmp_path: Path) -> None:
    """The example's NBD options and client commands are QEMU 7.2's: they work with QSD."""
    require_tool("openssl")
    blocks = [text for lang, text in _blocks() if lang == "sh"]
    subprocess.run(["sh", "-e", "-c", blocks[0]], cwd=tmp_path, check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "disk.qcow2", "64M"], cwd=tmp_path,
                   check=True, capture_output=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "disk.qcow2"],
                   cwd=tmp_path, check=True, capture_output=True)
    port = _free_port()
    argv = _command(blocks[1])
    args: list[str] = []
    it = iter(argv[1:])
    for option in it:
        value = next(it)
        if option in ("--chardev", "--monitor", "--http"):
            continue  # QMP and HTTP: qmpd's, tested above
        args += [option, value.replace("addr.host=0.0.0.0,addr.port=10809",
                                       f"addr.host=127.0.0.1,addr.port={port}")]
    qsd = subprocess.Popen(["qemu-storage-daemon", *args], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert qsd.poll() is None and time.monotonic() < deadline, qsd.communicate()
            time.sleep(0.05)
        clients = [b for b in blocks if b.startswith(("qemu-img ", "nbdinfo "))]
        assert len(clients) == 2
        for block in clients:
            script = block.replace("storage1.example.com", "localhost").replace(
                "10809", str(port))
            done = subprocess.run(["sh", "-e", "-c", script], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (script, done.stdout, done.stderr)
        assert (tmp_path / "copy.raw").read_bytes()[:1 << 20] == b"\x5a" * (1 << 20)
        info = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                               "disk.qcow2", "copy.qcow2"], cwd=tmp_path,
                              capture_output=True, text=True)
        assert info.returncode == 0, info.stdout + info.stderr
    finally:
        qsd.terminate()
        qsd.wait(30)
