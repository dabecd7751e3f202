"""What block-stream, an intermediate block-commit and blockdev-backup copy,
side by side with qemu-storage-daemon 7.2 (issue 12), on a chain whose
layers hold many small runs of differing data, zeroes and holes: the jobs
copy through reused buffers, so a chunk that kept bytes of the one before
would show.  The results are compared with ``qemu-img compare`` (through the
chain and each layer alone) and checked with ``qemu-img check``; the
transcripts must be the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.interop.test_chain_jobs_qsd import events, layer_alone
from tests.support.qmp import QmpClient
from tests.support.qsd import side_by_side_run
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu

KiB = 1024
MiB = 1024 * KiB
SIZE = 12 * MiB


def writes(seed: int) -> list[str]:
    """qemu-io commands: runs of 192 KiB at a stride of 448 KiB, every third one
    zeroes, the others each with a pattern of their own (a run straddles the
    jobs' 512 KiB and 1 MiB chunks in many ways)."""
    ops: list[str] = []
    for i, offset in enumerate(range(seed * 64 * KiB, SIZE - 192 * KiB, 448 * KiB)):
        if i % 3 == 2:
            ops += ["-c", f"write -z {offset} 192k"]
        else:
            ops += ["-c", f"write -P {(seed * 50 + i) % 250 + 1} {offset} 192k"]
    return ops


def nodes(work: Path) -> list[str]:
    qemu_img("create", "-q", "-f", "qcow2", work / "base.qcow2", str(SIZE))
    qemu_io("-f", "qcow2", *writes(0), work / "base.qcow2", check=True)
    backing = "base"
    for layer, seed in (("mid", 1), ("top", 3)):
        qemu_img("create", "-q", "-f", "qcow2", "-b", f"{backing}.qcow2", "-F", "qcow2",
                 work / f"{layer}.qcow2")
        qemu_io("-f", "qcow2", *writes(seed), work / f"{layer}.qcow2", check=True)
        backing = layer
    qemu_img("create", "-q", "-f", "qcow2", work / "target.qcow2", str(SIZE))
    args: list[str] = []
    backing_node = None
    for layer in ("base", "mid", "top", "target"):
        spec: dict[str, Any] = {"driver": "qcow2", "node-name": layer, "file": {
            "driver": "file", "filename": str(work / f"{layer}.qcow2")}}
        if layer != "target":
            spec["backing"] = backing_node
            backing_node = layer
        else:
            spec["backing"] = None
        args += ["--blockdev", json.dumps(spec)]
    return args


def job(command: str, args: dict[str, Any]) -> Any:
    def scenario(client: QmpClient, work: Path) -> dict[str, Any]:
        out = {"start": client.cmd(command, {"job-id": "j", "auto-dismiss": False, **args})}
        client.wait_event("JOB_STATUS_CHANGE", "concluded", timeout=120)
        out["concluded"] = client.cmd("query-block-jobs")
        out["dismiss"] = client.cmd("job-dismiss", {"id": "j"})
        out["events"] = events(client)
        for name in ("target", "top", "mid", "base"):
            assert "return" in client.cmd("blockdev-del", {"node-name": name}), name
        return out
    return scenario


@pytest.mark.parametrize(("command", "args", "layers"), [
    pytest.param("block-stream", {"device": "top", "base-node": "base"}, ("top",),
                 id="stream"),
    pytest.param("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"},
                 ("base", "top"), id="intermediate-commit"),
    pytest.param("blockdev-backup", {"device": "top", "target": "target", "sync": "full"},
                 ("target",), id="backup-full"),
    pytest.param("blockdev-backup", {"device": "top", "target": "target", "sync": "top"},
                 ("target",), id="backup-top"),
])
def test_copies_as_qsd(tmp_path: Path, command: str, args: dict[str, Any],
                       layers: tuple[str, ...]) -> None:
    out = side_by_side_run(tmp_path, nodes, job(command, args))
    assert out["qmpd"] == out["qsd"]
    assert "error" not in out["qsd"]["concluded"]["return"][0]
    for layer in layers:
        ours, theirs = (tmp_path / impl / f"{layer}.qcow2" for impl in ("qmpd", "qsd"))
        qemu_img("check", ours)
        qemu_img("compare", "-f", "qcow2", "-F", "qcow2", ours, theirs)
        assert layer_alone(ours, "qcow2") == layer_alone(theirs, "qcow2"), layer
