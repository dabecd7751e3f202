"""Malicious qcow2 images: guest writes must never land on live metadata.

Images are crafted with qemu-img and struct edits so that a guest write
targets metadata: an L2 entry pointing at the active L2 table itself, at the
refcount block, the L1 table, the refcount table, the snapshot table or a
snapshot's (inactive) L1 table, and a zeroed refcount that makes the
allocator hand out the header cluster (an L2 entry can never point at the
header: offset 0 means "unallocated").  Each is written through an NBD export
with qemu-io, once on qmpd and once on qemu-storage-daemon 7.2 with the same
images and options, and the results must be identical: the write's error,
the ``BLOCK_IMAGE_CORRUPTED`` event, the image left on disk (``qemu-img
check``, the corrupt bit, the metadata untouched), the later I/O errors and
the refusal to open the image read/write again.  Both daemons stay up, and a
healthy node next to the corrupt ones keeps working.  HMP ``qemu-io`` is
compared with ``qemu-system-x86_64 -M none``.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    QmpdProcess,
    RawClient,
    check_message,
    require_tool,
)
from tests.integration.migration_helpers import Peer, need_qemu
from tests.interop.test_qcow2_common import run
from tests.support.qsd import QsdMonitor

CS = 65536
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00

#: case -> (what the write overlaps, as QEMU names it; the qemu-io command)
CASES = {
    "l2": ("active L2 table", "write -P 0x55 0 64k"),
    "l2-part": ("active L2 table", "write -P 0x55 4k 4k"),
    "refblock": ("refcount block", "write -P 0x55 0 64k"),
    "l1": ("active L1 table", "write -P 0x55 0 64k"),
    "reftable": ("refcount table", "write -P 0x55 0 64k"),
    "header": ("qcow2_header", "write -P 0x55 1M 64k"),
    "header-part": ("qcow2_header", "write -P 0x55 1028k 4k"),
    "snaptable": ("snapshot table", "write -P 0x55 0 64k"),
    "snapl1": ("inactive L1 table", "write -P 0x55 0 64k"),
    # a persistent bitmap's directory (issue 11), marked in-use at open by both
    "bitmapdir": ("bitmap directory", "write -P 0x55 0 64k"),
    # an L1 entry (not an L2 entry) at the refcount table: the data lands in a
    # new cluster, but writing back the updated "L2 table" is refused
    "l1e-reftable": ("refcount table", "write -P 0x55 0 4k"),
}
#: case -> (QEMU's corruption message, the qemu-io command): unaligned offsets
#: in L1 and L2 entries, found when a request uses them (not at open), and an
#: L1 table placed on the refcount table by its header
OTHER = {
    "unaligned-read": ("Cluster allocation offset 0x50200 unaligned "
                       "(L2 offset: 0x40000, L2 index: 0)", "read 0 4k"),
    "unaligned-write": ("Data cluster offset 0x50200 unaligned (guest offset: 0)",
                        "write -P 0x55 0 4k"),
    "unaligned-l1": ("L2 table offset 0x40200 unaligned (L1 index: 0)", "read 0 4k"),
    "unaligned-l1-write": ("L2 table offset 0x40200 unaligned (L1 index: 0)",
                           "write -P 0x55 0 4k"),
    "l1-at-reftable": ("Preventing invalid write on metadata (overlaps with active L2 table)",
                       "write -P 0x55 0 4k"),
}
#: a read-only node: the corruption is not fatal (no corrupt bit, reads go on)
READ_ONLY = "unaligned-read-ro"
ALL = {**{case: c[1] for case, c in CASES.items()}, **{case: c[1] for case, c in OTHER.items()},
       READ_ONLY: "read 0 4k"}
FATAL = [case for case in ALL if case != READ_ONLY]

#: case -> (offset, size) in the event, relative to the metadata's offset
EVENT_RANGE = {"l2-part": (4096, 4096), "header-part": (4096, 4096)}


def _u64(raw: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from(">Q", raw, offset)[0])


def _bitmap_directory(raw: bytes | bytearray) -> int:
    """The bitmap directory's offset from the bitmaps header extension."""
    offset = struct.unpack_from(">I", raw, 100)[0]
    while True:
        ext_type, length = struct.unpack_from(">II", raw, offset)
        if ext_type == 0x23852875:
            return _u64(raw, offset + 8 + 16)
        assert ext_type, "no bitmaps extension"
        offset += 8 + (length + 7 & ~7)


