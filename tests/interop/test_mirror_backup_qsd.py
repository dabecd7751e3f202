"""blockdev-mirror and blockdev-backup side by side with qemu-storage-daemon 7.2.

Each job runs in both daemons on copies of the same images; the targets must
be equal (``qemu-img compare``) and sound (``qemu-img check``), and the event
sequences (timestamps stripped), the ``query-block-jobs`` replies and every
refusal must be QEMU's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support.qsd import Peer, run_both, side_by_side
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu

SIZE = 8 << 20
MiB = 1 << 20


def _write(image: Path, fmt: str, ops: list[str]) -> None:
    args: list[str | Path] = ["-f", fmt]
    for op in ops:
        args += ["-c", op]
    qemu_io(*args, image, check=True)


def make_originals(root: Path, fmt: str) -> Path:
    """The source images (and an empty target of each format), made once."""
    orig = root / "orig"
    orig.mkdir()
    if fmt == "raw":
        qemu_img("create", "-q", "-f", "raw", orig / "src.img", str(SIZE))
        _write(orig / "src.img", "raw", ["write -P 0x11 0 1M", "write -P 0x22 3M 64k",
                                         "write -P 0x33 5M 300k", "write -z 6M 1M"])
    else:
        qemu_img("create", "-q", "-f", "qcow2", orig / "base.qcow2", str(SIZE))
        _write(orig / "base.qcow2", "qcow2", ["write -P 0x11 0 2M", "write -P 0x44 6M 1M"])
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
                 orig / "src.img")
        _write(orig / "src.img", "qcow2", ["write -P 0x22 1M 512k", "write -P 0x33 4M 100k",
                                           "write -z 6M 64k"])
    return orig


def copy_images(orig: Path, work: Path) -> None:
    for item in orig.iterdir():
        shutil.copy(item, work / item.name)


def new_target(work: Path, fmt: str, name: str = "tgt.img", backing: bool = False) -> Path:
    path = work / name
    if fmt == "raw":
        qemu_img("create", "-q", "-f", "raw", path, str(SIZE))
    elif backing:
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", path)
    else:
        qemu_img("create", "-q", "-f", "qcow2", path, str(SIZE))
    return path


def node_args(work: Path, fmt: str, export: bool = False) -> list[str]:
    args = ["--blockdev", f"driver={fmt},node-name=src,file.driver=file,"
                          f"file.filename={work}/src.img"]
    if export:
        args += ["--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
                 "--export", "nbd,id=e,node-name=src,name=src,writable=on"]
    return args


def target_options(work: Path, fmt: str, name: str = "tgt", file: str = "tgt.img"
                   ) -> dict[str, Any]:
    opts: dict[str, Any] = {"driver": fmt, "node-name": name,
                            "file": {"driver": "file", "filename": str(work / file)}}
    if fmt == "qcow2":
        opts["backing"] = None
    return opts


def check_image(path: Path, fmt: str) -> None:
    if fmt == "qcow2":
        qemu_img("check", "-q", path)


def compare(a: Path, b: Path, fmt: str) -> None:
    qemu_img("compare", "-f", fmt, "-F", fmt, a, b)


def finish(peer: Peer, job: str) -> dict[str, Any]:
    """Wait for the job to conclude; its query-block-jobs entry, then dismiss it."""
    peer.qmp.wait_event("JOB_STATUS_CHANGE", "concluded", timeout=60)
    done = peer.ok("query-block-jobs")
    peer.ok("job-dismiss", {"id": job})
    peer.qmp.wait_event("JOB_STATUS_CHANGE", "null")
    return {"done": done}


# --- mirror ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("sync", ["full", "top", "none"])
@pytest.mark.parametrize("end", ["complete", "cancel"])
def test_mirror_as_qsd(tmp_path: Path, fmt: str, sync: str, end: str) -> None:
    orig = make_originals(tmp_path, fmt)

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        new_target(work, fmt, backing=sync != "full")
        return node_args(work, fmt)

    def script(peer: Peer) -> dict[str, Any]:
        peer.ok("blockdev-add", target_options(peer.work, fmt))
        peer.ok("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                    "sync": sync, "auto-dismiss": False})
        peer.qmp.wait_event("BLOCK_JOB_READY", timeout=60)
        out: dict[str, Any] = {"ready": peer.ok("query-block-jobs"),
                               "jobs": peer.ok("query-jobs")}
        out["del-target"] = peer.cmd("blockdev-del", {"node-name": "tgt"})
        out["del-source"] = peer.cmd("blockdev-del", {"node-name": "src"})
        out["again"] = peer.cmd("blockdev-mirror", {"job-id": "m2", "device": "src",
                                                    "target": "tgt", "sync": sync})
        if end == "complete":
            peer.ok("block-job-complete", {"device": "m"})
        else:
            peer.ok("block-job-cancel", {"device": "m"})
        out.update(finish(peer, "m"))
        out["events"] = peer.events()
        peer.ok("blockdev-del", {"node-name": "tgt"})
        return out

    got = run_both(tmp_path, make, script)
    assert got["qmpd"] == got["qsd"]
    names = [ev["event"] for ev in got["qsd"]["events"]]
    assert "BLOCK_JOB_COMPLETED" in names and "BLOCK_JOB_CANCELLED" not in names
    for impl in ("qsd", "qmpd"):
        check_image(tmp_path / impl / "tgt.img", fmt)
    compare(tmp_path / "qsd" / "tgt.img", tmp_path / "qmpd" / "tgt.img", fmt)
    if sync != "none":
        compare(tmp_path / "qmpd" / "src.img", tmp_path / "qmpd" / "tgt.img", fmt)


def test_mirror_refusals_as_qsd(tmp_path: Path) -> None:
    orig = make_originals(tmp_path, "qcow2")

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        new_target(work, "qcow2")
        qemu_img("create", "-q", "-f", "qcow2", work / "big.img", str(2 * SIZE))
        return [*node_args(work, "qcow2"),
                "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,"
                              f"file.filename={work}/tgt.img",
                "--blockdev", f"driver=qcow2,node-name=big,file.driver=file,"
                              f"file.filename={work}/big.img,file.node-name=bigfile"]

    base = {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
    cases: list[dict[str, Any]] = [
        {"device": "nope"}, {"target": "nope"}, {"target": "src"},
        {"device": "bigfile", "target": "big"},
        {"granularity": 100}, {"granularity": 3000}, {"granularity": 128 << 20},
        {"buf-size": -1}, {"sync": "incremental"}, {"sync": "bitmap"},
        {"job-id": "bad id"}, {"speed": -1}, {"replaces": "nope"},
    ]
    steps: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-mirror", {**base, **case}) for case in cases]
    steps.append(("blockdev-mirror", {k: v for k, v in base.items() if k != "job-id"}))
    steps.append(("query-block-jobs", {}))
    steps.append(("block-job-complete", {"device": "j"}))
    steps.append(("block-job-cancel", {"device": "nope"}))
    replies = side_by_side(tmp_path, make, steps)
    assert replies["qmpd"] == replies["qsd"]
    assert all("error" in r for r in replies["qsd"][:len(cases) + 1])


def test_mirror_size_mismatch_fails_in_the_job(tmp_path: Path) -> None:
    orig = make_originals(tmp_path, "qcow2")

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        qemu_img("create", "-q", "-f", "qcow2", work / "big.img", str(2 * SIZE))
        return [*node_args(work, "qcow2"),
                "--blockdev", f"driver=qcow2,node-name=big,file.driver=file,"
                              f"file.filename={work}/big.img"]

    def script(peer: Peer) -> list[dict[str, Any]]:
        peer.ok("blockdev-mirror", {"job-id": "j", "device": "src", "target": "big",
                                    "sync": "full"})
        peer.qmp.wait_event("JOB_STATUS_CHANGE", "null")
        peer.cmd("blockdev-mirror", {"job-id": "k", "device": "src", "target": "big",
                                     "sync": "full", "speed": -1})
        return peer.events()

    got = run_both(tmp_path, make, script)
    assert got["qmpd"] == got["qsd"]


# --- backup ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("sync", ["full", "top", "none"])
def test_backup_as_qsd(tmp_path: Path, fmt: str, sync: str) -> None:
    orig = make_originals(tmp_path, fmt)

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        new_target(work, fmt, backing=sync == "top")
        return node_args(work, fmt)

    def script(peer: Peer) -> dict[str, Any]:
        peer.ok("blockdev-add", target_options(peer.work, fmt))
        # Held back by its speed until the deletes were tried: a small image
        # copies faster than the next command arrives otherwise.
        peer.ok("blockdev-backup", {"job-id": "b", "device": "src", "target": "tgt",
                                    "sync": sync, "auto-dismiss": False, "speed": 1})
        out: dict[str, Any] = {"del-target": peer.cmd("blockdev-del", {"node-name": "tgt"}),
                               "del-source": peer.cmd("blockdev-del", {"node-name": "src"})}
        peer.ok("block-job-set-speed", {"device": "b", "speed": 0})
        if sync == "none":  # still running: its filter makes the source no root
            out["mirror"] = peer.cmd("blockdev-mirror", {"job-id": "m", "device": "src",
                                                         "target": "tgt", "sync": "full"})
            peer.ok("block-job-cancel", {"device": "b"})
        out.update(finish(peer, "b"))
        out["events"] = peer.events()
        peer.ok("blockdev-del", {"node-name": "tgt"})
        return out

    got = run_both(tmp_path, make, script)
    assert got["qmpd"] == got["qsd"]
    for impl in ("qsd", "qmpd"):
        check_image(tmp_path / impl / "tgt.img", fmt)
    compare(tmp_path / "qsd" / "tgt.img", tmp_path / "qmpd" / "tgt.img", fmt)
    if sync != "none":
        compare(tmp_path / "qmpd" / "src.img", tmp_path / "qmpd" / "tgt.img", fmt)


def test_backup_refusals_as_qsd(tmp_path: Path) -> None:
    orig = make_originals(tmp_path, "qcow2")

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        new_target(work, "qcow2")
        return [*node_args(work, "qcow2"),
                "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,"
                              f"file.filename={work}/tgt.img"]

    base = {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}
    cases: list[dict[str, Any]] = [
        {"sync": "incremental"}, {"sync": "bitmap"},
        {"sync": "incremental", "bitmap": "b0", "bitmap-mode": "always"},
        {"sync": "bitmap", "bitmap": "nope"}, {"sync": "bitmap", "bitmap": "b0"},
        {"sync": "none", "bitmap": "b0", "bitmap-mode": "always"},
        {"sync": "full", "bitmap": "b0", "bitmap-mode": "never"},
        {"bitmap-mode": "always"}, {"target": "src"}, {"device": "nope"},
        {"target": "nope"}, {"job-id": "bad id"},
    ]
    steps: list[tuple[str, dict[str, Any]]] = [
        ("block-dirty-bitmap-add", {"node": "src", "name": "b0"})]
    steps += [("blockdev-backup", {**base, **case}) for case in cases]
    steps.append(("query-block-jobs", {}))
    replies = side_by_side(tmp_path, make, steps)
    assert replies["qmpd"] == replies["qsd"]
    assert all("error" in r for r in replies["qsd"][1:-1])


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("mode", ["incremental", "always", "never"])
def test_bitmap_backup_as_qsd(tmp_path: Path, fmt: str, mode: str) -> None:
    """Only the clusters the bitmap marks are copied; the bitmap's fate follows
    bitmap-mode."""
    orig = make_originals(tmp_path, fmt)

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        new_target(work, "qcow2")
        return node_args(work, fmt, export=True)

    def script(peer: Peer) -> dict[str, Any]:
        peer.ok("block-dirty-bitmap-add", {"node": "src", "name": "b0",
                                           "granularity": 65536})
        qemu_io("-f", "raw", "-c", "write -P 0x55 100k 200k", "-c", "write -P 0x66 5M 64k",
                "-c", "write -z 7M 128k", f"nbd+unix:///src?socket={peer.work}/nbd.sock",
                check=True)
        peer.ok("blockdev-add", target_options(peer.work, "qcow2"))
        args: dict[str, Any] = {"job-id": "b", "device": "src", "target": "tgt",
                                "auto-dismiss": False, "bitmap": "b0"}
        if mode == "incremental":
            args["sync"] = "incremental"
        else:
            args.update({"sync": "bitmap", "bitmap-mode": mode})
        peer.ok("blockdev-backup", args)
        out = finish(peer, "b")
        out["events"] = peer.events()
        out["sha"] = peer.ok("x-debug-block-dirty-bitmap-sha256", {"node": "src", "name": "b0"})
        nodes = peer.ok("query-named-block-nodes", {"flat": True})
        out["bitmaps"] = [n.get("dirty-bitmaps") for n in nodes if n["node-name"] == "src"]
        peer.ok("blockdev-del", {"node-name": "tgt"})
        return out

    got = run_both(tmp_path, make, script)
    assert got["qmpd"] == got["qsd"]
    count = got["qsd"]["bitmaps"][0][0]["count"]
    assert (count == 0) == (mode != "never")
    maps = {}
    for impl in ("qsd", "qmpd"):
        target = tmp_path / impl / "tgt.img"
        check_image(target, "qcow2")
        maps[impl] = [(e["start"], e["length"], e["data"]) for e in json.loads(
            qemu_img("map", "--output=json", target).stdout)]
    assert maps["qmpd"] == maps["qsd"]
    # Only the clusters written since the bitmap was added hold data: 64k-320k
    # and 5M-5M+64k (7M's zeroes are zero clusters).
    data = [(start, length) for start, length, is_data in maps["qmpd"] if is_data]
    assert data == [(65536, 256 * 1024), (5 * MiB, 65536)]
    compare(tmp_path / "qsd" / "tgt.img", tmp_path / "qmpd" / "tgt.img", "qcow2")


def same_status_runs_sorted(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events with each run of same-status JOB_STATUS_CHANGEs of different jobs
    sorted by job: which of two concurrent copies ends first is a race, in
    QEMU as in qmpd."""
    out: list[dict[str, Any]] = []
    for ev in events:
        run_start = len(out)
        while (run_start > 0 and ev["event"] == "JOB_STATUS_CHANGE"
               and out[run_start - 1]["event"] == "JOB_STATUS_CHANGE"
               and out[run_start - 1]["data"]["status"] == ev["data"]["status"]):
            run_start -= 1
        out.append(ev)
        out[run_start:] = sorted(out[run_start:], key=lambda e: e["data"].get("id", ""))
    return out


