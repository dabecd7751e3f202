"""Block nodes through QMP on a real daemon, checked with QEMU's own tools."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient
from tests.support.tools import qemu_img, qemu_io


@pytest.fixture
def client(qmpd: QmpdProcess) -> RawClient:
    c = qmpd.client()
    c.negotiate()
    return c


def add(c: RawClient, **options: Any) -> dict[str, Any]:
    return c.cmd("blockdev-add", options)


def error(reply: dict[str, Any]) -> str:
    assert "error" in reply, reply
    return str(reply["error"]["desc"])


def raw_image(tmp_path: Path, name: str = "disk.raw", size: int = 1 << 20) -> Path:
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def hmp(c: RawClient, line: str) -> str:
    reply = c.cmd("human-monitor-command", {"command-line": line})
    return str(reply["return"])


def test_raw_over_file_read_write_and_query(client: RawClient, qmpd: QmpdProcess,
                                            tmp_path: Path) -> None:
    path = raw_image(tmp_path)
    assert add(client, driver="raw", **{"node-name": "disk"},
               file={"driver": "file", "filename": str(path)}) == {"return": {}}
    assert hmp(client, 'qemu-io disk "write -P 0x5a 512 4k"') == ""
    assert hmp(client, 'qemu-io disk "read -P 0x5a 512 4k"') == ""
    assert hmp(client, 'qemu-io disk "read -P 0x5b 512 4k"') == ""
    out = qmpd.read_stdout()
    assert "wrote 4096/4096 bytes at offset 512\n4 KiB, 1 ops; " in out
    assert "read 4096/4096 bytes at offset 512\n" in out
    assert "Pattern verification failed at offset 512, 4096 bytes\n" in out
    assert path.read_bytes()[512:4608] == b"\x5a" * 4096
    nodes = client.cmd("query-named-block-nodes")["return"]
    assert [n["drv"] for n in nodes] == ["raw", "file"]
    top, child = nodes
    assert top["node-name"] == "disk" and child["node-name"].startswith("#block")
    assert top["image"] == {
        "filename": str(path), "format": "raw", "virtual-size": 1 << 20,
        "actual-size": top["image"]["actual-size"], "dirty-flag": False,
    }
    assert top["cache"] == {"writeback": True, "direct": False, "no-flush": False}
    assert top["ro"] is False and top["active"] is True and top["file"] == str(path)
    assert client.cmd("query-block") == {"return": []}


def test_hmp_read_v_and_errors(client: RawClient, qmpd: QmpdProcess, tmp_path: Path) -> None:
    path = raw_image(tmp_path)
    add(client, driver="raw", **{"node-name": "d"}, file={"driver": "file", "filename": str(path)})
    hmp(client, 'qemu-io d "write -P 0x41 0 40"')
    hmp(client, 'qemu-io d "read -v 0 40"')
    out = qmpd.read_stdout()
    assert "00000000:  41 41 41 41 41 41 41 41 41 41 41 41 41 41 41 41  AAAAAAAAAAAAAAAA\n" in out
    assert "00000020:  41 41 41 41 41 41 41 41  AAAAAAAA\n" in out
    assert "read 40/40 bytes at offset 0\n40 bytes, 1 ops; " in out
    assert hmp(client, 'qemu-io nosuch "read 0 4k"') == (
        "Error: Cannot find device='' nor node-name='nosuch'\r\n")
    assert hmp(client, "qemu-io d read 0 4k") == (
        'qemu-io: extraneous characters at the end of line\r\nTry "help qemu-io" for more information\r\n')
    assert hmp(client, "nosuchcmd") == "unknown command: 'nosuchcmd'\r\n"
    assert hmp(client, "info status") == "VM status: running\r\n"
    hmp(client, 'qemu-io d "read 0 2M"')
    assert "read failed: Input/output error\n" in qmpd.read_stdout()


def test_read_only_node_refuses_writes(client: RawClient, tmp_path: Path) -> None:
    path = raw_image(tmp_path)
    add(client, driver="file", **{"node-name": "f", "read-only": True}, filename=str(path))
    assert hmp(client, 'qemu-io f "write 0 4k"') == "Block node is read-only\r\n"
    reply = add(client, driver="raw", **{"node-name": "r"}, file="f")
    assert reply == {"return": {}}  # raw takes no write permission without a writer


@pytest.mark.parametrize(
    ("options", "desc"),
    [
        ({"driver": "raw", "file": {"driver": "file", "filename": "/nonexistent/x"}},
         "'node-name' must be specified for the root node"),
        ({"driver": "file", "node-name": "1a", "filename": "x"}, "Invalid node-name: '1a'"),
        ({"driver": "file", "node-name": "a" * 32, "filename": "x"}, "Node name too long"),
        ({"driver": "file", "node-name": "n", "filename": "/nonexistent/x"},
         "Could not open '/nonexistent/x': No such file or directory"),
        ({"driver": "file", "node-name": "n", "filename": "/"}, "Could not open '/': Is a directory"),
        ({"driver": "raw", "node-name": "n", "file": "nosuch"},
         "Cannot find device='nosuch' nor node-name='nosuch'"),
        ({"driver": "bogus", "node-name": "n"}, "Parameter 'driver' does not accept value 'bogus'"),
        ({"driver": "file", "node-name": "n"}, "Parameter 'filename' is missing"),
        ({"driver": "raw", "node-name": "n", "file": {"driver": "file"}},
         "Parameter 'file.filename' is missing"),
        ({"driver": "raw", "node-name": "n", "file": 5},
         "Invalid parameter type for 'file', expected: BlockdevRef"),
        ({"driver": "file", "node-name": "n", "filename": "x", "force-share": True},
         "force-share=on can only be used with read-only images"),
        ({"driver": "file", "node-name": "n", "filename": "x", "discard": "sometimes"},
         "Parameter 'discard' does not accept value 'sometimes'"),
        ({"driver": "file", "node-name": "n", "filename": "x", "cache": {"direct": "yes"}},
         "Invalid parameter type for 'cache.direct', expected: boolean"),
    ],
)
def test_blockdev_add_errors_leave_nothing_behind(
    client: RawClient, options: dict[str, Any], desc: str
) -> None:
    assert error(client.cmd("blockdev-add", options)) == desc
    assert client.cmd("query-named-block-nodes") == {"return": []}


def test_raw_offset_and_size(client: RawClient, tmp_path: Path) -> None:
    path = raw_image(tmp_path, size=8192)
    path.write_bytes(bytes(range(256)) * 32)
    base = {"driver": "raw", "node-name": "w", "file": {"driver": "file", "filename": str(path)}}
    assert error(client.cmd("blockdev-add", {**base, "offset": 9000})) == (
        "Offset (9000) cannot be greater than size of the containing file (8192)")
    assert error(client.cmd("blockdev-add", {**base, "size": 100})) == (
        "Specified size is not multiple of 512")
    assert error(client.cmd("blockdev-add", {**base, "offset": 4096, "size": 8192})) == (
        "The sum of offset (4096) and size (8192) has to be smaller or equal to the  actual "
        "size of the containing file (8192)")
    assert client.cmd("blockdev-add", {**base, "offset": 512, "size": 1024}) == {"return": {}}
    nodes = client.cmd("query-named-block-nodes")["return"]
    assert nodes[0]["image"]["virtual-size"] == 1024


def test_blockdev_del_rules(client: RawClient, tmp_path: Path) -> None:
    path = raw_image(tmp_path)
    add(client, driver="file", **{"node-name": "f0"}, filename=str(path))
    add(client, driver="raw", **{"node-name": "r0"}, file="f0")
    add(client, driver="raw", **{"node-name": "r1"},
        file={"driver": "file", "node-name": "f1", "filename": str(path)})
    assert error(client.cmd("blockdev-del", {"node-name": "nope"})) == (
        "Failed to find node with node-name='nope'")
    assert error(client.cmd("blockdev-del", {"node-name": "f0"})) == "Block device f0 is in use"
    assert error(client.cmd("blockdev-del", {"node-name": "f1"})) == (
        "Node f1 is not owned by the monitor")
    assert client.cmd("blockdev-del", {"node-name": "r1"}) == {"return": {}}
    names = [n["node-name"] for n in client.cmd("query-named-block-nodes")["return"]]
    assert names == ["r0", "f0"]  # f1 went away with its parent
    assert client.cmd("blockdev-del", {"node-name": "r0"}) == {"return": {}}
    assert client.cmd("blockdev-del", {"node-name": "f0"}) == {"return": {}}


def test_blockdev_on_the_command_line(qmpd_factory: Any, tmp_path: Path) -> None:
    path = raw_image(tmp_path)
    proc = qmpd_factory(
        "--blockdev", f"driver=file,node-name=f,filename={path},read-only=on",
        "--blockdev", json.dumps({"driver": "raw", "node-name": "r", "file": "f"}),
    )
    c = proc.client()
    c.negotiate()
    nodes = c.cmd("query-named-block-nodes")["return"]
    assert [(n["node-name"], n["ro"]) for n in nodes] == [("r", False), ("f", True)]


def test_bad_blockdev_on_the_command_line(tmp_path: Path) -> None:
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "qmpd", "--qmp", f"unix:{tmp_path}/s",
         "--blockdev", "driver=file,node-name=f,filename=/nonexistent"],
        capture_output=True, text=True, timeout=20, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Could not open '/nonexistent': No such file or directory" in result.stderr


def test_null_co(client: RawClient) -> None:
    assert add(client, driver="null-co", **{"node-name": "n"}, size=1 << 30) == {"return": {}}
    (node,) = client.cmd("query-named-block-nodes")["return"]
    # an explicit size is a strong option: QEMU names it even at its default
    assert node["image"]["virtual-size"] == 1 << 30
    assert node["file"] == 'json:{"driver": "null-co", "size": 1073741824}'


def test_inmigrate_nodes_are_inactive(qmpd_factory: Any, tmp_path: Path) -> None:
    path = raw_image(tmp_path)
    proc = qmpd_factory("--incoming", "defer")
    c = proc.client()
    c.negotiate()
    add(c, driver="raw", **{"node-name": "d"}, file={"driver": "file", "filename": str(path)})
    nodes = c.cmd("query-named-block-nodes")["return"]
    assert all(n["active"] is False for n in nodes)
    assert hmp(c, 'qemu-io d "write 0 4k"') == "Block node is read-only\r\n"
    assert c.cmd("blockdev-set-active", {"active": True}) == {"return": {}}
    nodes = c.cmd("query-named-block-nodes")["return"]
    assert all(n["active"] is True for n in nodes)
    assert hmp(c, 'qemu-io d "write -P 7 0 4k"') == ""
    assert path.read_bytes()[:4096] == b"\x07" * 4096


def test_cache_direct_qcow2_unaligned_io(client: RawClient, qmpd: QmpdProcess,
                                         tmp_path: Path) -> None:
    img = tmp_path / "direct.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "64M")
    reply = add(client, driver="qcow2", **{"node-name": "d"}, cache={"direct": True},
                file={"driver": "file", "filename": str(img)})
    if "error" in reply and "Invalid argument" in reply["error"]["desc"]:
        pytest.skip("this file system does not support O_DIRECT")
    assert reply == {"return": {}}
    (node, _) = client.cmd("query-named-block-nodes")["return"]
    assert node["cache"]["direct"] is True
    hmp(client, 'qemu-io d "write -P 0x61 12345 70000"')
    hmp(client, 'qemu-io d "write -P 0x62 32M 4k"')
    hmp(client, 'qemu-io d "read -P 0x61 12345 70000"')
    assert "Pattern verification failed" not in qmpd.read_stdout()
    assert client.cmd("blockdev-del", {"node-name": "d"}) == {"return": {}}
    assert qemu_img("check", str(img)).returncode == 0
    out = qemu_io("-c", "read -P 0x61 12345 70000", "-c", "read -P 0x62 32M 4k", str(img))
    assert "Pattern verification failed" not in out.stdout and out.returncode == 0


def test_hmp_qemu_io_length_is_capped_as_in_qemu(client: RawClient, qmpd: QmpdProcess,
                                                 tmp_path: Path) -> None:
    """QEMU's BDRV_REQUEST_MAX_BYTES bound; a 3G read would otherwise take 6 GiB."""
    path = tmp_path / "big.img"
    qemu_img("create", "-q", "-f", "raw", str(path), "4G")
    assert add(client, driver="raw", **{"node-name": "big"},
               file={"driver": "file", "filename": str(path)}) == {"return": {}}
    lines = ['read 0 3G', 'write 0 2147483137', 'discard 0 3G', 'read 0 2147483136']
    for line in lines[:3]:
        assert hmp(client, f'qemu-io big "{line}"') == ""
    expected = [qemu_io("-f", "raw", "-c", line, str(path)).stdout for line in lines[:3]]
    assert expected == ["length cannot exceed 2147483136, given 3G\n",
                        "length cannot exceed 2147483136 without -n, given 2147483137\n",
                        "length cannot exceed 2147483136, given 3G\n"]
    assert qmpd.read_stdout() == "".join(expected)
    status = Path(f"/proc/{qmpd.proc.pid}/status").read_text()
    rss_kib = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])
    assert rss_kib < 512 * 1024, rss_kib
