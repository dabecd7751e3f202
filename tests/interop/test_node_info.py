"""Node information as qemu-storage-daemon 7.2 computes it.

Each case builds the same graph in QSD and in qmpd from the same command
line and compares what ``query-named-block-nodes`` reports about it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient, require_tool, wait_for_socket
from tests.support.qsd import QsdMonitor

pytestmark = pytest.mark.qemu

Run = Callable[..., dict[str, Any]]
Step = tuple[str, Any]
#: A step that records how the process holds a file open, not a QMP command.
ACCESS = "access-mode"


def _access_modes(pid: int, path: Path) -> list[str]:
    """``ro``/``rw`` for each descriptor of ``pid`` open on ``path``."""
    modes = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != str(path):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(int(line.split()[1], 8) for line in info if line.startswith("flags:"))
        except (FileNotFoundError, StopIteration):
            continue
        modes.append("rw" if flags & os.O_ACCMODE == os.O_RDWR else "ro")
    return sorted(modes)


def _qsd_nodes(tmp: Path, args: list[str], commands: list[Step],
               prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    qsd = require_tool("qemu-storage-daemon")
    monitor = QsdMonitor("c")
    return _spawned_nodes([*prefix, qsd, *monitor.args, *args], monitor, commands)


def _spawned_nodes(argv: list[str], sock: Path | QsdMonitor,
                   commands: list[Step]) -> dict[str, Any]:
    """Run a daemon with a QMP socket at ``sock`` (or on ``sock``, a QsdMonitor) and observe it."""
    spawn = sock.popen if isinstance(sock, QsdMonitor) else subprocess.Popen
    proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if isinstance(sock, QsdMonitor):
            client = sock.client(proc, 10)
        else:
            wait_for_socket(proc, sock)
            client = RawClient(str(sock))
        try:
            return _observe(client, proc.pid, commands)
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _qmpd_nodes(tmp: Path, args: list[str], commands: list[Step]) -> dict[str, Any]:
    daemon = QmpdProcess(tmp, *args)
    try:
        client = daemon.client()
        try:
            return _observe(client, daemon.proc.pid, commands)
        finally:
            client.close()
    finally:
        daemon.stop()


def _observe(client: RawClient, pid: int, commands: list[Step]) -> dict[str, Any]:
    client.negotiate()
    replies: list[Any] = []
    for name, args in commands:
        if name == ACCESS:
            replies.append(_access_modes(pid, args))
        elif name == "query-named-block-nodes":
            nodes = client.cmd(name, args)["return"]
            replies.append({n["node-name"]: (n["ro"], n["file"]) for n in nodes})
        elif name == "read-only":  # as "chain": by driver and file
            nodes = client.cmd("query-named-block-nodes", args)["return"]
            replies.append(sorted((n["drv"], n["file"], n["ro"]) for n in nodes))
        elif name == "chain":  # auto-generated node names differ: key by driver and file
            nodes = client.cmd("query-named-block-nodes", args)["return"]
            replies.append(sorted(
                (n["drv"], n["file"], n["backing_file_depth"], n.get("backing_file"))
                for n in nodes))
        else:
            replies.append(client.cmd(name, args))
    nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
    return {"replies": replies, "nodes": {n["node-name"]: n for n in nodes}}


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    def both(*args: str, commands: list[Step] | None = None) -> dict[str, Any]:
        qsd_tmp = tmp_path / "qsd"
        qmpd_tmp = tmp_path / "qmpd"
        qsd_tmp.mkdir(exist_ok=True)
        qmpd_tmp.mkdir(exist_ok=True)
        return {
            "qemu": _qsd_nodes(qsd_tmp, list(args), commands or []),
            "qmpd": _qmpd_nodes(qmpd_tmp, list(args), commands or []),
        }

    yield both


def _pick(node: dict[str, Any], *keys: str) -> dict[str, Any]:
    image = node["image"]
    out = {k: node.get(k) for k in keys}
    out.update({f"image.{k}": image.get(k) for k in ("virtual-size", "filename", "format")})
    return out


@pytest.mark.parametrize("length", [1000, 512, 1, 4097])
def test_file_size_whole_sectors(run: Run, tmp_path: Path, length: int) -> None:
    image = tmp_path / "odd.raw"
    image.write_bytes(b"\x01" * length)
    seen = run("--blockdev", f"driver=file,node-name=f,filename={image}",
               "--blockdev", "driver=raw,node-name=r,file=f")
    for name in ("f", "r"):
        ours = _pick(seen["qmpd"]["nodes"][name], "file", "ro", "drv")
        assert ours == _pick(seen["qemu"]["nodes"][name], "file", "ro", "drv")
    assert seen["qmpd"]["nodes"]["r"]["image"]["virtual-size"] == -(-length // 512) * 512


def test_auto_read_only_follows_writers(run: Run, tmp_path: Path) -> None:
    """auto-read-only=on: the file is open read-only until a writer attaches,
    read-write while it is attached, read-only again after; ``ro`` stays false."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    nbd = tmp_path / "nbd.sock"
    nodes = ("query-named-block-nodes", {"flat": True})
    seen = run(
        "--blockdev", f"driver=file,node-name=f,filename={image},auto-read-only=on",
        "--nbd-server", f"addr.type=unix,addr.path={nbd}",
        commands=[
            nodes, (ACCESS, image),
            ("block-export-add", {"type": "nbd", "id": "e", "node-name": "f",
                                  "writable": True}),
            nodes, (ACCESS, image),
            ("block-export-del", {"id": "e"}),
            nodes, (ACCESS, image),
            ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}),
            nodes, (ACCESS, image),
        ])
    assert seen["qmpd"]["replies"] == seen["qemu"]["replies"]
    assert [seen["qmpd"]["replies"][i] for i in (1, 4, 7, 10)] == [["ro"], ["rw"], ["ro"], ["ro"]]


