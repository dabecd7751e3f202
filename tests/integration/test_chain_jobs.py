"""block-stream and block-commit on a running qmpd (issue 12): guest writes through
an NBD export during the job, kill -9 in the middle of one, and the speed limit.

The guest's view is modelled in memory: the chain's content before the job
plus every write qemu-io had acknowledged, in order.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.qmp import QmpClient
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu

MiB = 1024 * 1024
SIZE = 8 * MiB


def make_chain(work: Path) -> None:
    """base <- mid <- top (qcow2), each with data of its own."""
    qemu_img("create", "-q", "-f", "qcow2", work / "base.qcow2", str(SIZE))
    qemu_io("-f", "qcow2", "-c", "write -P 1 0 2M", work / "base.qcow2", check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", work / "mid.qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 2 1M 4M", work / "mid.qcow2", check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", work / "top.qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 3 4M 2M", work / "top.qcow2", check=True)


def guest_view(work: Path, layer: str = "top", alone: bool = False) -> bytes:
    """What reading ``layer`` gives (through its chain, or the layer alone)."""
    out = work / f"{layer}.view"
    if alone:
        qemu_img("convert", "-U", "--image-opts",
                 f"driver=qcow2,backing=,file.driver=file,file.filename={work}/{layer}.qcow2",
                 "-O", "raw", out)
    else:
        qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", work / f"{layer}.qcow2", out)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def daemon_args(work: Path) -> list[str]:
    args: list[str] = []
    backing = None
    for layer in ("base", "mid", "top"):
        args += ["--blockdev", json.dumps({
            "driver": "qcow2", "node-name": layer, "backing": backing,
            "file": {"driver": "file", "filename": str(work / f"{layer}.qcow2")}})]
        backing = layer
    return [*args, "--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
            "--export", "nbd,id=e,node-name=top,name=disk,writable=on"]


class Guest:
    """Writes through the export, one qemu-io run at a time; ``model`` follows them."""

    def __init__(self, work: Path, model: bytes, seed: int, per_round: int = 8) -> None:
        self.per_round = per_round
        self.uri = f"nbd+unix:///disk?socket={work}/nbd.sock"
        self.model = bytearray(model)
        self.rng = random.Random(seed)
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def write_some(self, n: int = 8) -> None:
        cmds: list[str] = []
        for _ in range(n):
            offset = self.rng.randrange(0, SIZE // 4096) * 4096
            length = min(self.rng.choice([4096, 65536, 200704]), SIZE - offset)
            pattern = self.rng.randrange(16, 250)
            cmds += ["-c", f"write -P {pattern} {offset} {length}"]
            self.model[offset:offset + length] = bytes([pattern]) * length
        result = qemu_io("-f", "raw", *cmds, self.uri, check=True)
        assert "error" not in (result.stdout + result.stderr).lower(), result
        self.count += n

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.write_some(self.per_round)
            time.sleep(0.05)

    def __enter__(self) -> Guest:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)


def test_active_commit_under_guest_writes(tmp_path: Path) -> None:
    """Writes before READY, while ready and after the pivot all end up in the base."""
    make_chain(tmp_path)
    before = guest_view(tmp_path)
    daemon = QmpdProcess(tmp_path, *daemon_args(tmp_path))
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True)
        guest = Guest(tmp_path, before, 1, per_round=2)
        with guest:
            client.ok("block-commit", {"job-id": "j", "device": "top", "base-node": "base",
                                       "speed": 8 * MiB})
            time.sleep(0.5)
            running = client.ok("query-block-jobs")[0]
            assert running["status"] == "running" and not running["ready"], running
            client.wait_event("BLOCK_JOB_READY", timeout=60)
            client.ok("block-job-set-speed", {"device": "j", "speed": 0})
            time.sleep(0.5)
        assert guest.count >= 16
        client.ok("job-complete", {"id": "j"})
        completed = client.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        assert "error" not in completed["data"], completed
        assert client.ok("query-block-exports")[0]["node-name"] == "base"
        guest.write_some(16)  # through the export, now of the base
        client.close()
    finally:
        daemon.stop()
    qemu_img("check", tmp_path / "base.qcow2")
    assert guest_view(tmp_path, "base") == bytes(guest.model)


@pytest.mark.parametrize(("command", "args"), [
    pytest.param("block-stream", {"device": "top", "base-node": "base"}, id="stream"),
    pytest.param("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"},
                 id="commit"),
    pytest.param("block-commit", {"device": "top", "base-node": "base"}, id="active-commit"),
])
def test_kill_9_mid_job(tmp_path: Path, command: str, args: dict[str, Any]) -> None:
    """Killed in the middle of a job, with writes acknowledged meanwhile: every
    image passes qemu-img check, and the chain reads what the guest wrote."""
    make_chain(tmp_path)
    daemon = QmpdProcess(tmp_path, *daemon_args(tmp_path))
    # Few writes: the job must still have work left when it is killed.
    guest = Guest(tmp_path, guest_view(tmp_path), 2, per_round=1)
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True)
        client.ok(command, {"job-id": "j", "speed": MiB, **args})
        with guest:
            time.sleep(1.0)
        jobs = client.ok("query-block-jobs")
        assert jobs and 0 < jobs[0]["offset"] < jobs[0]["len"], (jobs, client.events)
        daemon.proc.kill()
        daemon.proc.wait(10)
    finally:
        daemon.stop()
    assert guest.count > 0
    for layer in ("base", "mid", "top"):
        qemu_img("check", tmp_path / f"{layer}.qcow2")
    assert guest_view(tmp_path) == bytes(guest.model)


def test_stream_speed_limit(tmp_path: Path) -> None:
    """With ``speed`` set, the offset grows at that rate (within 10 %) after the
    first buffer; block-job-set-speed 0 lets it finish at once."""
    qemu_img("create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", str(SIZE))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             tmp_path / "mid.qcow2")
    qemu_io("-f", "qcow2", "-c", f"write -P 7 0 {SIZE}", tmp_path / "mid.qcow2", check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2")
    speed = 1 * MiB
    daemon = QmpdProcess(tmp_path, *daemon_args(tmp_path))
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True)
        client.ok("block-stream", {"job-id": "j", "device": "top", "base-node": "base",
                                   "speed": speed})
        changes: list[tuple[float, int]] = []
        last = -1
        deadline = time.monotonic() + 2.6
        while time.monotonic() < deadline:
            offset = client.ok("query-block-jobs")[0]["offset"]
            if offset != last:
                changes.append((time.monotonic(), offset))
                last = offset
            time.sleep(0.01)
        (t0, o0), (t1, o1) = changes[1], changes[-1]  # after the first buffer
        rate = (o1 - o0) / (t1 - t0)
        assert abs(rate - speed) <= 0.1 * speed, (rate, changes)
        client.ok("block-job-set-speed", {"device": "j", "speed": 0})
        client.wait_event("BLOCK_JOB_COMPLETED", timeout=30)
        client.close()
    finally:
        daemon.stop()
    qemu_img("check", tmp_path / "top.qcow2")
    assert guest_view(tmp_path, "top", alone=True) == bytes([7]) * SIZE


@pytest.mark.parametrize("backing", ["base", None], ids=["base-node", "whole-chain"])
def test_stream_under_guest_writes(tmp_path: Path, backing: str | None) -> None:
    """The stream's copies never undo a write to the top made meanwhile: the top
    alone holds what the guest sees (what the chain held, then the writes)."""
    make_chain(tmp_path)
    daemon = QmpdProcess(tmp_path, *daemon_args(tmp_path))
    guest = Guest(tmp_path, guest_view(tmp_path), 3, per_round=4)
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True)
        args: dict[str, Any] = {"job-id": "j", "device": "top", "speed": 4 * MiB}
        if backing is not None:
            args["base-node"] = backing
        with guest:
            client.ok("block-stream", args)
            completed = client.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        assert "error" not in completed["data"], completed
        guest.write_some(8)
        client.close()
    finally:
        daemon.stop()
    assert guest.count > 8
    qemu_img("check", tmp_path / "top.qcow2")
    assert guest_view(tmp_path) == bytes(guest.model)
    if backing is None:
        assert guest_view(tmp_path, "top", alone=True) == bytes(guest.model)


def test_read_only_layers_are_not_reopened(tmp_path: Path) -> None:
    """qmpd does not reopen a read-only node read-write for a job (README,
    difference 27): a commit into one is refused and leaves no job behind."""
    make_chain(tmp_path)
    args = daemon_args(tmp_path)
    spec = json.loads(args[1])
    args[1] = json.dumps({**spec, "read-only": True})
    daemon = QmpdProcess(tmp_path, *args)
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True)
        assert client.err("block-commit", {"job-id": "j", "device": "top", "top-node": "mid"}) \
            == "Block node is read-only"
        assert client.ok("query-block-jobs") == []
        assert [e["data"]["status"] for e in client.events] == ["created", "null"]
        client.close()
    finally:
        daemon.stop()
