"""blockdev-create and the job state machine against qemu-storage-daemon 7.2 (issue 12).

Each test holds the same QMP conversation with QSD and with qmpd and
compares the transcripts: every reply, error text and event, in arrival
order (timestamps aside).  The images both create are then compared with
``qemu-img check`` and ``qemu-img info`` (and byte for byte where QEMU's
layout is deterministic).
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.qsd import Peer, assert_same, transcripts
from tests.support.tools import qemu_img

pytestmark = pytest.mark.qemu

MiB = 1 << 20
GiB = 1 << 30


def create(p: Peer, job_id: str, options: dict[str, Any], dismiss: bool = True) -> None:
    """blockdev-create, wait for the end, list the jobs, dismiss."""
    reply = p.cmd("blockdev-create", {"job-id": job_id, "options": options})
    if "error" in reply:
        return
    p.job(job_id)
    p.cmd("query-jobs")
    if dismiss:
        p.cmd("job-dismiss", {"id": job_id})


def new_file(p: Peer, name: str, node: str) -> None:
    """QEMU's flow: an empty file, then a node on it."""
    create(p, f"mk-{node}", {"driver": "file", "filename": f"$DIR/{name}", "size": 0})
    p.cmd("blockdev-add", {"driver": "file", "node-name": node, "filename": f"$DIR/{name}"})


def nodes(p: Peer, host_allocated: tuple[str, ...] = ()) -> None:
    """query-named-block-nodes, without the ``active`` member qmpd adds (QEMU 10's).

    For the nodes ``host_allocated`` names (files preallocated with falloc or
    full), ``actual-size`` is left out: the filesystem counts its extent tree
    blocks in it, and their number follows how the writes were split."""
    reply = p.cmd("query-named-block-nodes", {"flat": True})
    for node in reply["return"]:
        node.pop("active", None)
        if node["node-name"] in host_allocated:
            node["image"].pop("actual-size")
    p.qmp.log[-1] = ("reply", "query-named-block-nodes", reply)


def info(path: Path) -> dict[str, Any]:
    """qemu-img info, minus what names the file or measures the host's allocation."""
    out = json.loads(qemu_img("info", "--output=json", path).stdout)
    for key in ("filename", "actual-size"):
        out.pop(key, None)
    if "full-backing-filename" in out:  # relative names resolve next to the image
        out["full-backing-filename"] = out["full-backing-filename"].replace(
            str(path.parent), "$DIR")
    return out  # type: ignore[no-any-return]


def check(path: Path) -> dict[str, Any]:
    out = json.loads(qemu_img("check", "--output=json", path).stdout)
    out.pop("filename")
    assert out["check-errors"] == 0 and "corruptions" not in out and "leaks" not in out, out
    return out  # type: ignore[no-any-return]


# --- a successful create: QEMU's flow, the job's life and every verb on it -------------------

JOB_VERBS = ["job-pause", "job-resume", "job-cancel", "job-complete", "job-finalize"]
BLOCK_JOB_VERBS = [
    ("block-job-cancel", {"device": "c1"}), ("block-job-cancel", {"device": "c1", "force": True}),
    ("block-job-pause", {"device": "c1"}), ("block-job-resume", {"device": "c1"}),
    ("block-job-complete", {"device": "c1"}), ("block-job-finalize", {"id": "c1"}),
    ("block-job-dismiss", {"id": "c1"}), ("block-job-set-speed", {"device": "c1", "speed": 1}),
]


def test_create_qcow2_life_cycle_as_qsd(tmp_path: Path) -> None:
    def talk(p: Peer) -> None:
        p.cmd("query-jobs")
        p.cmd("blockdev-create", {"job-id": "c0", "options": {
            "driver": "file", "filename": "$DIR/disk.qcow2", "size": 0}})
        p.job("c0")
        p.cmd("query-jobs")
        p.cmd("query-block-jobs")
        p.cmd("job-dismiss", {"id": "c0"})
        p.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "$DIR/disk.qcow2"})
        p.cmd("blockdev-create", {"job-id": "c1", "options": {
            "driver": "qcow2", "file": "f", "size": GiB}})
        p.job("c1")
        p.cmd("query-jobs")
        p.cmd("query-block-jobs")
        for verb in JOB_VERBS:
            p.cmd(verb, {"id": "c1"})
        for verb, args in BLOCK_JOB_VERBS:
            p.cmd(verb, args)
        # The ID stays taken until the job is dismissed.
        p.cmd("blockdev-create", {"job-id": "c1", "options": {
            "driver": "file", "filename": "$DIR/other", "size": 0}})
        p.cmd("job-dismiss", {"id": "c1"})
        p.cmd("query-jobs")
        for verb in [*JOB_VERBS, "job-dismiss"]:
            p.cmd(verb, {"id": "c1"})
        for verb, args in BLOCK_JOB_VERBS:
            p.cmd(verb, args)
        # The node is free again: a qcow2 node opens on the new image.
        p.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
        nodes(p)

    got = transcripts(tmp_path, talk)
    qsd = assert_same(got)
    statuses = [e[2]["status"] for e in qsd if e[0] == "event" and e[2]["id"] == "c1"]
    assert statuses == ["created", "running", "waiting", "pending", "concluded", "null"]
    images = [tmp_path / impl / "disk.qcow2" for impl in ("qsd", "qmpd")]
    assert images[1].read_bytes() == images[0].read_bytes()
    assert check(images[1]) == check(images[0])
    assert info(images[1]) == info(images[0])


