"""Node information as qemu-storage-daemon 7.2 computes it.

Each case builds the same graph in QSD and in qmpd from the same command
line and compares what ``query-named-block-nodes`` reports about it.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient, require_tool

pytestmark = pytest.mark.qemu

Run = Callable[..., dict[str, Any]]


def _qsd_nodes(tmp: Path, args: list[str], commands: list[tuple[str, dict[str, Any]]]
               ) -> dict[str, Any]:
    qsd = require_tool("qemu-storage-daemon")
    sock = tmp / "qsd.sock"
    proc = subprocess.Popen(
        [qsd, "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
         "--monitor", "chardev=c", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "QSD did not start"
            time.sleep(0.02)
        client = RawClient(str(sock))
        try:
            return _observe(client, commands)
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)


def _qmpd_nodes(tmp: Path, args: list[str], commands: list[tuple[str, dict[str, Any]]]
                ) -> dict[str, Any]:
    daemon = QmpdProcess(tmp, *args)
    try:
        client = daemon.client()
        try:
            return _observe(client, commands)
        finally:
            client.close()
    finally:
        daemon.stop()


def _observe(client: RawClient, commands: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    client.negotiate()
    replies = [client.cmd(name, args) for name, args in commands]
    nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
    return {"replies": replies, "nodes": {n["node-name"]: n for n in nodes}}


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    def both(*args: str, commands: list[tuple[str, dict[str, Any]]] | None = None
             ) -> dict[str, Any]:
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
