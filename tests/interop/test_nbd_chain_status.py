"""Block status over backing chains: qmpd's NBD exports against qemu-storage-daemon's.

The same images, the same command line, once served by qemu-storage-daemon
7.2 and once by qmpd; what the clients see must be identical:

* ``nbdinfo --map`` (``base:allocation``) and
  ``nbdinfo --map=qemu:allocation-depth``;
* ``qemu-img map --output=json`` over NBD (``present``, ``zero``, ``data``);
* the raw BLOCK_STATUS extents of both contexts, with and without REQ_ONE,
  from many offsets;
* the contents (``nbdcopy``), read with sparse READs.

The chains cover raw and qcow2 bases, zero clusters (plain and allocated),
discarded clusters over backing data, unallocated tails, a chain of three,
backing files shorter than their overlay (also not cluster-aligned),
preallocated metadata, and the null-co driver with and without
``read-zeroes``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpd.nbd import protocol as p
from qmpd.nbd.client import NbdClient
from tests.conftest import QmpdProcess, require_tool, wait_for_socket

pytestmark = pytest.mark.qemu

KiB = 1 << 10
MiB = 1 << 20


def run(*argv: str | Path) -> str:
    result = subprocess.run(
        [require_tool(str(argv[0])), *map(str, argv[1:])],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, (argv, result.stdout, result.stderr)
    return result.stdout


def create(path: Path, size: int, *opts: str,
           backing: Path | None = None, backing_fmt: str = "qcow2") -> Path:
    """A qcow2 image."""
    args: list[str | Path] = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing.name, "-F", backing_fmt]
    for opt in opts:
        args += ["-o", opt]
    run(*args, path, str(size))
    return path


def io(path: Path, fmt: str, *commands: str) -> None:
    args: list[str | Path] = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


def build(tmp: Path) -> dict[str, dict[str, Any]]:
    """The images; node options (without node-name) per export."""
    # A: raw base (sparse, 1 MiB + 4 KiB) <- qcow2 (2 MiB) <- qcow2 (3 MiB).
    base_raw = tmp / "a-base.raw"
    with base_raw.open("wb") as f:
        f.truncate(MiB + 4 * KiB)
    io(base_raw, "raw", "write -P 1 0 64k", "write -P 2 256k 64k", "write -P 7 1M 4k")
    mid = create(tmp / "a-mid.qcow2", 2 * MiB, backing=base_raw, backing_fmt="raw")
    io(mid, "qcow2", "write -z 0 64k", "write -P 3 512k 64k", "write -P 4 1536k 64k",
       "write -P 8 960k 128k")
    top = create(tmp / "a-top.qcow2", 3 * MiB, backing=mid)
    io(top, "qcow2", "write -P 5 128k 64k", "write -z 2M 64k", "write -z -u 2176k 64k",
       "discard 512k 64k")
    # B: qcow2 base with zero clusters and an unallocated tail <- qcow2, 4 KiB clusters.
    qbase = create(tmp / "b-base.qcow2", 4 * MiB)
    io(qbase, "qcow2", "write -P 9 0 1M", "write -P 10 2M 128k", "write -z 2M 64k",
       "write -z -u 3M 64k", "write -P 11 3200k 4k", "discard 3200k 64k")
    btop = create(tmp / "b-top.qcow2", 4 * MiB, "cluster_size=4096", backing=qbase)
    io(btop, "qcow2", "write -P 12 512k 4k", "discard 0 64k", "write -z 1088k 4k",
       "write -z 2052k 8k", "write -P 13 3M 4k")
    # C: a qcow2 backing file of 1 MiB under a 4 MiB overlay with 4 KiB clusters.
    cbase = create(tmp / "c-base.qcow2", MiB)
    io(cbase, "qcow2", "write -P 14 0 1M")
    ctop = create(tmp / "c-top.qcow2", 4 * MiB, "cluster_size=4096", backing=cbase)
    io(ctop, "qcow2", "write -P 15 3M 64k", "write -z 1020k 8k")
    # D: a raw backing file that ends inside an overlay cluster.
    draw = tmp / "d-base.raw"
    draw.write_bytes(b"\x42" * (MiB + 4 * KiB + 512))
    dtop = create(tmp / "d-top.qcow2", 2 * MiB, backing=draw, backing_fmt="raw")
    io(dtop, "qcow2", "write -P 16 64k 4k")
    # E: a qcow2 without backing, and raw over a sparse file.
    plain = create(tmp / "e-plain.qcow2", 2 * MiB)
    io(plain, "qcow2", "write -P 17 0 64k", "write -z 128k 64k", "write -P 18 1M 64k",
       "write -z 1M 64k")
    sparse = tmp / "e-sparse.raw"
    with sparse.open("wb") as f:
        f.truncate(2 * MiB)
    io(sparse, "raw", "write -P 19 64k 64k", "write -P 20 1M 4k")

    # F: preallocated metadata (data clusters that are holes in the file read
    # as zeros), alone and as a backing file.
    prealloc = create(tmp / "f-prealloc.qcow2", 4 * MiB, "preallocation=metadata")
    io(prealloc, "qcow2", "write -P 21 1M 64k", "write -P 22 3M 4k")
    ftop = create(tmp / "f-top.qcow2", 4 * MiB, backing=prealloc)
    io(ftop, "qcow2", "write -P 23 2M 64k")

    def image(path: Path, fmt: str = "qcow2") -> dict[str, Any]:
        return {"driver": fmt, "read-only": True,
                "file": {"driver": "file", "filename": str(path)}}

    return {
        "a": image(top), "a-mid": image(mid), "b": image(btop), "c": image(ctop),
        "d": image(dtop), "e": image(plain), "e-raw": image(sparse, "raw"),
        "f": image(prealloc), "f-top": image(ftop),
        "null": {"driver": "null-co", "size": 2 * MiB},
        "null-zero": {"driver": "null-co", "size": 2 * MiB, "read-zeroes": True},
    }


def command_line(nodes: dict[str, dict[str, Any]], sock: Path) -> list[str]:
    args: list[str] = []
    for name, options in nodes.items():
        args += ["--blockdev", json.dumps({**options, "node-name": name})]
    args += ["--nbd-server", f"addr.type=unix,addr.path={sock}"]
    for name in nodes:
        args += ["--export", f"type=nbd,id=x-{name},node-name={name},allocation-depth=on"]
    return args


async def raw_extents(uri: str, size: int) -> list[Any]:
    """Both contexts from offsets all over the export, with and without REQ_ONE."""
    out: list[Any] = []
    async with await NbdClient.connect(
        uri, contexts=(p.BASE_ALLOCATION, p.ALLOCATION_DEPTH)
    ) as c:
        for offset in range(0, size, 28 * KiB):
            for req_one in (True, False):
                length = min(size - offset, 1536 * KiB)
                out.append((offset, req_one, await c.block_status(offset, length, req_one)))
    return out


def observe(sock: Path, nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name in nodes:
        uri = f"nbd+unix:///{name}?socket={sock}"
        info = json.loads(run("nbdinfo", "--json", uri))
        size = info["exports"][0]["export-size"]
        seen[name] = {
            "contexts": info["exports"][0]["contexts"],
            "base:allocation": run("nbdinfo", "--map", uri),
            "qemu:allocation-depth": run("nbdinfo", "--map=qemu:allocation-depth", uri),
            "qemu-img map": json.loads(
                run("qemu-img", "map", "--output=json", "-f", "raw", uri)),
            "extents": asyncio.run(raw_extents(uri, size)),
            # Sparse READs are built from the same chain status.
            "content": hashlib.sha256(subprocess.run(
                [require_tool("nbdcopy"), uri, "-"], capture_output=True, check=True,
                timeout=60).stdout).hexdigest(),
        }
    return seen


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    for tool in ("qemu-img", "qemu-io", "nbdinfo"):
        require_tool(tool)
    qsd = require_tool("qemu-storage-daemon")
    tmp = tmp_path_factory.mktemp("chains")
    nodes = build(tmp)
    sock = tmp / "qsd.sock"
    proc = subprocess.Popen([qsd, *command_line(nodes, sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(proc, sock)
        qemu = observe(sock, nodes)
    finally:
        proc.terminate()
        proc.wait(10)
    sock = tmp / "qmpd.sock"
    daemon = QmpdProcess(tmp, *command_line(nodes, sock))
    try:
        ours = observe(sock, nodes)
    finally:
        daemon.stop()
    yield {"qemu": qemu, "qmpd": ours}


NAMES = ["a", "a-mid", "b", "c", "d", "e", "e-raw", "f", "f-top", "null", "null-zero"]


WHAT = ["base:allocation", "qemu:allocation-depth", "qemu-img map", "content"]


# null-co without read-zeroes: QEMU leaves the read buffer as it is, qmpd
# reads zeros (README difference 10), so only its status is compared.
@pytest.mark.parametrize(
    ("name", "what"),
    [(n, w) for n in NAMES for w in WHAT if (n, w) != ("null", "content")])
def test_map_as_qsd(observed: dict[str, Any], name: str, what: str) -> None:
    assert observed["qmpd"][name]["contexts"] == observed["qemu"][name]["contexts"]
    assert observed["qmpd"][name][what] == observed["qemu"][name][what]


@pytest.mark.parametrize("name", NAMES)
def test_block_status_extents_as_qsd(observed: dict[str, Any], name: str) -> None:
    ours, qemu = observed["qmpd"][name]["extents"], observed["qemu"][name]["extents"]
    assert len(ours) == len(qemu)
    for mine, theirs in zip(ours, qemu, strict=True):
        assert mine == theirs


def test_chain_reports_backing_data(observed: dict[str, Any]) -> None:
    """The defects themselves, not only equality: data in the backing files is
    present, at its depth; ranges empty in the whole chain read as zeros."""
    mapping = observed["qmpd"]["a"]["qemu-img map"]
    assert all(m["present"] for m in mapping)
    def is_data(start: int, length: int) -> bool:
        return any(m["data"] and m["start"] <= start
                   and start + length <= m["start"] + m["length"] for m in mapping)

    assert is_data(256 * KiB, 64 * KiB)  # only in the raw base
    assert is_data(1536 * KiB, 64 * KiB)  # only in the middle image
    depth = observed["qmpd"]["a"]["qemu:allocation-depth"]
    assert "backing depth 3" in depth and "backing depth 2" in depth
    assert "absent" not in depth
    holes = observed["qmpd"]["a"]["base:allocation"]
    assert " hole\n" not in holes  # a hole is always zero in these chains