def test_job_ids_and_drivers_as_qsd(tmp_path: Path) -> None:
    def talk(p: Peer) -> None:
        opts = {"driver": "file", "filename": "$DIR/x", "size": 0}
        for job_id in ["3x", "", "a b", "-a", "a" * 200, "a.b-c_d", "\u00e9t\u00e9", "x" * 8]:
            create(p, job_id, opts)
        p.cmd("blockdev-create", {"options": opts})
        p.cmd("blockdev-create", {"job-id": "j", "options": {"driver": "file"}})
        p.cmd("blockdev-create", {"job-id": "j", "options": {"filename": "$DIR/x", "size": 0}})
        p.cmd("blockdev-create", {"job-id": "j", "options": {**opts, "bogus": 1}})
        p.cmd("blockdev-create", {"job-id": "j", "options": {**opts, "size": "1"}})
        p.cmd("blockdev-create", {"job-id": "j", "options": {**opts, "preallocation": "x"}})
        p.cmd("blockdev-create", {"job-id": "j", "options": opts, "x": 1})
        for driver in ["raw", "null-co", "throttle", "host_device"]:
            p.cmd("blockdev-create", {"job-id": "j", "options": {"driver": driver}})
        p.cmd("blockdev-create", {"job-id": "j", "options": {"driver": "raw", "size": 1}})
        # A driver refusal does not create the job; an ID refusal leaves the other job alone.
        p.cmd("blockdev-create", {"job-id": "dup", "options": opts})
        p.job("dup")
        p.cmd("blockdev-create", {"job-id": "dup", "options": {"driver": "raw"}})
        p.cmd("blockdev-create", {"job-id": "dup", "options": opts})
        p.cmd("query-jobs")

    assert_same(transcripts(tmp_path, talk))


# --- failing creates: the job fails (aborting), its error in query-jobs -----------------------

FILE_FAILURES: list[dict[str, Any]] = [
    {"filename": "$DIR/f1", "size": MiB, "preallocation": "metadata"},
    {"filename": "$DIR/f1", "size": -1},
    {"filename": "$DIR/f1", "size": (1 << 64) - 1},
    {"filename": "$DIR/f1", "size": -1, "preallocation": "falloc"},
    {"filename": "$DIR/f1", "size": -1, "preallocation": "full"},
    {"filename": "$DIR/f1", "size": -1, "preallocation": "metadata"},
    {"filename": "$DIR/nodir/f1", "size": 0},
    {"filename": "$DIR", "size": 0},
    {"filename": "$DIR/f1", "size": 0, "extent-size-hint": -1},
    {"filename": "$DIR/f1", "size": 0, "extent-size-hint": 1 << 32},
]

