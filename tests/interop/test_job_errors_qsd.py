"""I/O errors in block-stream and block-commit, side by side with
qemu-storage-daemon 7.2 (issue 12): ``on-error``.

The image a job writes to (stream: the top; commit: the base) lives on a
small tmpfs, so the job's writes hit ENOSPC part way through.  Each daemon
gets its own tmpfs of the same size and its own copy of the same chain.
Compared as transcripts (replies and events in arrival order, timestamps
dropped): BLOCK_JOB_ERROR's operation and action, the pause a ``stop``
(or ``enospc``/``auto`` on ENOSPC) makes, query-block-jobs' ``io-status``
while paused, the resume once the tmpfs has grown, and how the job ends;
then the images with ``qemu-img compare`` and ``qemu-img check``.

Mounting a tmpfs needs root: those tests skip without it (as
tests/integration/test_enospc.py does).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.test_chain_jobs_qsd import chain_nodes
from tests.support.qsd import IMPLS, Peer, assert_same, peer
from tests.support.tools import QSD, qemu_img, qemu_io, require_tool

pytestmark = pytest.mark.qemu

MiB = 1024 * 1024
SIZE = 4 * MiB
#: The tmpfs: room for a qcow2 top's metadata and a little data, not for 4 MiB;
#: under a raw base, room for none of the writes (each at least 64 KiB, all of
#: an active commit's under way at once: every one fails, in QEMU too).
FS_SIZE = {"top": 1 * MiB, "base": 16 * 1024, "none": 16 * 1024}


class Mounts:
    """tmpfs mounts made for one test, unmounted after it."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, where: Path, size: int) -> Path:
        where.mkdir()
        result = subprocess.run([require_tool("mount"), "-t", "tmpfs", "-o", f"size={size}",
                                 "tmpfs", str(where)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        self.points.append(where)
        return where

    @staticmethod
    def grow(where: Path, size: int) -> None:
        subprocess.run([require_tool("mount"), "-o", f"remount,size={size}", str(where)],
                       check=True, capture_output=True)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    require_tool(QSD)
    if os.geteuid() != 0:  # as tests/integration/test_enospc.py
        pytest.skip("mounting a tmpfs needs root")
    m = Mounts()
    try:
        yield m
    finally:
        for where in reversed(m.points):
            subprocess.run([require_tool("umount"), "-l", str(where)], capture_output=True)


def make_chain(work: Path, full: str) -> list[str]:
    """base <- mid <- top, the layer ``full`` (stream: top; commit: base) on the
    tmpfs ``work``/fs; each layer with data of its own.  The daemon's arguments."""
    fs = work / "fs"

    def path(layer: str, fmt: str = "qcow2") -> Path:
        return (fs if layer == full else work) / f"{layer}.{fmt}"

    base_fmt = "raw" if full == "base" else "qcow2"
    base = path("base", base_fmt)
    qemu_img("create", "-q", "-f", base_fmt, base, str(SIZE))
    if full != "base":
        qemu_io("-f", base_fmt, "-c", "write -P 1 0 2M", base, check=True)
    mid = path("mid")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_fmt, mid)
    qemu_io("-f", "qcow2", "-c", "write -P 2 1M 3M", mid, check=True)
    top = path("top")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(mid), "-F", "qcow2", top)
    qemu_io("-f", "qcow2", "-c", "write -P 3 3584k 64k", top, check=True)
    args: list[str] = []
    backing = None
    for layer, image, fmt in (("base", base, base_fmt), ("mid", mid, "qcow2"),
                              ("top", top, "qcow2")):
        spec: dict[str, Any] = {"driver": fmt, "node-name": layer,
                                "file": {"driver": "file", "filename": str(image)}}
        if fmt == "qcow2":
            spec["backing"] = backing
        args += ["--blockdev", json.dumps(spec)]
        backing = layer
    return args


Scenario = Callable[[Peer], None]
STARTS = {("reply", "block-stream"), ("reply", "block-commit")}


def run(tmp_path: Path, mounts: Mounts, full: str, scenario: Scenario,
        starts: frozenset[tuple[str, str]] = frozenset()) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        mounts.tmpfs(work / "fs", FS_SIZE[full])
        with peer(impl, work, *make_chain(work, full)) as p:
            scenario(p)
            for name in ("top", "mid", "base"):
                p.cmd("blockdev-del", {"node-name": name})
            # The job may fail before QSD sends the reply to the command that
            # started it: the reply is checked, its place is not.
            said = [e for e in p.transcript() if e[:2] != ("reply", "query-block-jobs")]
            started = [e for e in said if e[:2] in STARTS | starts]
            assert [e[2] for e in started] == [{"return": {}}], started
            out[impl] = [e for e in said if e[:2] not in STARTS | starts]
    return out