def test_backing_file_depth(run: Run, tmp_path: Path) -> None:
    """Counted along COW backing links only (a raw node is no link), and 0 in a
    flat query, where QEMU does not walk the chain."""
    qemu_img = require_tool("qemu-img")
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    mid = tmp_path / "mid.qcow2"
    top = tmp_path / "top.qcow2"
    for image, backing, fmt in ((mid, base, "raw"), (top, mid, "qcow2")):
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", str(backing),
                        "-F", fmt, str(image)], check=True)
    seen = run("--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}",
               commands=[("chain", {"flat": True}), ("chain", {})])
    assert seen["qmpd"]["replies"] == seen["qemu"]["replies"]
    depths = {(drv, file): depth for drv, file, depth, _ in seen["qmpd"]["replies"][1]}
    assert depths[("qcow2", str(top))] == 2
    assert depths[("raw", str(base))] == 0


def _filename_cases(tmp: Path) -> dict[str, list[str]]:
    base = tmp / "base.raw"
    rel = tmp / "rel.qcow2"  # header names "base.raw"
    plain = tmp / "plain.qcow2"  # no backing file in the header
    f = f"driver=file,node-name=f,filename={base}"
    return {
        "raw-offset-size": ["--blockdev", f,
                            "--blockdev", "driver=raw,node-name=r,file=f,offset=512,size=4096"],
        "raw-offset-0": ["--blockdev", f, "--blockdev", "driver=raw,node-name=r,file=f,offset=0"],
        "raw-over-raw": ["--blockdev", f, "--blockdev", "driver=raw,node-name=r,file=f",
                         "--blockdev", "driver=raw,node-name=r2,file=r"],
        "file-options": ["--blockdev", f"{f},locking=off,aio=threads",
                         "--blockdev", "driver=raw,node-name=r,file=f"],
        "qcow2-over-raw": ["--blockdev", "driver=qcow2,node-name=q,file.driver=raw,"
                           f"file.file.driver=file,file.file.filename={plain}"],
        "qcow2-backing-overridden": ["--blockdev", f, "--blockdev",
                                     "driver=qcow2,node-name=q,file.driver=file,"
                                     f"file.filename={plain},backing=f"],
        "qcow2-backing-relative": ["--blockdev", f, "--blockdev", "driver=raw,node-name=r,file=f",
                                   "--blockdev", "driver=qcow2,node-name=q,file.driver=file,"
                                   f"file.filename={rel},backing=r"],
        "qcow2-backing-null": ["--blockdev", '{"driver": "qcow2", "node-name": "q", "file": '
                               f'{{"driver": "file", "filename": "{rel}"}}, "backing": null}}'],
        "qcow2-backing-auto": ["--blockdev", "driver=qcow2,node-name=q,file.driver=file,"
                               f"file.filename={rel}"],
        "null-size": ["--blockdev", "driver=null-co,node-name=n,size=4096",
                      "--blockdev", "driver=raw,node-name=r,file=n"],
        "null-read-zeroes": ["--blockdev", "driver=null-co,node-name=n,read-zeroes=on"],
        "null-plain": ["--blockdev", "driver=null-co,node-name=n",
                       "--blockdev", "driver=raw,node-name=r,file=n"],
    }