QCOW2_FAILURES: list[dict[str, Any]] = [
    {"version": "v2", "refcount-bits": 8},
    {"version": "v2", "lazy-refcounts": True},
    {"refcount-bits": 3}, {"refcount-bits": 128}, {"refcount-bits": 0}, {"refcount-bits": -16},
    {"cluster-size": 1000}, {"cluster-size": 256}, {"cluster-size": 4 * MiB},
    {"cluster-size": 0}, {"cluster-size": -65536}, {"cluster-size": (1 << 32) + 65536},
    {"backing-file": "x", "preallocation": "metadata"},
    {"backing-file": "x", "preallocation": "falloc"},
    {"backing-file": "x", "preallocation": "full"},
    {"backing-fmt": "raw"},
    {"size": 1000}, {"size": -1}, {"size": -512}, {"size": (1 << 64) - 512},
    {"size": 1 << 62}, {"size": (1 << 63) - 512}, {"size": 1 << 40, "cluster-size": 512},
    # Several faults at once: QEMU's order decides which one is reported.
    {"size": 1000, "cluster-size": 1000, "version": "v2", "lazy-refcounts": True},
    {"cluster-size": 1000, "version": "v2", "lazy-refcounts": True},
    {"backing-fmt": "raw", "version": "v2", "lazy-refcounts": True},
    {"version": "v2", "lazy-refcounts": True, "refcount-bits": 3},
    {"version": "v2", "refcount-bits": 3},
    {"size": -512, "backing-file": "b" * 1024},
    {"backing-file": "b" * 1024},
    {"backing-file": "b" * 1023, "cluster-size": 512},
    {"backing-file": "b" * 1023, "cluster-size": 512, "backing-fmt": "raw"},
    {"file": "nope"},
    {"file": {"driver": "file", "filename": "$DIR/nonexistent"}},
    {"file": "ro"}, {"file": "ro", "size": 1000},
    {"file": "nope", "size": 1000},
]


def test_failing_creates_as_qsd(tmp_path: Path) -> None:
    def talk(p: Peer) -> None:
        for k, opts in enumerate(FILE_FAILURES):
            create(p, f"f{k}", {"driver": "file", **opts})
        new_file(p, "img", "f")
        create(p, "mk-ro", {"driver": "file", "filename": "$DIR/ro.img", "size": 0})
        p.cmd("blockdev-add", {"driver": "file", "node-name": "ro", "filename": "$DIR/ro.img",
                               "read-only": True})
        for k, opts in enumerate(QCOW2_FAILURES):
            create(p, f"q{k}", {"driver": "qcow2", "file": "f", "size": MiB, **opts})
        # A node a qcow2 node uses cannot be written by another (QEMU's permission text).
        p.cmd("blockdev-add", {"driver": "qcow2", "node-name": "q", "file": "f"})
        create(p, "busy", {"driver": "qcow2", "file": "f", "size": MiB})
        p.cmd("blockdev-del", {"node-name": "q"})
        # A job that failed stays until dismissed, with its error.
        create(p, "kept", {"driver": "qcow2", "file": "f", "size": 1000}, dismiss=False)
        p.cmd("job-cancel", {"id": "kept"})
        p.cmd("query-jobs")
        p.cmd("job-dismiss", {"id": "kept"})

    qsd = assert_same(transcripts(tmp_path, talk))
    errors = [e[2]["return"][0].get("error") for e in qsd
              if e[0] == "reply" and e[1] == "query-jobs" and e[2]["return"]]
    assert sum(1 for e in errors if e) >= len(FILE_FAILURES) + len(QCOW2_FAILURES) - 2
    aborted = [e[2]["id"] for e in qsd if e[0] == "event" and e[2]["status"] == "aborting"]
    assert "q0" in aborted and "f0" in aborted


# --- what the images are: qemu-img check and info against QSD's ------------------------------

IMAGES: list[dict[str, Any]] = [
    {"size": GiB},
    {"size": 0},
    {"size": 512},
    {"size": 100 * MiB + 512, "cluster-size": 512},
    {"size": 3 * GiB, "cluster-size": 2 * MiB, "refcount-bits": 64},
    {"size": 16 * MiB, "cluster-size": 4096, "refcount-bits": 1},
    {"size": GiB, "version": "v2"},
    {"size": GiB, "version": "v3", "lazy-refcounts": True},
    {"size": GiB, "backing-file": "base.raw", "backing-fmt": "raw"},
    {"size": GiB, "backing-file": "/abs/base.qcow2", "version": "v2"},
    {"size": GiB, "backing-file": "b" * 1023},
    {"size": 64 * MiB, "compression-type": "zlib"},
    {"size": GiB, "preallocation": "metadata"},
    {"size": 5 * MiB, "preallocation": "metadata", "cluster-size": 512},
    {"size": 700 * MiB + 512, "preallocation": "metadata"},
    {"size": 100 * MiB, "preallocation": "falloc"},
    {"size": 600 * MiB + 4096, "preallocation": "falloc"},
    {"size": 40 * MiB, "preallocation": "full", "cluster-size": 4096},
    {"size": 1536, "preallocation": "full"},
]


