"""What each side says about a handover: logs, query-migrate, /ready.

A completed migration is logged at INFO on both sides; a source whose nodes
could not be inactivated says why in ``error-desc``, its log and ``/ready``;
a migrated-away source (postmigrate, every node inactive) is not ready.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    Peer,
    create_qcow2,
    start,
)

pytestmark = pytest.mark.qemu

HTTP = ["--http", "127.0.0.1:0", "--log-level", "info"]


def http_ready(peer: Peer) -> tuple[int, dict[str, Any]]:
    """GET /ready on the peer's HTTP listener (from its banner): (status, body)."""
    found = re.search(r"listening: .*HTTP on (http://[^,\s]+)", peer.stderr())
    assert found, peer.stderr()
    try:
        with urllib.request.urlopen(found.group(1) + "/ready", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def handover(mig: Cluster, image: Path, src_extra: list[str], dst_extra: list[str]
             ) -> tuple[Peer, Peer, str]:
    src = mig.spawn("qmpd", "src", extra=src_extra)
    dst = mig.spawn("qmpd", "dst", incoming="defer", extra=dst_extra)
    start(src, dst)
    src.add_disk(image)
    dst.add_disk(image)
    uri = f"unix:{mig.dir / 'mig.sock'}"
    dst.ok("migrate-incoming", {"uri": uri})
    return src, dst, uri


def test_completed_migration_is_logged_on_both_sides(mig: Cluster) -> None:
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    info = ["--log-level", "info"]
    src, dst, uri = handover(mig, image, info, info)
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    src_lines = [line for line in src.stderr().splitlines() if "migration completed" in line]
    dst_lines = [line for line in dst.stderr().splitlines()
                 if "incoming migration completed" in line]
    assert len(src_lines) == 1 and src_lines[0].startswith("qmpd: info: "), src.stderr()
    assert "postmigrate" in src_lines[0]
    assert len(dst_lines) == 1 and dst_lines[0].startswith("qmpd: info: "), dst.stderr()
    assert "run state running" in dst_lines[0]


def test_migrated_away_source_is_not_ready(mig: Cluster) -> None:
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src, dst, uri = handover(mig, image, HTTP, HTTP)
    assert http_ready(src) == (200, {"status": "ready", "run-state": "running"})
    assert http_ready(dst)[0] == 503
    src.ok("migrate", {"uri": uri})
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    assert src.status() == "postmigrate"
    assert http_ready(src) == (503, {"status": "not-ready", "reasons": [
        "migrated away: run state is postmigrate and every block node is inactive"]})
    assert http_ready(dst) == (200, {"status": "ready", "run-state": "running"})


def test_refused_inactivation_is_reported(mig: Cluster) -> None:
    """A writable export without allow-inactive blocks the handover: the reason is
    in error-desc, in the log (not "see above") and in /ready."""
    image = create_qcow2(mig.dir / "disk.qcow2", "64M")
    src, dst, uri = handover(mig, image, HTTP, [])
    nbd = str(mig.dir / "nbd.sock")
    src.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd}}})
    src.ok("block-export-add", {"type": "nbd", "id": "w0", "node-name": "disk",
                                "writable": True})
    src.ok("migrate", {"uri": uri})
    info = src.wait_migration()
    reason = ("Failed to inactivate block nodes: node 'disk' is in use by "
              "writable export 'w0' without allow-inactive")
    assert info == {"status": "failed", "error-desc": reason}
    assert f"migration failed: {reason}" in src.stderr()
    assert "see above" not in src.stderr()
    assert src.status() == "running"
    assert http_ready(src) == (200, {"status": "ready", "run-state": "running",
                                     "migration-failed": reason})
    assert dst.wait(10) == 1  # the destination saw the stream end early
