"""Speed limits of mirror, backup and commit (issue 12): with ``speed`` set, the
offset grows at that rate, within 10 %, once the first buffer is out (QEMU
7.2 holds about 2 %); ``block-job-set-speed`` 0 then lets the job finish.
(block-stream's is in test_chain_jobs.py.)

The rate is measured between the first and the last change of the offset
that query-block-jobs shows within a window, so a copy's size (which sets how
often the offset moves) does not count against the job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.qmp import QmpClient
from tests.support.tools import qemu_img, qemu_io

MiB = 1024 * 1024
SIZE = 64 * MiB
SPEED = 4 * MiB
#: How long the offset is watched: several of the largest copies (4 MiB) at SPEED.
WINDOW = 4.0


def make_images(work: Path) -> list[str]:
    """base <- top, data in both (the top's over all of it), and an empty target."""
    qemu_img("create", "-q", "-f", "qcow2", work / "base.qcow2", str(SIZE))
    qemu_io("-f", "qcow2", "-c", f"write -P 1 0 {SIZE}", work / "base.qcow2", check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             work / "top.qcow2")
    qemu_io("-f", "qcow2", "-c", f"write -P 2 0 {SIZE}", work / "top.qcow2", check=True)
    qemu_img("create", "-q", "-f", "qcow2", work / "target.qcow2", str(SIZE))
    args: list[str] = []
    backing = None
    for name in ("base", "top", "target"):
        spec: dict[str, Any] = {"driver": "qcow2", "node-name": name, "file": {
            "driver": "file", "filename": str(work / f"{name}.qcow2")}}
        spec["backing"] = backing if name == "top" else None
        args += ["--blockdev", json.dumps(spec)]
        backing = name
    return args


JOBS = [
    pytest.param("blockdev-mirror", {"device": "top", "target": "target", "sync": "full"},
                 id="mirror"),
    pytest.param("blockdev-backup", {"device": "top", "target": "target", "sync": "full"},
                 id="backup"),
    pytest.param("block-commit", {"device": "top", "top-node": "top", "base-node": "base"},
                 id="active-commit"),
]


@pytest.mark.parametrize(("command", "args"), JOBS)
def test_speed_limit(tmp_path: Path, command: str, args: dict[str, Any]) -> None:
    daemon = QmpdProcess(tmp_path, *make_images(tmp_path))
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True)
        client.ok(command, {"job-id": "j", "speed": SPEED, **args})
        changes: list[tuple[float, int]] = []
        last = -1
        deadline = time.monotonic() + WINDOW
        while time.monotonic() < deadline:
            offset = client.ok("query-block-jobs")[0]["offset"]
            if offset != last:
                changes.append((time.monotonic(), offset))
                last = offset
            time.sleep(0.01)
        assert len(changes) >= 4, changes
        (t0, o0), (t1, o1) = changes[1], changes[-1]  # after the first buffer
        rate = (o1 - o0) / (t1 - t0)
        assert abs(rate - SPEED) <= 0.1 * SPEED, (rate, changes)
        assert changes[-1][1] < SIZE, changes  # held back all along
        client.ok("block-job-set-speed", {"device": "j", "speed": 0})
        if command != "blockdev-backup":
            client.wait_event("BLOCK_JOB_READY", timeout=60)
            client.ok("block-job-complete", {"device": "j"})
        client.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        client.close()
    finally:
        daemon.stop()
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", tmp_path / "top.qcow2",
             tmp_path / ("base.qcow2" if command == "block-commit" else "target.qcow2"))


def test_running_job_progress_in_metrics(tmp_path: Path) -> None:
    """/metrics while a block job runs: its status and its progress, which moves
    (and matches query-jobs) as the job goes on."""
    import re
    import urllib.request

    daemon = QmpdProcess(tmp_path, *make_images(tmp_path), "--http", "127.0.0.1:0",
                         "--log-level", "info")
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True)

        def scrape() -> tuple[str, float, float]:
            with urllib.request.urlopen(daemon.http_url() + "/metrics", timeout=10) as resp:
                text = resp.read().decode()
            values = [float(m.group(1)) for name in ("current", "total") for m in [re.search(
                rf'^qmpd_job_progress_{name}\{{id="j",type="mirror"\}} (\S+)$', text, re.M)]
                if m is not None]
            assert len(values) == 2, text
            return text, values[0], values[1]

        client.ok("blockdev-mirror", {"job-id": "j", "device": "top", "target": "target",
                                      "sync": "full", "speed": SPEED})
        time.sleep(1.5)
        text, first, total = scrape()
        assert 'qmpd_jobs{status="running",type="mirror"} 1.0' in text
        assert 0 < first < total == SIZE
        time.sleep(1.5)
        _, second, _ = scrape()
        assert first < second < SIZE
        job = client.ok("query-jobs")[0]
        assert second <= job["current-progress"] <= SIZE
        client.ok("block-job-set-speed", {"device": "j", "speed": 0})
        client.wait_event("BLOCK_JOB_READY", timeout=60)
        text, current, total = scrape()
        assert 'qmpd_jobs{status="ready",type="mirror"} 1.0' in text
        assert current == total == SIZE
        client.ok("job-cancel", {"id": "j"})
        client.wait_event("JOB_STATUS_CHANGE", "null", timeout=60)
        with urllib.request.urlopen(daemon.http_url() + "/metrics", timeout=10) as resp:
            assert 'id="j"' not in resp.read().decode()
        client.close()
    finally:
        daemon.stop()