def test_transaction_backups_as_qsd(tmp_path: Path) -> None:
    """transaction's blockdev-backup: individual with a bitmap action, grouped
    jobs that finish together, and a grouped transaction that fails."""
    orig = make_originals(tmp_path, "qcow2")

    def make(work: Path) -> list[str]:
        copy_images(orig, work)
        for name in ("t1.img", "t2.img", "t3.img"):
            new_target(work, "qcow2", name)
        args = node_args(work, "qcow2")
        for i in (1, 2, 3):
            args += ["--blockdev", f"driver=qcow2,node-name=t{i},file.driver=file,"
                                   f"file.filename={work}/t{i}.img"]
        return args

    def backup(job: str, target: str) -> dict[str, Any]:
        return {"type": "blockdev-backup",
                "data": {"job-id": job, "device": "src", "target": target, "sync": "full"}}

    def script(peer: Peer) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["individual"] = peer.cmd("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b1"}},
            backup("j1", "t1")]})
        assert out["individual"] == {"return": {}}, (peer.name, out)
        peer.qmp.wait_event("JOB_STATUS_CHANGE", "null")
        grouped = {"completion-mode": "grouped"}
        out["refused"] = peer.cmd("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b2"}},
            backup("j2", "t2")], "properties": grouped})
        out["failing"] = peer.cmd("transaction", {"actions": [
            backup("j2", "t2"), backup("j3", "nope")], "properties": grouped})
        since = len(peer.qmp.events)
        out["grouped"] = peer.cmd("transaction", {"actions": [
            backup("j2", "t2"), backup("j3", "t3")], "properties": grouped})
        peer.qmp.wait_event("JOB_STATUS_CHANGE", "null", since=since)
        peer.qmp.pump(0.5)
        out["events"] = same_status_runs_sorted(peer.events())
        out["jobs"] = peer.ok("query-jobs")
        return out

    got = run_both(tmp_path, make, script)
    assert got["qmpd"] == got["qsd"]
    assert "error" in got["qsd"]["refused"] and "error" in got["qsd"]["failing"]
    for impl in ("qsd", "qmpd"):
        for i in (1, 2, 3):
            target = tmp_path / impl / f"t{i}.img"
            check_image(target, "qcow2")
            compare(tmp_path / impl / "src.img", target, "qcow2")