@pytest.mark.parametrize("case", list(_filename_cases(Path("/"))))
def test_json_filenames(run: Run, tmp_path: Path, case: str) -> None:
    """``file`` (and ``backing_file``) as QEMU's filename refresh writes them:
    the protocol file's name, or ``json:{...}`` with QEMU's member order."""
    qemu_img = require_tool("qemu-img")
    (tmp_path / "base.raw").write_bytes(bytes(1 << 20))
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw",
                    str(tmp_path / "rel.qcow2")], check=True, cwd=tmp_path)
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(tmp_path / "plain.qcow2"),
                    "1M"], check=True)
    seen = run(*_filename_cases(tmp_path)[case], commands=[("chain", {"flat": True})])
    ours, qemu = seen["qmpd"]["replies"], seen["qemu"]["replies"]
    assert ours == qemu
    if case not in ("file-options", "qcow2-backing-auto", "null-plain"):
        assert any(file.startswith("json:{") for _, file, _, _ in ours[0])


def _start_error(tmp: Path, blockdev: str) -> tuple[str, str]:
    """The one-line start-up error of QSD and of qmpd for ``--blockdev``."""
    qsd = subprocess.run([require_tool("qemu-storage-daemon"), "--blockdev", blockdev],
                         capture_output=True, text=True, timeout=30)
    ours = subprocess.run([sys.executable, "-m", "qmpd", "--qmp", f"unix:{tmp}/qmpd.sock",
                           "--blockdev", blockdev],
                          capture_output=True, text=True, timeout=30, cwd=tmp)
    assert qsd.returncode == ours.returncode == 1
    return (qsd.stderr.strip().splitlines()[-1].split(": ", 1)[1],
            ours.stderr.strip().splitlines()[-1].split(": ", 1)[1])


@pytest.mark.parametrize("driver,target", [
    ("host_device", "regular"), ("host_device", "directory"), ("file", "/dev/null"),
])
def test_device_type_refused(tmp_path: Path, driver: str, target: str) -> None:
    """host_device wants a block or character device, file a regular file."""
    path = {"regular": str(tmp_path / "disk.raw"), "directory": str(tmp_path)}.get(target, target)
    (tmp_path / "disk.raw").write_bytes(bytes(4096))
    qemu, ours = _start_error(tmp_path, f"driver={driver},node-name=h,filename={path}")
    assert ours == qemu


