"""NBD option errors and a bad request magic, byte for byte as qemu-storage-daemon 7.2.

Raw sockets play the same option sequences against qemu-storage-daemon and
qmpd serving the same export; every option reply (type and text) and every
hang-up must be the same.  The cases cover each of QEMU's option texts:
unexpected lengths, inconsistent lengths, embedded NULs, long names (cut at
80 bytes), unknown exports and options, structured-reply rules and the meta
context replies (their order and LIST's context id 0).  A request with a bad
magic gets QEMU's EINVAL reply (simple or structured) and then the hang-up.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, require_tool, wait_for_socket

pytestmark = pytest.mark.qemu

IHAVEOPT = 0x49484156454F5054
SR = (8, b"")


def name(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def queries(*qs: bytes) -> bytes:
    return struct.pack(">I", len(qs)) + b"".join(name(q) for q in qs)


#: name -> options sent in order on one connection.
CASES: dict[str, list[tuple[int, bytes]]] = {
    "list-with-data": [(3, b"x")],
    "starttls": [(5, b"")],
    "starttls-with-data": [(5, b"x")],
    "structured-with-data": [(8, b"x")],
    "structured-twice": [SR, SR],
    "unknown-option": [(42, b"")],
    "unknown-option-with-data": [(42, b"abc")],
    "peek-export": [(4, b"")],
    "extended-headers": [(11, b"")],
    "abort": [(2, b"")],
    "abort-with-data": [(2, b"xyz")],
    "go-unknown": [(7, name(b"nosuch") + b"\0\0")],
    "go-unknown-long-name": [(7, name(b"x" * 100) + b"\0\0")],
    "go-unknown-80": [(7, name(b"y" * 80) + b"\0\0")],
    "go-unknown-79": [(7, name(b"y" * 79) + b"\0\0")],
    "info-unknown": [(6, name(b"nosuch") + b"\0\0")],
    "go-name-too-long": [(7, struct.pack(">I", 5000) + b"x" * 5002)],
    "go-name-past-end": [(7, struct.pack(">I", 50) + b"e\0\0")],
    "go-count-cut": [(7, name(b"e") + b"\0")],
    "go-requests-cut": [(7, name(b"e") + b"\0\2\0\3")],
    "go-trailing": [(7, name(b"e") + b"\0\0zz")],
    "go-nul-in-name": [(7, name(b"e\0x") + b"\0\0")],
    "go-empty": [(7, b"")],
    "info-trailing-unknown-export": [(6, name(b"nosuch") + b"\0\0zz")],
    "list-meta-without-structured": [(9, name(b"e") + queries())],
    "set-meta-without-structured": [(10, name(b"e") + queries(b"base:allocation"))],
    "set-meta-unknown": [SR, (10, name(b"nosuch") + queries(b"base:allocation"))],
    "set-meta-unknown-then-garbage": [SR, (10, name(b"nosuch") + b"\xff\xff")],
    "set-meta-count-cut": [SR, (10, name(b"e") + b"\0\0")],
    "set-meta-query-past-end": [SR, (10, name(b"e") + struct.pack(">II", 1, 100) + b"base")],
    "set-meta-nul-in-query": [SR, (10, name(b"e") + queries(b"base:alloc\0ation"))],
    "set-meta-long-query": [SR, (10, name(b"e") + struct.pack(">II", 1, 5000) + b"q" * 5000)],
    "set-meta-name-too-long": [SR, (10, struct.pack(">I", 5000) + b"x" * 5000 + queries())],
    "list-meta-count-too-big": [SR, (9, name(b"e") + struct.pack(">I", 3) + name(b"base:"))],
    "list-meta-all": [SR, (9, name(b"e") + queries())],
    "list-meta-empty-query": [SR, (9, name(b"e") + queries(b""))],
    "list-meta-namespaces": [SR, (9, name(b"e") + queries(b"qemu:")),
                             (9, name(b"e") + queries(b"base:"))],
    "list-meta-order": [SR, (9, name(b"e") + queries(b"qemu:allocation-depth",
                                                     b"base:allocation"))],
    "list-meta-unknown": [SR, (9, name(b"e") + queries(b"foo:bar", b"qemu:nosuch",
                                                       b"base:nosuch"))],
    "set-meta-order": [SR, (10, name(b"e") + queries(b"qemu:allocation-depth",
                                                     b"base:allocation"))],
    "set-meta-duplicate": [SR, (10, name(b"e") + queries(b"base:allocation",
                                                         b"base:allocation"))],
    "set-meta-namespace": [SR, (10, name(b"e") + queries(b"", b"base:"))],
    "export-name-unknown": [(1, b"nosuch")],
    "go-after-errors": [(3, b"x"), (42, b""), (7, name(b"nosuch") + b"\0\0"),
                        (7, name(b"e") + b"\0\0")],
}


class Peer:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        greeting = self.recv(18)
        assert greeting[:8] == b"NBDMAGIC"
        self.sock.sendall(struct.pack(">I", 3))

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def option(self, option: int, data: bytes) -> list[Any]:
        """Send one option; its replies up to the final one, or how the server hung up."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)
        out: list[Any] = []
        try:
            if option == 1:
                return [("export-name", self.recv(10).hex())]
            while True:
                _, echoed, kind, length = struct.unpack(">QIII", self.recv(20))
                payload = self.recv(length)
                out.append((echoed, kind, payload))
                if kind == 1 or kind & 0x80000000:
                    return out
        except EOFError:
            return [*out, "hang-up"]

    def request(self, header: bytes) -> bytes:
        """Send raw request bytes; everything the server sends until it hangs up."""
        self.sock.sendall(header)
        data = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()