def start(command: str, on_error: str, **args: Any) -> dict[str, Any]:
    return {"job-id": "j", "device": "top", "on-error": on_error, "auto-dismiss": False,
            **args}


def stopping(command: str, on_error: str, ready: bool = False, **args: Any) -> Scenario:
    """The job stops on ENOSPC; the tmpfs grows; the job resumes and completes."""
    def scenario(p: Peer) -> None:
        p.cmd(command, start(command, on_error, **args))
        p.wait("BLOCK_JOB_ERROR")
        p.wait("JOB_STATUS_CHANGE", "paused")
        p.cmd("query-block-jobs")
        Mounts.grow(p.work / "fs", 64 * MiB)
        p.cmd("block-job-resume", {"device": "j"})
        if ready:  # active commit
            p.wait("BLOCK_JOB_READY", timeout=60)
            p.cmd("block-job-complete", {"device": "j"})
        p.job("j", "concluded")
        p.cmd("query-block-jobs")
        p.cmd("job-dismiss", {"id": "j"})
    return scenario


def failing(command: str, on_error: str, **args: Any) -> Scenario:
    def scenario(p: Peer) -> None:
        p.cmd(command, start(command, on_error, **args))
        p.job("j", "concluded")
        p.cmd("query-block-jobs")
        p.cmd("job-dismiss", {"id": "j"})
    return scenario


def errors(transcript: list[Any]) -> list[Any]:
    return [e[2] for e in transcript if e[:2] == ("event", "BLOCK_JOB_ERROR")]


def compare_images(tmp_path: Path, full: str) -> None:
    """The layer the job wrote, qmpd's against QSD's; qemu-img check of qmpd's."""
    ours, theirs = (tmp_path / impl / "fs" for impl in ("qmpd", "qsd"))
    fmt = "raw" if full == "base" else "qcow2"
    name = f"{full}.{fmt}"
    if fmt == "qcow2":
        qemu_img("check", ours / name)
    qemu_img("compare", "-f", fmt, "-F", fmt, ours / name, theirs / name)


STREAM = {"base-node": "base"}
COMMIT = {"top-node": "mid", "base-node": "base"}
ACTIVE = {"base-node": "base"}


@pytest.mark.parametrize("on_error", ["stop", "enospc", "auto"])
def test_stream_stops_on_enospc_as_qsd(tmp_path: Path, mounts: Mounts, on_error: str) -> None:
    out = run(tmp_path, mounts, "top", stopping("block-stream", on_error, **STREAM))
    assert out["qmpd"] == out["qsd"]
    # stream reports every error as a read (copy-on-read)
    assert errors(out["qsd"]) == [{"device": "j", "operation": "read", "action": "stop"}]
    compare_images(tmp_path, "top")


@pytest.mark.parametrize("on_error", ["report", "ignore"])
def test_stream_fails_on_enospc_as_qsd(tmp_path: Path, mounts: Mounts, on_error: str) -> None:
    out = run(tmp_path, mounts, "top", failing("block-stream", on_error, **STREAM))
    assert out["qmpd"] == out["qsd"]
    seen = errors(out["qsd"])
    assert seen and all(e["action"] == on_error for e in seen)
    # an ignored error goes on to the end, then fails the job all the same
    assert len(seen) > 1 if on_error == "ignore" else len(seen) == 1
    compare_images(tmp_path, "top")


@pytest.mark.parametrize("on_error", ["stop", "enospc"])
@pytest.mark.parametrize("kind", ["intermediate", "active"])
def test_commit_stops_on_enospc_as_qsd(tmp_path: Path, mounts: Mounts, on_error: str,
                                       kind: str) -> None:
    args = COMMIT if kind == "intermediate" else ACTIVE
    out = run(tmp_path, mounts, "base", stopping("block-commit", on_error,
                                                 ready=kind == "active", **args))
    assert out["qmpd"] == out["qsd"]
    assert errors(out["qsd"])[0] == {"device": "j", "operation": "write", "action": "stop"}
    compare_images(tmp_path, "base")


@pytest.mark.parametrize("kind", ["intermediate", "active"])
def test_commit_fails_on_enospc_as_qsd(tmp_path: Path, mounts: Mounts, kind: str) -> None:
    """``report`` (``ignore`` would retry the same range for ever, in QEMU too)."""
    args = COMMIT if kind == "intermediate" else ACTIVE
    out = run(tmp_path, mounts, "base", failing("block-commit", "report", **args))
    assert out["qmpd"] == out["qsd"]
    assert errors(out["qsd"])[0] == {"device": "j", "operation": "write", "action": "report"}