def test_images_as_qsd(tmp_path: Path) -> None:
    def talk(p: Peer) -> None:
        for k, opts in enumerate(IMAGES):
            new_file(p, f"img{k}", f"n{k}")
            create(p, f"c{k}", {"driver": "qcow2", "file": f"n{k}", **opts})
        # An inline file reference, opened for the job only.
        create(p, "mk", {"driver": "file", "filename": "$DIR/inline", "size": 0})
        create(p, "inl", {"driver": "qcow2", "size": MiB,
                          "file": {"driver": "file", "filename": "$DIR/inline"}})
        # A raw image is a file; preallocated ones too.
        for k, prealloc in enumerate(["off", "falloc", "full"]):
            create(p, f"r{k}", {"driver": "file", "filename": f"$DIR/raw{k}",
                                "size": 3 * MiB + 512, "preallocation": prealloc,
                                "nocow": True})
        # Formatting a bigger file: QEMU writes the image over it, the file keeps its length.
        create(p, "big", {"driver": "file", "filename": "$DIR/big", "size": 10 * MiB})
        p.cmd("blockdev-add", {"driver": "file", "node-name": "big", "filename": "$DIR/big"})
        create(p, "c-big", {"driver": "qcow2", "file": "big", "size": GiB})
        nodes(p, tuple(f"n{k}" for k, opts in enumerate(IMAGES)
                       if opts.get("preallocation") in ("falloc", "full")))

    # Not line for line: the preallocated files' actual-size is left out (see nodes()).
    assert_same(transcripts(tmp_path, talk), raw=False)
    qsd, ours = tmp_path / "qsd", tmp_path / "qmpd"
    names = [f"img{k}" for k in range(len(IMAGES))] + ["inline", "big"]
    for name in names:
        assert info(ours / name) == info(qsd / name), name
        if "backing-file" not in (IMAGES[int(name[3:])] if name[3:].isdigit() else {}):
            # (check opens the backing file; those images are compared byte for byte)
            assert check(ours / name) == check(qsd / name), name
        assert os.path.getsize(ours / name) == os.path.getsize(qsd / name), name
    for name in names:
        if name in ("img15", "img16", "img17", "img18"):  # falloc/full: data read as zeros
            assert qemu_img("compare", ours / name, qsd / name).returncode == 0
        else:
            assert (ours / name).read_bytes() == (qsd / name).read_bytes(), name
    for k in range(3):
        raw_ours, raw_qsd = ours / f"raw{k}", qsd / f"raw{k}"
        assert raw_ours.read_bytes() == raw_qsd.read_bytes() == bytes(3 * MiB + 512)
        assert info(raw_ours) == info(raw_qsd)
    # Allocation follows the preallocation mode (falloc and full allocate everything).
    blocks = [os.stat(ours / f"raw{k}").st_blocks * 512 for k in range(3)]
    assert blocks[0] < MiB and blocks[1] >= 3 * MiB and blocks[2] >= 3 * MiB, blocks


# --- a running job: the verbs it takes and refuses, cancel, and quit ----------------------

#: Long enough to be running for the commands below on either daemon (QSD: ~1.5 s).
SLOW = {"driver": "file", "filename": "$DIR/slow", "size": 512 * MiB, "preallocation": "full"}


def test_verbs_on_a_running_job_as_qsd(tmp_path: Path) -> None:
    def talk(p: Peer) -> None:
        p.cmd("blockdev-create", {"job-id": "s", "options": SLOW})
        for verb in ["job-complete", "job-finalize", "job-dismiss", "job-pause"]:
            p.cmd(verb, {"id": "s"})
        p.cmd("query-jobs")
        p.cmd("job-pause", {"id": "s"})
        p.cmd("job-resume", {"id": "s"})
        p.cmd("job-resume", {"id": "s"})
        p.cmd("block-job-cancel", {"device": "s"})
        p.cmd("query-block-jobs")
        # A create job cannot stop half-way: it finishes its work, then fails as cancelled.
        p.cmd("job-cancel", {"id": "s"})
        p.cmd("query-jobs")
        p.cmd("job-cancel", {"id": "s"})
        p.job("s")
        p.cmd("query-jobs")
        p.cmd("job-dismiss", {"id": "s"})

    qsd = assert_same(transcripts(tmp_path, talk))
    assert ("reply", "query-jobs", {"return": [{
        "current-progress": 1, "status": "concluded", "total-progress": 1, "type": "create",
        "id": "s", "error": "Operation canceled"}]}) in qsd
    for impl in ("qsd", "qmpd"):
        assert os.path.getsize(tmp_path / impl / "slow") == 512 * MiB


