"""Jobs go on across stop and cont (issue 12), in qmpd as in QEMU 7.2."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.migration_helpers import Cluster, create_qcow2, short_dir
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu("qemu-system-x86_64")

SIZE = 64 << 20


@pytest.fixture
def work() -> Iterator[Path]:
    with short_dir() as path:
        yield path


@pytest.mark.parametrize("kind", ["qmpd", "qemu"])
def test_a_mirror_runs_on_while_stopped(work: Path, kind: str) -> None:
    src = create_qcow2(work / "src.qcow2", str(SIZE))
    qemu_io("-f", "qcow2", "-c", f"write -P 0x5c 0 {SIZE}", str(src), check=True)
    tgt = create_qcow2(work / "tgt.qcow2", str(SIZE))
    cluster = Cluster(work)
    try:
        peer = cluster(kind, "vm")
        for name, image in (("src", src), ("tgt", tgt)):
            peer.ok("blockdev-add", {"driver": "qcow2", "node-name": name,
                                     "file": {"driver": "file", "filename": str(image)}})
        peer.ok("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                    "sync": "full", "speed": 16 << 20})
        # QEMU copies its first buffer (16 MiB) at once, then at the speed.
        peer.ok("stop")
        assert peer.status() == "paused"
        first = peer.ok("query-block-jobs")[0]["offset"]
        deadline = time.monotonic() + 10
        while peer.ok("query-block-jobs")[0]["offset"] == first:
            assert time.monotonic() < deadline, "the job stands still while the VM is stopped"
            time.sleep(0.05)
        assert peer.ok("query-jobs")[0]["status"] == "running"
        peer.qmp.wait_event("BLOCK_JOB_READY", timeout=20)
        peer.ok("cont")
        peer.ok("block-job-complete", {"device": "m"})
        done = peer.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=20)
        assert "error" not in done["data"]
        assert peer.quit() == 0
    finally:
        cluster.close()
    res = qemu_img("compare", "-f", "qcow2", "-F", "qcow2", str(src), str(tgt), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