def craft(tmp: Path, case: str) -> tuple[Path, int]:
    """An image for ``case``: (path, offset of the metadata the write targets)."""
    path = tmp / f"{case}.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "64M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", path)
    if case.startswith("snap"):
        run("qemu-img", "snapshot", "-c", "s1", path)
    if case == "bitmapdir":
        run("qemu-img", "bitmap", "--add", path, "b0")
    raw = bytearray(path.read_bytes())
    l1 = _u64(raw, 40)
    reftable = _u64(raw, 48)
    l2 = _u64(raw, l1) & OFFSET_MASK
    kind = case.removesuffix("-part")
    if kind == "header":
        # refcount 0 for cluster 0 (16-bit refcounts): the next allocation is the header
        struct.pack_into(">H", raw, _u64(raw, reftable), 0)
        target = 0
    elif kind == "l1-at-reftable":
        struct.pack_into(">Q", raw, 40, reftable)
        target = reftable
    elif kind.startswith("unaligned-l1"):
        struct.pack_into(">Q", raw, l1, COPIED | (l2 + 512))
        target = l2
    elif kind.startswith("unaligned"):
        data = _u64(raw, l2) & OFFSET_MASK
        assert (data, l2) == (0x50000, 0x40000), "QEMU's layout changed: fix OTHER"
        struct.pack_into(">Q", raw, l2, COPIED | (data + 512))
        target = data
    elif kind == "l1e-reftable":
        struct.pack_into(">Q", raw, l1, COPIED | reftable)
        target = reftable
    else:
        target = {
            "l2": l2,
            "refblock": _u64(raw, reftable),
            "l1": l1,
            "reftable": reftable,
            "snaptable": _u64(raw, 64),
            "snapl1": _u64(raw, _u64(raw, 64)),
            "bitmapdir": _bitmap_directory(raw) if kind == "bitmapdir" else 0,
        }[kind]
        struct.pack_into(">Q", raw, l2, COPIED | target)
    path.write_bytes(raw)
    return path, target


def collect(client: RawClient, command: str, arguments: dict[str, Any] | None = None
            ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run a command; return its reply and the events that came before it."""
    req: dict[str, Any] = {"execute": command}
    if arguments is not None:
        req["arguments"] = arguments
    client.send(json.dumps(req) + "\n")
    events = []
    while True:
        msg = client.recv()
        check_message(msg, command)
        if "event" in msg:
            events.append(msg)
        else:
            return msg, events


def qemu_io(uri: str, command: str) -> tuple[int, str]:
    read_only = ["-r"] if f"/{READ_ONLY}?" in uri else []
    proc = run("qemu-io", "-f", "raw", *read_only, "-c", command, uri, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def blockdev(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {"driver": "qcow2", "node-name": name,
            "file": {"driver": "file", "filename": str(path)}, **extra}


def command_line(images: dict[str, Path], healthy: Path, nbd: Path) -> list[str]:
    argv = ["--nbd-server", f"addr.type=unix,addr.path={nbd}"]
    for name, path in [*images.items(), ("healthy", healthy)]:
        ro = name == READ_ONLY
        argv += ["--blockdev", json.dumps(blockdev(name, path, **({"read-only": True} if ro else {}))),
                 "--export", f"nbd,id=e-{name},node-name={name},writable={'off' if ro else 'on'}"]
    return argv


def scenario(qmp: Path | socket.socket, nbd: Path) -> dict[str, Any]:
    """The writes, their errors and events, as one daemon answers them."""
    client = RawClient(qmp)
    client.negotiate()
    seen: dict[str, Any] = {}
    try:
        for case, command in ALL.items():
            uri = f"nbd+unix:///{case}?socket={nbd}"
            write = qemu_io(uri, command)
            reply, events = collect(client, "query-version")
            assert "return" in reply
            seen[case] = {
                "write": write,
                "events": [(e["event"], e.get("data")) for e in events],
                "again": qemu_io(uri, "write -P 0x55 8M 4k"),
                "read": qemu_io(uri, "read 0 4k"),
            }
        seen["healthy"] = qemu_io(f"nbd+unix:///healthy?socket={nbd}",
                                  "write -P 0x66 0 64k")
        # a corrupt node can still be deleted
        seen["export-del"], events = collect(client, "block-export-del", {"id": "e-l2"})
        if not any(e["event"] == "BLOCK_EXPORT_DELETED" for e in events):
            while client.recv().get("event") != "BLOCK_EXPORT_DELETED":
                pass
        seen["blockdev-del"] = client.cmd("blockdev-del", {"node-name": "l2"})
        reply, events = collect(client, "query-version")
        seen["alive"] = "return" in reply and not events
    finally:
        client.close()
    return seen


def reopen(qmp: Path | socket.socket, images: dict[str, Path]) -> dict[str, Any]:
    """blockdev-add of each corrupt image, read/write and read-only."""
    client = RawClient(qmp)
    client.negotiate()
    out = {}
    try:
        for case, path in images.items():
            rw = client.cmd("blockdev-add", blockdev(f"rw-{case}", path))
            ro = client.cmd("blockdev-add", blockdev(f"ro-{case}", path, **{"read-only": True}))
            out[case] = (rw.get("error", rw), ro)
    finally:
        client.close()
    return out


def serve_qsd(argv: list[str]) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """QSD with ``argv`` and our end of its QMP monitor."""
    monitor = QsdMonitor("m")
    proc = monitor.popen([require_tool("qemu-storage-daemon"), *monitor.args, *argv],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, monitor.sock


def stop_qsd(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(10)


def stop_qmpd(daemon: QmpdProcess) -> str:
    """Stop; what the stop's own checks (no traceback in the log) found wrong."""
    try:
        daemon.stop()
    except AssertionError as exc:
        return str(exc)
    return ""


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    for name in ("qemu-img", "qemu-io", "qemu-storage-daemon"):
        require_tool(name)
    base = tmp_path_factory.mktemp("overlap")
    crafted = {case: craft(base, case) for case in ALL}
    result: dict[str, Any] = {"crafted": crafted}
    for who in ("qemu", "qmpd"):
        tmp = base / who
        tmp.mkdir()
        images = {case: tmp / c[0].name for case, c in crafted.items()}
        for case, c in crafted.items():
            shutil.copy(c[0], images[case])
        healthy = tmp / "healthy.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", healthy, "64M")
        argv = command_line(images, healthy, tmp / "nbd.sock")
        if who == "qemu":
            proc, qmp = serve_qsd(argv)
            try:
                seen = scenario(qmp, tmp / "nbd.sock")
            finally:
                stop_qsd(proc)
            proc, qmp = serve_qsd([])
            try:
                seen["reopen"] = reopen(qmp, images)
            finally:
                stop_qsd(proc)
        else:
            daemon = QmpdProcess(tmp, *argv)
            try:
                seen = scenario(Path(daemon.sock), tmp / "nbd.sock")
            finally:
                seen_stop = stop_qmpd(daemon)
            seen["stop"] = seen_stop
            daemon = QmpdProcess(tmp)
            try:
                seen["reopen"] = reopen(Path(daemon.sock), images)
            finally:
                daemon.stop()
        seen["images"] = images
        seen["healthy-image"] = healthy
        result[who] = seen
    yield result