def test_quit_with_jobs_as_qsd(tmp_path: Path) -> None:
    """At exit each job, newest first, is cancelled and waited for, then dismissed
    (job_cancel_sync_all).  qmpd sends SHUTDOWN and answers ``quit`` before it
    cancels the jobs; QSD sends no SHUTDOWN and answers once they are gone."""
    def talk(p: Peer) -> None:
        create(p, "done", {"driver": "file", "filename": "$DIR/small", "size": 0},
               dismiss=False)
        p.cmd("blockdev-create", {"job-id": "s", "options": SLOW})
        p.cmd("quit")
        p.drain()

    got = transcripts(tmp_path, talk)
    quit_order = {}
    for impl in ("qsd", "qmpd"):
        transcript = got[impl]
        end = [i for i, e in enumerate(transcript) if e[:2] == ("reply", "blockdev-create")][-1]
        quit_order[impl] = [e for e in transcript[end + 1:]
                            if e[1] != "SHUTDOWN" and e[:2] != ("reply", "quit")]
        assert ("reply", "quit", {"return": {}}) in transcript[end + 1:]
        assert os.path.getsize(tmp_path / impl / "slow") == 512 * MiB
    assert quit_order["qmpd"] == quit_order["qsd"] == [
        ("event", "JOB_STATUS_CHANGE", {"status": status, "id": job_id})
        for job_id, status in [("s", "aborting"), ("s", "concluded"), ("s", "null"),
                               ("done", "null")]]


def test_jobs_in_metrics(qmpd_factory: Any, tmp_path: Path) -> None:
    """qmpd_jobs{type,status} and each job's progress, over HTTP."""
    daemon = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    client = daemon.client()
    client.negotiate()

    def metrics() -> str:
        with urllib.request.urlopen(daemon.http_url() + "/metrics", timeout=10) as resp:
            return resp.read().decode()  # type: ignore[no-any-return]

    assert "qmpd_jobs{" not in metrics()
    for job_id, size in (("a", 0), ("b", -1)):
        since = len(client.events)
        client.ok("blockdev-create", {"job-id": job_id, "options": {
            "driver": "file", "filename": str(tmp_path / job_id), "size": size}})
        client.wait_event("JOB_STATUS_CHANGE", "concluded", since=since)
    text = metrics()
    assert 'qmpd_jobs{status="concluded",type="create"} 2.0' in text
    assert 'qmpd_job_progress_current{id="a",type="create"} 1.0' in text
    assert 'qmpd_job_progress_total{id="b",type="create"} 1.0' in text
    client.ok("job-dismiss", {"id": "a"})
    text = metrics()
    assert 'qmpd_jobs{status="concluded",type="create"} 1.0' in text
    assert 'id="a"' not in text
    client.close()


def test_qcow2_features_qmpd_lacks(qmpd_factory: Any, tmp_path: Path) -> None:
    """Not in qmpd's schema, refused as QEMU refuses a member its schema lacks."""
    client = qmpd_factory().client()
    client.negotiate()
    base = {"driver": "qcow2", "file": "f", "size": MiB}
    for member, value in [("data-file", "f"), ("data-file-raw", True), ("extended-l2", True),
                          ("encrypt", {"format": "luks", "key-secret": "s"})]:
        assert client.err("blockdev-create", {"job-id": "j", "options": {
            **base, member: value}}) == f"Parameter 'options.{member}' is unexpected"
    assert client.err("blockdev-create", {"job-id": "j", "options": {
        **base, "compression-type": "zstd"}}) == (
        "Parameter 'compression-type' does not accept value 'zstd'")
    assert client.ok("query-jobs") == []
    client.close()


def test_formatting_through_other_nodes_as_qsd(tmp_path: Path) -> None:
    """An O_DIRECT file node, then a raw node over it: the image goes through
    whatever node ``file`` names, as in QEMU."""
    def talk(p: Peer) -> None:
        create(p, "a", {"driver": "file", "filename": "$DIR/d.qcow2", "size": 0})
        p.cmd("blockdev-add", {"driver": "file", "node-name": "f", "filename": "$DIR/d.qcow2",
                               "cache": {"direct": True}})
        create(p, "b", {"driver": "qcow2", "file": "f", "size": GiB,
                        "preallocation": "metadata"})
        p.cmd("blockdev-add", {"driver": "raw", "node-name": "r", "file": "f"})
        create(p, "c", {"driver": "qcow2", "file": "r", "size": MiB, "cluster-size": 4096})
        p.cmd("query-jobs")

    assert_same(transcripts(tmp_path, talk))
    ours, qsd = tmp_path / "qmpd" / "d.qcow2", tmp_path / "qsd" / "d.qcow2"
    assert ours.read_bytes() == qsd.read_bytes()
    assert check(ours) == check(qsd)