def collapsed(transcript: list[Any]) -> list[Any]:
    """Runs of the same BLOCK_JOB_ERROR as one: how many of a mirror's copies are
    under way when the file system fills up is QEMU's and qmpd's own business."""
    out: list[Any] = []
    for entry in transcript:
        if entry[:2] == ("event", "BLOCK_JOB_ERROR") and out and out[-1] == entry:
            continue
        out.append(entry)
    return out


@pytest.mark.parametrize("on_error", ["stop", "report"])
@pytest.mark.parametrize("command", ["blockdev-mirror", "blockdev-backup"])
def test_target_enospc_as_qsd(tmp_path: Path, mounts: Mounts, command: str,
                              on_error: str) -> None:
    """A mirror or a backup onto a raw target on a full tmpfs (on-target-error):
    with ``stop`` the job pauses, resumes once there is room, and the target
    ends up equal to the source; with ``report`` it fails with ENOSPC's text.
    Errors of copies under way all come before ``paused`` (the pause waits
    for them, as QEMU's mirror_pause and backup_pause)."""
    def scenario(p: Peer) -> None:
        target = p.work / "fs" / "target.raw"
        qemu_img("create", "-q", "-f", "raw", target, str(SIZE))
        p.ok("blockdev-add", {"driver": "raw", "node-name": "target", "file": {
            "driver": "file", "filename": str(target)}})
        p.cmd(command, {"job-id": "j", "device": "top", "target": "target",
                        "sync": "full", "on-target-error": on_error,
                        "auto-dismiss": False})
        if on_error == "stop":
            p.wait("BLOCK_JOB_ERROR")  # a backup pauses once as it starts, too
            p.wait("JOB_STATUS_CHANGE", "paused")
            p.cmd("query-block-jobs")
            Mounts.grow(p.work / "fs", 64 * MiB)
            p.cmd("block-job-resume", {"device": "j"})
            if command == "blockdev-mirror":
                p.wait("BLOCK_JOB_READY", timeout=60)
                p.cmd("block-job-cancel", {"device": "j"})  # a final sync, no pivot
        p.job("j", "concluded")
        p.cmd("query-block-jobs")
        p.cmd("job-dismiss", {"id": "j"})
        p.cmd("blockdev-del", {"node-name": "target"})

    out = run(tmp_path, mounts, "none", scenario, frozenset({("reply", command)}))
    assert collapsed(out["qmpd"]) == collapsed(out["qsd"])
    assert errors(out["qsd"])[0] == {"device": "j", "operation": "write", "action": on_error}
    if on_error == "stop":
        for impl in ("qmpd", "qsd"):
            qemu_img("compare", "-f", "qcow2", "-F", "raw", tmp_path / impl / "top.qcow2",
                     tmp_path / impl / "fs" / "target.raw")


def sleeping(p: Peer) -> None:
    """Until the job waits out its speed limit (polls left out of the transcript)."""
    deadline = time.monotonic() + 30
    seen = None
    while True:
        job = p.qmp.ok("query-block-jobs")[0]
        if not job["busy"] and job["offset"] == seen and seen > 0:
            return
        seen = job["offset"]
        assert time.monotonic() < deadline, job
        time.sleep(0.2)


def test_pause_and_resume_of_a_sleeping_job_as_qsd(tmp_path: Path) -> None:
    """job-pause of a job that waits out its speed limit: QEMU enters it at once,
    so ``paused`` comes before the reply; job-resume: ``running`` before it."""
    def talk(p: Peer) -> None:
        p.cmd("block-stream", {"job-id": "j", "device": "top", "base-node": "base",
                               "speed": 1})
        sleeping(p)  # its chunk copied, it waits (in QEMU too, else no event yet)
        p.cmd("job-pause", {"id": "j"})
        p.cmd("query-jobs")
        p.cmd("block-job-resume", {"device": "j"})
        sleeping(p)
        p.cmd("block-job-pause", {"device": "j"})
        p.cmd("job-resume", {"id": "j"})
        # Each pause ended the rate-limit wait: the job went on until its next
        # copy; after the second there is none left, and it finishes (at 1 B/s).
        p.job("j", "null")

    require_tool(QSD)
    out: dict[str, list[Any]] = {}
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        with peer(impl, work, *chain_nodes()(work)) as p:
            talk(p)
            said = [e for e in p.transcript() if e[:2] != ("reply", "query-block-jobs")]
            # The conversation up to the last reply, then the events.
            cut = said.index(("reply", "job-resume", {"return": {}})) + 1
            out[impl] = said[:cut]
            out[f"{impl}-after"] = [e for e in said[cut:] if e[0] == "event"]
    assert_same(out, raw=False)
    assert out["qmpd-after"] == out["qsd-after"]
