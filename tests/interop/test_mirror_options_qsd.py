"""blockdev-mirror's ``granularity`` and ``buf-size`` side by side with
qemu-storage-daemon 7.2 (issue 12): the same events, query-block-jobs while
ready and once concluded, and the same target image (``qemu-img compare``,
``qemu-img check``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.interop.test_mirror_backup_qsd import (
    check_image,
    compare,
    copy_images,
    finish,
    make_originals,
    new_target,
    node_args,
    target_options,
)
from tests.support.qsd import Peer, run_both

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("options", [
    pytest.param({"granularity": 4096}, id="granularity-4k"),
    pytest.param({"granularity": 1 << 20}, id="granularity-1m"),
    pytest.param({"buf-size": 256 * 1024}, id="buf-size-256k"),
    pytest.param({"granularity": 8192, "buf-size": 64 * 1024}, id="both"),
])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_mirror_options_as_qsd(tmp_path: Path, fmt: str, options: dict[str, Any]) -> None:
    orig = make_originals(tmp_path, fmt)

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        new_target(work, fmt)
        return node_args(work, fmt)

    def script(peer: Peer) -> dict[str, Any]:
        peer.ok("blockdev-add", target_options(peer.work, fmt))
        peer.ok("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                    "sync": "full", "auto-dismiss": False, **options})
        peer.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
        out: dict[str, Any] = {"ready": peer.ok("query-block-jobs")}
        peer.ok("block-job-complete", {"device": "m"})
        out.update(finish(peer, "m"))
        out["events"] = peer.events()
        peer.ok("blockdev-del", {"node-name": "tgt"})
        return out

    got = run_both(tmp_path, make, script)
    assert got["qmpd"] == got["qsd"]
    for impl in ("qsd", "qmpd"):
        check_image(tmp_path / impl / "tgt.img", fmt)
    compare(tmp_path / "qsd" / "tgt.img", tmp_path / "qmpd" / "tgt.img", fmt)
    compare(tmp_path / "qmpd" / "src.img", tmp_path / "qmpd" / "tgt.img", fmt)