def _loop_device(tmp: Path) -> Iterator[str]:
    losetup = shutil.which("losetup")
    if losetup is None or os.geteuid() != 0:
        pytest.skip("attaching a loop device needs losetup and root")
    backing = tmp / "loop.img"
    backing.write_bytes(b"\x5a" * (3 << 20))
    attach = subprocess.run([losetup, "-f", "--show", str(backing)],
                            capture_output=True, text=True, timeout=30)
    if attach.returncode != 0:
        pytest.skip(f"no loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([losetup, "-d", device], timeout=30)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    yield from _loop_device(tmp_path)


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero", "loop"])
def test_host_device(run: Run, device: str, request: pytest.FixtureRequest) -> None:
    """host_device on character and block devices: size, names, read-only, as QSD."""
    path = request.getfixturevalue("loop_device") if device == "loop" else device
    seen = run("--blockdev", f"driver=host_device,node-name=h,filename={path}",
               "--blockdev", "driver=raw,node-name=r,file=h")
    keys = ("file", "ro", "drv")
    for name in ("h", "r"):
        ours, qemu = seen["qmpd"]["nodes"][name], seen["qemu"]["nodes"][name]
        assert _pick(ours, *keys) == _pick(qemu, *keys)
        assert ours["image"].get("actual-size") == qemu["image"].get("actual-size")
    assert seen["qmpd"]["nodes"]["h"]["drv"] == "host_device"


def _ok(client: RawClient, command: str, args: dict[str, Any]) -> None:
    assert client.cmd(command, args) == {"return": {}}


def _error(client: RawClient, command: str, args: dict[str, Any]) -> str:
    reply = client.cmd(command, args)
    assert reply["error"]["class"] == "GenericError", reply
    return str(reply["error"]["desc"])


def test_inactive_graph_rules(qmpd: QmpdProcess, tmp_path: Path) -> None:
    """QEMU 10.0's rules and texts for inactive nodes (its iotest inactive-node-nbd)."""
    qemu_img = require_tool("qemu-img")
    image = tmp_path / "disk.qcow2"
    overlay = tmp_path / "snap.qcow2"
    for path in (image, overlay):
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "1M"], check=True)
    c = qmpd.client()
    c.negotiate()
    _ok(c, "blockdev-add", {"driver": "file", "node-name": "disk-file",
                            "filename": str(image)})
    _ok(c, "blockdev-add", {"driver": "qcow2", "node-name": "disk-fmt", "file": "disk-file",
                            "active": False})
    assert _error(c, "blockdev-add", {"driver": "raw", "node-name": "disk-filter",
                                      "file": "disk-fmt", "active": True}) == (
        "Inactive 'disk-fmt' can't be a file child of active 'disk-filter'")
    assert _error(c, "blockdev-add", {"driver": "qcow2", "node-name": "snap-fmt",
                                      "file": {"driver": "file", "filename": str(overlay)},
                                      "backing": "disk-fmt"}) == (
        "Inactive 'disk-fmt' can't be a backing child of active 'snap-fmt'")
    names = {n["node-name"] for n in c.cmd("query-named-block-nodes")["return"]}
    assert names == {"disk-file", "disk-fmt"}  # nothing left behind
    _ok(c, "blockdev-add", {"driver": "raw", "node-name": "disk-filter", "file": "disk-fmt",
                            "active": False})
    _ok(c, "blockdev-del", {"node-name": "disk-filter"})
    assert _error(c, "block_resize", {"node-name": "disk-fmt", "size": 2 << 20}) == (
        "Permission 'resize' unavailable on inactive node")

    _ok(c, "blockdev-set-active", {"node-name": "disk-fmt", "active": True})
    _ok(c, "nbd-server-start", {"addr": {"type": "unix",
                                         "data": {"path": str(tmp_path / "nbd.sock")}}})
    _ok(c, "block-export-add", {"type": "nbd", "id": "exp0", "node-name": "disk-fmt",
                                "writable": True})
    assert _error(c, "blockdev-set-active", {"node-name": "disk-fmt", "active": False}) == (
        "Failed to inactivate node: Operation not permitted")
    assert _error(c, "blockdev-set-active", {"active": False}) == (
        "Failed to inactivate all nodes: Operation not permitted")
    nodes = {n["node-name"]: n["active"] for n in c.cmd("query-named-block-nodes")["return"]}
    assert nodes["disk-fmt"] is True
    c.close()


def test_auto_read_only_on_an_unwritable_file(tmp_path: Path) -> None:
    """An image this process may not write opens with ``ro`` false; only a
    writer attaching fails, with QEMU's text.  Root is kept from writing a
    0444 file by dropping CAP_DAC_OVERRIDE."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop CAP_DAC_OVERRIDE")
    image = tmp_path / "ro.raw"
    image.write_bytes(bytes(1 << 20))
    image.chmod(0o444)
    prefix = (setpriv, "--bounding-set=-dac_override,-dac_read_search")
    nodes = ("query-named-block-nodes", {"flat": True})

    def args(tmp: Path) -> list[str]:
        return ["--blockdev", f"driver=file,node-name=f,filename={image},auto-read-only=on",
                "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock"]

    commands: list[Step] = [
        nodes, (ACCESS, image),
        ("block-export-add", {"type": "nbd", "id": "e", "node-name": "f", "writable": True}),
        ("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r2", "auto-read-only": True,
                          "file": {"driver": "file", "filename": str(image)}}),
        ("read-only", {"flat": True}), (ACCESS, image),
    ]
    (tmp_path / "qsd").mkdir()
    (tmp_path / "qmpd").mkdir()
    qemu = _qsd_nodes(tmp_path / "qsd", args(tmp_path / "qsd"), commands, prefix)
    sock = tmp_path / "qmpd" / "qmp.sock"
    ours = _spawned_nodes([*prefix, sys.executable, "-m", "qmpd", "--qmp", f"unix:{sock}",
                           *args(tmp_path / "qmpd")], sock, commands)
    assert ours["replies"] == qemu["replies"]
    assert ours["replies"][2]["error"]["desc"] == f"Could not open '{image}': Permission denied"