@pytest.mark.parametrize("case", list(CASES))
def test_write_refused_with_qemu_event(observed: dict[str, Any], case: str) -> None:
    ours = observed["qmpd"][case]
    _, target = observed["crafted"][case]
    name, _ = CASES[case]
    assert ours["write"] == (1, "write failed: Input/output error")
    delta, size = EVENT_RANGE.get(case, (0, CS))
    assert ours["events"] == [("BLOCK_IMAGE_CORRUPTED", {
        "device": "", "node-name": case,
        "msg": f"Preventing invalid write on metadata (overlaps with {name})",
        "offset": target + delta, "size": size, "fatal": True,
    })]
    theirs = observed["qemu"][case]
    assert ours["events"] == theirs["events"]
    assert ours["write"] == theirs["write"]


@pytest.mark.parametrize("case", list(OTHER))
def test_other_corruption_as_qemu(observed: dict[str, Any], case: str) -> None:
    ours = observed["qmpd"][case]
    op = OTHER[case][1].split()[0]
    assert ours["write"] == (1, f"{op} failed: Input/output error")
    assert [(name, data["msg"], data["fatal"]) for name, data in ours["events"]] == [
        ("BLOCK_IMAGE_CORRUPTED", OTHER[case][0], True)]
    if case.startswith("unaligned"):  # QEMU knows no range for these
        assert "offset" not in ours["events"][0][1]
    assert ours["events"] == observed["qemu"][case]["events"]
    assert ours["write"] == observed["qemu"][case]["write"]
    after = observed["qmpd"]["images"][case].read_bytes()
    assert after == observed["qemu"]["images"][case].read_bytes()
    assert _u64(after, 72) & 2


def test_read_only_corruption_not_fatal_as_qemu(observed: dict[str, Any]) -> None:
    ours = observed["qmpd"][READ_ONLY]
    assert ours["write"] == (1, "read failed: Input/output error")
    assert ours["events"] == [("BLOCK_IMAGE_CORRUPTED", {
        "device": "", "node-name": READ_ONLY, "msg": OTHER["unaligned-read"][0],
        "fatal": False})]
    assert ours["read"] == (1, "read failed: Input/output error")  # no second event
    assert ours == observed["qemu"][READ_ONLY]
    after = observed["qmpd"]["images"][READ_ONLY].read_bytes()
    assert after == observed["crafted"][READ_ONLY][0].read_bytes()