def play(path: Path, options: list[tuple[int, bytes]]) -> list[Any]:
    peer = Peer(path)
    try:
        out: list[Any] = []
        for option, data in options:
            replies = peer.option(option, data)
            out.append(replies)
            if replies[-1:] == ["hang-up"] or option in (1, 2):
                break
        return out
    finally:
        peer.close()


def go(peer: Peer, structured: bool) -> None:
    if structured:
        assert peer.option(8, b"") == [(8, 1, b"")]
    replies = peer.option(7, name(b"e") + b"\0\0")
    assert replies[-1] == (7, 1, b"")


def bad_magic(path: Path, structured: bool) -> bytes:
    peer = Peer(path)
    try:
        go(peer, structured)
        return peer.request(struct.pack(">IHHQQI", 0x12345678, 0, 0, 0xABCDEF, 0, 512))
    finally:
        peer.close()


NBDINFO = {
    "nbdinfo-unknown-export": ["nbd+unix:///nosuch?socket={}"],
    "nbdinfo-long-unknown-export": ["nbd+unix:///" + "z" * 120 + "?socket={}"],
    "nbdinfo-unknown-context": ["--map=qemu:nosuch", "nbd+unix:///e?socket={}"],
    "nbdinfo-list": ["--list", "nbd+unix:///?socket={}"],
}


def nbdinfo(path: Path, args: list[str]) -> list[str]:
    """What libnbd reports of the server's answers (its debug log names the texts)."""
    result = subprocess.run(
        [require_tool("nbdinfo"), *(a.format(path) for a in args)], capture_output=True,
        text=True, timeout=30, env={"LIBNBD_DEBUG": "1", "PATH": "/usr/bin:/bin"},
    )
    keep = ("server error message", "replied with error", "does not support", "nbdinfo:")
    return [line.replace(str(path), "SOCK") for line in result.stderr.splitlines()
            if any(k in line for k in keep)] + [f"exit {result.returncode}"]


def observe(path: Path) -> dict[str, Any]:
    seen: dict[str, Any] = {case: play(path, options) for case, options in CASES.items()}
    seen["bad-magic-simple"] = bad_magic(path, False)
    seen["bad-magic-structured"] = bad_magic(path, True)
    for case, args in NBDINFO.items():
        seen[case] = nbdinfo(path, args)
    return seen


def export_args(image: Path, sock: Path) -> list[str]:
    return ["--blockdev", f"driver=file,node-name=e,filename={image}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e,node-name=e,writable=on,allocation-depth=on"]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    qsd = require_tool("qemu-storage-daemon")
    tmp = tmp_path_factory.mktemp("nbdopts")
    image = tmp / "disk.raw"
    with image.open("wb") as f:
        f.truncate(1 << 20)
    sock = tmp / "qsd.sock"
    proc = subprocess.Popen([qsd, *export_args(image, sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(proc, sock)
        qemu = observe(sock)
    finally:
        proc.terminate()
        proc.wait(10)
    sock = tmp / "qmpd.sock"
    daemon = QmpdProcess(tmp, *export_args(image, sock))
    try:
        ours = observe(sock)
    finally:
        daemon.stop()
    yield {"qemu": qemu, "qmpd": ours}


@pytest.mark.parametrize("case", [*CASES, "bad-magic-simple", "bad-magic-structured", *NBDINFO])
def test_as_qsd(observed: dict[str, Any], case: str) -> None:
    assert observed["qmpd"][case] == observed["qemu"][case]


def test_nbdinfo_shows_qemu_texts(observed: dict[str, Any]) -> None:
    lines = observed["qmpd"]["nbdinfo-unknown-export"]
    assert any("server error message: export 'nosuch' not present" in x for x in lines)
    lines = observed["qmpd"]["nbdinfo-long-unknown-export"]
    assert any("export '" + "z" * 80 + "...' not present" in x for x in lines)


def test_bad_magic_gets_einval_then_hang_up(observed: dict[str, Any]) -> None:
    """What QEMU sends, spelled out: the header's cookie, EINVAL (22), the text."""
    simple = observed["qmpd"]["bad-magic-simple"]
    assert simple == struct.pack(">IIQ", 0x67446698, 22, 0xABCDEF)
    structured = observed["qmpd"]["bad-magic-structured"]
    text = b"invalid magic (got 0x12345678)"
    assert structured == struct.pack(">IHHQIIH", 0x668E33EF, 1, 0x8001, 0xABCDEF,
                                     6 + len(text), 22, len(text)) + text
