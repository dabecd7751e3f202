"""Backing chains named by image headers: format probing, loops, depth."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from qmpd.block.core import MAX_BACKING_CHAIN
from tests.conftest import QmpdProcess, RawClient
from tests.integration.test_locking import held_bytes
from tests.support import tools
from tests.support.tools import qemu_img

BACKING_FORMAT_EXT = bytes.fromhex("e2792aca")


def qemu_io(image: Path, command: str, fmt: str = "qcow2") -> subprocess.CompletedProcess[str]:
    return tools.qemu_io("-f", fmt, "-c", command, image)


def add(c: RawClient, image: Path) -> dict[str, Any]:
    return c.cmd("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                  "file": {"driver": "file", "filename": str(image)}})


def hmp_io(c: RawClient, command: str) -> str:
    reply = c.cmd("human-monitor-command", {"command-line": f'qemu-io top "{command}"'})
    assert "return" in reply, reply
    return str(reply["return"])


def drop_backing_format(image: Path) -> None:
    """Rename the header's backing-format extension: the header names no format."""
    data = bytearray(image.read_bytes()[:65536])
    at = data.find(BACKING_FORMAT_EXT, 72)
    assert at > 0, "no backing format extension"
    with open(image, "r+b") as f:
        f.seek(at)
        f.write(bytes.fromhex("0badf00d"))


def test_backing_named_without_format_is_probed(qmpd: QmpdProcess, tmp_path: Path) -> None:
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "4M")
    assert qemu_io(base, "write -P 0x5a 0 128k").returncode == 0
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(top))
    drop_backing_format(top)
    c = qmpd.client()
    c.negotiate()
    assert add(c, top) == {"return": {}}
    nodes = c.cmd("query-named-block-nodes")["return"]
    assert {n["drv"] for n in nodes if n["file"] == str(base)} >= {"qcow2"}
    assert "Pattern verification failed" not in hmp_io(c, "read -P 0x5a 0 128k")
    # A partial-cluster write copies the base's guest data, not its container bytes.
    assert "error" not in hmp_io(c, "write -P 0x11 0 512").lower()
    assert c.cmd("blockdev-del", {"node-name": "top"}) == {"return": {}}
    # QEMU probes the same way and agrees on what the guest sees.
    assert "verification failed" not in qemu_io(top, "read -P 0x11 0 512").stdout
    check = qemu_io(top, "read -P 0x5a 512 127k")
    assert check.returncode == 0 and "verification failed" not in check.stdout, check.stdout


@pytest.mark.parametrize("shape", ["self", "pair"])
def test_backing_loop_is_refused(qmpd: QmpdProcess, tmp_path: Path, shape: str) -> None:
    a, b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(a), "1M")
    if shape == "self":
        qemu_img("rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", str(a))
        top, named = a, "a.qcow2"
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", str(b))
        qemu_img("rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", str(a))
        top, named = b, "b.qcow2"
    c = qmpd.client()
    c.negotiate()
    reply = add(c, top)
    assert reply["error"] == {"class": "GenericError",
                              "desc": f"Backing file '{named}' creates an infinite loop."}
    assert c.cmd("query-named-block-nodes") == {"return": []}
    assert held_bytes(a) == set()
    assert c.cmd("query-status")["return"]["status"] == "running"


def test_backing_chain_depth(qmpd: QmpdProcess, tmp_path: Path) -> None:
    images = [tmp_path / "i0.qcow2"]
    qemu_img("create", "-q", "-f", "qcow2", str(images[0]), "1M")
    for i in range(1, MAX_BACKING_CHAIN + 1):
        images.append(tmp_path / f"i{i}.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", images[i - 1].name, "-F", "qcow2",
                 str(images[i]))
    c = qmpd.client()
    c.negotiate()
    # MAX_BACKING_CHAIN images open (top included)...
    assert add(c, images[-2]) == {"return": {}}
    assert len(c.cmd("query-named-block-nodes")["return"]) == 2 * MAX_BACKING_CHAIN
    assert c.cmd("blockdev-del", {"node-name": "top"}) == {"return": {}}
    # ...one more is refused with a clear error, nothing left open.
    reply = add(c, images[-1])
    assert reply["error"]["desc"] == (
        f"Backing chain of '{images[-1]}' is longer than {MAX_BACKING_CHAIN} images")
    assert c.cmd("query-named-block-nodes") == {"return": []}
    assert held_bytes(images[0]) == set()


def qemu_img_error(image: Path) -> str:
    """qemu-io's reason for refusing to open ``image``, backing chain included."""
    proc = qemu_io(image, "read 0 512")
    assert proc.returncode != 0, proc.stdout
    return proc.stderr.strip().split(f"can't open device {image}: ", 1)[1]


def test_backing_files_the_user_did_not_name(qmpd: QmpdProcess, tmp_path: Path) -> None:
    """A header may only lead to a local file: never another protocol or a json: name."""
    import socket

    c = qmpd.client()
    c.negotiate()
    cases = {
        "missing": "missing.raw",
        "unknown-protocol": "foo:bar",
    }
    for case, backing in cases.items():
        top = tmp_path / f"{case}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", str(top), "1M")
        assert add(c, top)["error"]["desc"] == qemu_img_error(top), case

    # QEMU would connect to this NBD server; qmpd refuses to follow the header.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "nbd.sock"))
    listener.listen(1)
    listener.setblocking(False)
    top = tmp_path / "nbd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b",
             f"nbd+unix:///x?socket={tmp_path}/nbd.sock", "-F", "raw", str(top), "1M")
    assert add(c, top)["error"]["desc"] == ("Could not open backing file: "
                                            "Unknown protocol 'nbd+unix'")
    with pytest.raises(BlockingIOError):
        listener.accept()
    listener.close()

    top = tmp_path / "json.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b",
             'json:{"driver": "file", "filename": "/etc/hostname"}', "-F", "raw", str(top), "1M")
    assert add(c, top)["error"]["desc"] == ("Could not open backing file: json: backing file "
                                            "names are not supported")

    # The file protocol's prefix is QEMU's too: it names a local file.
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x5a" * 65536)
    top = tmp_path / "file-protocol.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "file:base.raw", "-F", "raw", str(top),
             "64k")
    assert add(c, top) == {"return": {}}
    assert "verification failed" not in hmp_io(c, "read -P 0x5a 0 4k")
    assert c.cmd("query-status")["return"]["status"] == "running"