@pytest.mark.parametrize("case", FATAL)
def test_later_io_fails_as_in_qemu(observed: dict[str, Any], case: str) -> None:
    ours = observed["qmpd"][case]
    # QEMU drops the driver of a corrupt node: ENOMEDIUM, EINVAL over NBD
    assert ours["again"] == (1, "write failed: Invalid argument")
    assert ours["read"] == (1, "read failed: Invalid argument")


@pytest.mark.parametrize("case", list(CASES))
def test_metadata_untouched_and_marked_corrupt(observed: dict[str, Any], case: str) -> None:
    orig_path, target = observed["crafted"][case]
    orig = orig_path.read_bytes()
    after = observed["qmpd"]["images"][case].read_bytes()
    assert _u64(after, 72) & 2, "corrupt bit not set"
    assert _u64(after, 72) & ~2 == _u64(orig, 72)
    masked = bytearray(after)
    masked[72:80] = orig[72:80]
    end = min(target + CS, len(orig))  # a snapshot table may end the file
    expected = bytearray(orig[target:end])
    if case == "bitmapdir":  # the read-write open marked the bitmap in-use
        expected[15] |= 1
    assert masked[target:end] == expected
    qemu_after = observed["qemu"]["images"][case].read_bytes()
    assert after == qemu_after


@pytest.mark.parametrize("case", FATAL)
def test_check_as_qemu(observed: dict[str, Any], case: str) -> None:
    ours = run("qemu-img", "check", observed["qmpd"]["images"][case], check=False)
    theirs = run("qemu-img", "check", observed["qemu"]["images"][case], check=False)
    assert ours.returncode == 2  # corruptions found
    assert (ours.returncode, ours.stdout, ours.stderr) == (
        theirs.returncode, theirs.stdout, theirs.stderr)


@pytest.mark.parametrize("case", FATAL)
def test_reopen_read_write_refused(observed: dict[str, Any], case: str) -> None:
    rw, ro = observed["qmpd"]["reopen"][case]
    assert rw == {"class": "GenericError",
                  "desc": "qcow2: Image is corrupt; cannot be opened read/write"}
    assert ro == {"return": {}}
    assert observed["qmpd"]["reopen"][case] == observed["qemu"]["reopen"][case]
    proc = run("qemu-io", "-c", "read 0 4k", observed["qmpd"]["images"][case], check=False)
    assert proc.stderr.strip() == (
        f"qemu-io: can't open device {observed['qmpd']['images'][case]}: "
        "qcow2: Image is corrupt; cannot be opened read/write")


def test_daemon_and_other_nodes_unaffected(observed: dict[str, Any]) -> None:
    assert observed["qmpd"]["stop"] == ""
    for key in ("export-del", "blockdev-del"):
        assert observed["qmpd"][key] == observed["qemu"][key] == {"return": {}}
    for who in ("qmpd", "qemu"):
        assert observed[who]["alive"]
        assert observed[who]["healthy"][0] == 0
    healthy = observed["qmpd"]["healthy-image"]
    assert run("qemu-img", "check", healthy, check=False).returncode == 0
    assert run("qemu-io", "-c", "read -P 0x66 0 64k", healthy, check=False).returncode == 0


def hmp_session(kind: str, tmp: Path, image: Path) -> dict[str, Any]:
    peer = Peer(kind, tmp, kind).ready()
    try:
        peer.add_disk(image)
        replies = [peer.qemu_io("disk", command) for command in (
            "write -P 0x55 0 4k", "write -P 0x55 8M 4k", "read 0 4k")]
        peer.ok("query-version")
        events = [(e["event"], e.get("data")) for e in peer.qmp.events]
        return {"replies": replies, "events": events, "stdout": peer.stdout(),
                "alive": peer.alive()}
    finally:
        peer.close()


def test_hmp_qemu_io_as_qemu_system(tmp_path: Path) -> None:
    """HMP qemu-io onto the L2 table, as in qemu-system-x86_64 -M none."""
    need_qemu()
    path, target = craft(tmp_path, "l2")
    seen = {}
    for kind in ("qemu", "qmpd"):
        image = tmp_path / f"{kind}.qcow2"
        shutil.copy(path, image)
        seen[kind] = hmp_session(kind, tmp_path, image)
    assert seen["qmpd"]["stdout"] == (
        "write failed: Input/output error\n"
        "write failed: No medium found\n"
        "read failed: No medium found\n")
    assert seen["qmpd"]["events"] == [("BLOCK_IMAGE_CORRUPTED", {
        "device": "", "node-name": "disk",
        "msg": "Preventing invalid write on metadata (overlaps with active L2 table)",
        "offset": target, "size": 4096, "fatal": True})]
    assert seen["qmpd"] == seen["qemu"]
