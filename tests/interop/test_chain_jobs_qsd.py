"""block-stream, block-commit and blockdev-snapshot side by side with
qemu-storage-daemon 7.2 (issue 12).

Each daemon gets its own copy of the same chain (base <- mid <- top, each
layer with data of its own written by qemu-io), runs the same job, and
the results must agree: the events (timestamps stripped), query-block-jobs
while the job waits to be finalized, the error texts, and the images
(``qemu-img compare`` of each layer, ``qemu-img check``, and the backing
file each header names).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.qmp import QmpClient
from tests.support.qsd import side_by_side, side_by_side_run
from tests.support.tools import qemu_img, qemu_io

pytestmark = pytest.mark.qemu

MiB = 1024 * 1024
SIZE = 4 * MiB
LAYERS = ("base", "mid", "top")


def make_chain(work: Path, raw_base: bool = False) -> None:
    """base <- mid <- top; each layer holds data the others do not."""
    base = work / ("base.raw" if raw_base else "base.qcow2")
    if raw_base:
        qemu_img("create", "-q", "-f", "raw", base, str(SIZE))
    else:
        qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE))
    fmt = "raw" if raw_base else "qcow2"
    qemu_io("-f", fmt, "-c", "write -P 1 0 1M", "-c", "write -P 4 3M 512k", base, check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", fmt, work / "mid.qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 2 512k 1M", "-c", "write -z 3M 64k",
            work / "mid.qcow2", check=True)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", work / "top.qcow2")
    qemu_io("-f", "qcow2", "-c", "write -P 3 1M 512k", "-c", "write -P 5 3584k 64k",
            work / "top.qcow2", check=True)
    for name in ("custom-name.qcow2", "named.qcow2"):  # what backing-file names
        (work / name).symlink_to(base.name)


def image(work: Path, layer: str) -> Path:
    raw = work / "base.raw"
    return raw if layer == "base" and raw.exists() else work / f"{layer}.qcow2"


def chain_nodes(raw_base: bool = False) -> Any:
    def make(work: Path) -> list[str]:
        make_chain(work, raw_base)
        args: list[str] = []
        backing = None
        for layer in LAYERS:
            path = image(work, layer)
            fmt = "raw" if path.suffix == ".raw" else "qcow2"
            spec = {"driver": fmt, "node-name": layer,
                    "file": {"driver": "file", "filename": str(path)}}
            if fmt == "qcow2":
                spec["backing"] = backing
            args += ["--blockdev", json.dumps(spec)]
            backing = layer
        return args
    return make


def events(client: QmpClient) -> list[dict[str, Any]]:
    return [{"event": e["event"], "data": e.get("data")} for e in client.events]


def finish_job(client: QmpClient, job: str = "j") -> dict[str, Any]:
    """With auto-finalize and auto-dismiss off: what the job looks like while
    pending and once concluded; then it is finalized and dismissed."""
    client.wait_event("BLOCK_JOB_PENDING", timeout=60)
    out = {"pending": client.cmd("query-block-jobs"), "jobs": client.cmd("query-jobs")}
    out["finalize"] = client.cmd("job-finalize", {"id": job})
    client.wait_event("JOB_STATUS_CHANGE", "concluded", timeout=30)
    out["concluded"] = client.cmd("query-block-jobs")
    out["dismiss"] = client.cmd("job-dismiss", {"id": job})
    return out


def close_nodes(client: QmpClient, names: list[str]) -> None:
    for name in names:
        reply = client.cmd("blockdev-del", {"node-name": name})
        assert "return" in reply, (name, reply)


def header_backing(path: Path, work: Path) -> tuple[str | None, str | None]:
    info = json.loads(qemu_img("info", "--output=json", "-U", path).stdout)
    name = info.get("backing-filename")
    if name is not None:
        name = name.replace(str(work), "<dir>")
    return name, info.get("backing-filename-format")


def compare_images(tmp_path: Path, layers: tuple[str, ...] = LAYERS) -> None:
    """Each layer alone (no backing) and through its chain, qmpd's against QSD's."""
    for layer in layers:
        ours, theirs = image(tmp_path / "qmpd", layer), image(tmp_path / "qsd", layer)
        if ours.suffix == ".qcow2":
            qemu_img("check", ours)
            assert header_backing(ours, tmp_path / "qmpd") == header_backing(
                theirs, tmp_path / "qsd"), layer
        fmt = "raw" if ours.suffix == ".raw" else "qcow2"
        qemu_img("compare", "-f", fmt, "-F", fmt, ours, theirs)
        assert layer_alone(ours, fmt) == layer_alone(theirs, fmt), f"{layer} differs on its own"


def layer_alone(path: Path, fmt: str) -> str:
    """The SHA-256 of what one layer holds, its backing file left out."""
    opts = f"driver={fmt},file.driver=file,file.filename={path}"
    if fmt == "qcow2":
        opts = f"driver=qcow2,backing=,file.driver=file,file.filename={path}"
    out = path.with_name(path.name + ".alone")
    qemu_img("convert", "-U", "--image-opts", opts, "-O", "raw", out)
    try:
        return hashlib.sha256(out.read_bytes()).hexdigest()
    finally:
        out.unlink()


def run_job(command: str, args: dict[str, Any], close: list[str],
            between: list[tuple[str, dict[str, Any]]] | None = None) -> Any:
    def scenario(client: QmpClient, work: Path) -> dict[str, Any]:
        full = {"job-id": "j", "auto-finalize": False, "auto-dismiss": False,
                **{k: v.replace("<dir>", str(work)) if isinstance(v, str) else v
                   for k, v in args.items()}}
        out: dict[str, Any] = {"start": client.cmd(command, full)}
        if "error" in out["start"]:
            return out
        out.update(finish_job(client))
        out["after"] = [client.cmd(e, a) for e, a in (between or [])]
        out["events"] = events(client)
        close_nodes(client, close)
        return out
    return scenario


STREAMS = [
    pytest.param({"device": "top", "base-node": "base"}, id="base-node"),
    pytest.param({"device": "top"}, id="whole-chain"),
    pytest.param({"device": "top", "base-node": "mid"}, id="nothing-to-stream"),
    pytest.param({"device": "top", "bottom": "mid"}, id="bottom"),
    pytest.param({"device": "top", "base": "<dir>/base.qcow2",
                  "backing-file": "custom-name.qcow2"}, id="base-by-file-and-backing-file"),
]


@pytest.mark.parametrize("args", STREAMS)
def test_stream_as_qsd(tmp_path: Path, args: dict[str, Any]) -> None:
    out = side_by_side_run(tmp_path, chain_nodes(), run_job("block-stream", args,
                                                            ["top", "mid", "base"]))
    assert out["qmpd"] == out["qsd"]
    assert "return" in out["qsd"]["start"]
    compare_images(tmp_path)


def test_stream_over_a_raw_base_as_qsd(tmp_path: Path) -> None:
    out = side_by_side_run(tmp_path, chain_nodes(raw_base=True),
                           run_job("block-stream", {"device": "top", "base-node": "base"},
                                   ["top", "mid", "base"]))
    assert out["qmpd"] == out["qsd"]
    compare_images(tmp_path)


COMMITS = [
    pytest.param({"device": "top", "top-node": "mid", "base-node": "base"}, id="intermediate"),
    pytest.param({"device": "top", "top-node": "mid"}, id="intermediate-default-base"),
    pytest.param({"device": "top", "top-node": "mid", "base-node": "base",
                  "backing-file": "named.qcow2"}, id="intermediate-backing-file"),
]


@pytest.mark.parametrize("args", COMMITS)
def test_intermediate_commit_as_qsd(tmp_path: Path, args: dict[str, Any]) -> None:
    out = side_by_side_run(tmp_path, chain_nodes(), run_job("block-commit", args,
                                                            ["top", "mid", "base"]))
    assert out["qmpd"] == out["qsd"]
    assert "return" in out["qsd"]["start"]
    compare_images(tmp_path)


def test_intermediate_commit_into_a_raw_base_as_qsd(tmp_path: Path) -> None:
    out = side_by_side_run(tmp_path, chain_nodes(raw_base=True), run_job(
        "block-commit", {"device": "top", "top-node": "mid", "base-node": "base"},
        ["top", "mid", "base"]))
    assert out["qmpd"] == out["qsd"]
    compare_images(tmp_path)


def active_commit(end: str, raw_base: bool = False) -> Any:
    def scenario(client: QmpClient, work: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"start": client.cmd("block-commit", {
            "job-id": "j", "device": "top", "base-node": "base", "auto-dismiss": False})}
        client.wait_event("BLOCK_JOB_READY", timeout=60)
        out["ready"] = client.cmd("query-block-jobs")
        out["complete-too-early"] = None
        out["end"] = client.cmd(end, {"device": "j"})
        client.wait_event("JOB_STATUS_CHANGE", "concluded", timeout=30)
        out["concluded"] = client.cmd("query-block-jobs")
        out["dismiss"] = client.cmd("job-dismiss", {"id": "j"})
        out["events"] = events(client)
        # After a pivot nobody uses top and mid any more; base is still used by mid.
        close_nodes(client, ["top", "mid", "base"])
        return out
    return scenario


@pytest.mark.parametrize("end", ["block-job-complete", "block-job-cancel"])
@pytest.mark.parametrize("raw_base", [False, True], ids=["qcow2", "raw"])
def test_active_commit_as_qsd(tmp_path: Path, end: str, raw_base: bool) -> None:
    out = side_by_side_run(tmp_path, chain_nodes(raw_base), active_commit(end, raw_base))
    assert out["qmpd"] == out["qsd"]
    names = [e["event"] for e in out["qsd"]["events"]]
    assert "BLOCK_JOB_READY" in names and "BLOCK_JOB_COMPLETED" in names
    compare_images(tmp_path)


def test_chain_job_errors_as_qsd(tmp_path: Path) -> None:
    """The refusals, in QEMU's order of checks."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("block-stream", {"job-id": "j", "device": "nope"}),
        ("block-stream", {"job-id": "j", "device": "top", "base": "x", "base-node": "base"}),
        ("block-stream", {"job-id": "j", "device": "top", "base": "x", "bottom": "mid"}),
        ("block-stream", {"job-id": "j", "device": "top", "bottom": "mid", "base-node": "x"}),
        ("block-stream", {"job-id": "j", "device": "top", "base": "nothere.qcow2"}),
        ("block-stream", {"job-id": "j", "device": "top", "base": "base.qcow2"}),
        ("block-stream", {"job-id": "j", "device": "top", "base-node": "top"}),
        ("block-stream", {"job-id": "j", "device": "mid", "base-node": "top"}),
        ("block-stream", {"job-id": "j", "device": "top", "base-node": "nope"}),
        ("block-stream", {"job-id": "j", "device": "mid", "bottom": "top"}),
        ("block-stream", {"job-id": "j", "device": "top", "backing-file": "x"}),
        ("block-stream", {"device": "top", "base-node": "base"}),
        ("block-stream", {"job-id": "1j", "device": "top", "base-node": "base"}),
        ("block-commit", {"job-id": "j", "device": "nope"}),
        ("block-commit", {"job-id": "j", "device": "mid"}),
        ("block-commit", {"job-id": "j", "device": "lone"}),
        ("block-commit", {"job-id": "j", "device": "top", "top": "x", "top-node": "mid"}),
        ("block-commit", {"job-id": "j", "device": "top", "top-node": "lone"}),
        ("block-commit", {"job-id": "j", "device": "top", "top": "nothere.qcow2"}),
        ("block-commit", {"job-id": "j", "device": "top", "base": "x", "base-node": "base"}),
        ("block-commit", {"job-id": "j", "device": "top", "base-node": "lone"}),
        ("block-commit", {"job-id": "j", "device": "top", "base": "nothere.qcow2"}),
        ("block-commit", {"job-id": "j", "device": "top", "top-node": "base",
                          "base-node": "base"}),
        ("block-commit", {"job-id": "j", "device": "top", "backing-file": "x"}),
        ("block-commit", {"job-id": "j", "device": "top", "top-node": "base"}),
        ("block-commit", {"device": "top", "top-node": "mid"}),
        ("block-commit", {"job-id": "-", "device": "top", "top-node": "mid"}),
        ("blockdev-snapshot", {"node": "nope", "overlay": "lone"}),
        ("blockdev-snapshot", {"node": "top", "overlay": "nope"}),
        ("blockdev-snapshot", {"node": "mid", "overlay": "lone"}),
        ("blockdev-snapshot", {"node": "top", "overlay": "top"}),
        ("blockdev-snapshot", {"node": "top", "overlay": "mid"}),
        ("blockdev-snapshot", {"node": "top", "overlay": "base"}),
        ("query-block-jobs", {}),
    ]

    def nodes(work: Path) -> list[str]:
        args = chain_nodes()(work)
        qemu_img("create", "-q", "-f", "qcow2", work / "lone.qcow2", str(SIZE))
        return [*args, "--blockdev", json.dumps({
            "driver": "qcow2", "node-name": "lone", "backing": None,
            "file": {"driver": "file", "filename": str(work / "lone.qcow2")}})]

    replies = side_by_side(tmp_path, nodes, steps)
    for step, ours, theirs in zip(steps, replies["qmpd"], replies["qsd"], strict=True):
        assert ours == theirs, step


def busy_scenario(command: str, args: dict[str, Any]) -> Any:
    """What a running (paused) job refuses: blockdev-del of its nodes, other jobs."""
    def scenario(client: QmpClient, work: Path) -> list[dict[str, Any]]:
        out = [client.cmd(command, {"job-id": "j", "speed": 1, **args})]
        out.append(client.cmd("job-pause", {"id": "j"}))
        for name in LAYERS:
            out.append(client.cmd("blockdev-del", {"node-name": name}))
        out.append(client.cmd("block-stream", {"job-id": "k", "device": "top"}))
        out.append(client.cmd("block-commit", {"job-id": "k", "device": "top",
                                               "top-node": "mid"}))
        out.append(client.cmd("blockdev-snapshot", {"node": "top", "overlay": "base"}))
        out.append(client.cmd("block-job-set-speed", {"device": "j", "speed": 0}))
        out.append(client.cmd("job-cancel", {"id": "j"}))
        client.wait_event("JOB_STATUS_CHANGE", "null", timeout=30)
        # Where the pause caught the job depends on timing (in QEMU too): not
        # its progress (an active commit counts its dirty bytes once it runs).
        out.append({"events": [{**e, "data": {k: v for k, v in e["data"].items()
                                              if k not in ("offset", "len")}}
                               for e in events(client)]})
        return out
    return scenario


@pytest.mark.parametrize(("command", "args"), [
    pytest.param("block-stream", {"device": "top", "base-node": "base"}, id="stream"),
    pytest.param("block-commit", {"device": "top", "top-node": "mid", "base-node": "base"},
                 id="commit"),
    pytest.param("block-commit", {"device": "top", "base-node": "base"}, id="active-commit"),
])
def test_nodes_of_a_running_job_are_busy_as_qsd(tmp_path: Path, command: str,
                                                args: dict[str, Any]) -> None:
    out = side_by_side_run(tmp_path, chain_nodes(), busy_scenario(command, args))
    for ours, theirs in zip(out["qmpd"], out["qsd"], strict=True):
        assert ours == theirs


def test_blockdev_snapshot_as_qsd(tmp_path: Path) -> None:
    """The overlay takes the node's place under an NBD export; writes go to it."""
    def nodes(work: Path) -> list[str]:
        args = chain_nodes()(work)
        qemu_img("create", "-q", "-f", "qcow2", work / "over.qcow2", str(SIZE))
        return [*args, "--blockdev", json.dumps({
            "driver": "qcow2", "node-name": "over", "backing": None,
            "file": {"driver": "file", "filename": str(work / "over.qcow2")}}),
            "--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
            "--export", "nbd,id=e,node-name=top,name=disk,writable=on"]

    def scenario(client: QmpClient, work: Path) -> list[Any]:
        out: list[Any] = [client.cmd("blockdev-snapshot", {"node": "top", "overlay": "over"})]
        out.append(client.cmd("query-block-exports"))
        qemu_io("-f", "raw", "-c", "write -P 9 2M 64k",
                f"nbd+unix:///disk?socket={work}/nbd.sock", check=True)
        nodes = client.cmd("query-named-block-nodes", {"flat": True})["return"]
        out.append(sorted((n["node-name"], n.get("backing_file", "").replace(str(work), "<d>"))
                          for n in nodes if not n["node-name"].startswith("#")))
        out.append(client.cmd("blockdev-del", {"node-name": "top"}))
        out.append(client.cmd("block-export-del", {"id": "e"}))
        time.sleep(0.2)
        close_nodes(client, ["over", "top", "mid", "base"])
        return out

    out = side_by_side_run(tmp_path, nodes, scenario)
    assert out["qmpd"] == out["qsd"]
    compare_images(tmp_path, ("base", "mid", "top"))
    for impl in ("qsd", "qmpd"):
        # the overlay holds the write; its header still names no backing file
        over = tmp_path / impl / "over.qcow2"
        read = qemu_io("-f", "qcow2", "-c", "read -P 9 2M 64k", over, check=True)
        assert "Pattern verification failed" not in read.stdout


def test_a_writer_on_a_layer_conflicts_with_the_job_as_qsd(tmp_path: Path) -> None:
    """A writable export of ``mid``: the stream, which needs it unchanged, is refused
    with QEMU's permission text; a commit of ``mid`` is an active commit (ready,
    then a soft cancel completes it)."""
    def nodes(work: Path) -> list[str]:
        return [*chain_nodes()(work),
                "--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
                "--export", "nbd,id=e,node-name=mid,name=mid,writable=on"]

    def scenario(client: QmpClient, work: Path) -> list[Any]:
        out: list[Any] = [client.cmd("block-stream", {"job-id": "j", "device": "top",
                                                      "base-node": "base"})]
        out.append(client.cmd("block-commit", {"job-id": "j", "device": "top",
                                               "top-node": "mid", "base-node": "base"}))
        client.wait_event("BLOCK_JOB_READY", timeout=60)
        since = len(client.events)
        out.append(client.cmd("block-job-cancel", {"device": "j"}))
        client.wait_event("JOB_STATUS_CHANGE", "null", timeout=30, since=since)
        out.append(events(client))  # the refused stream's job came and went
        return out

    out = side_by_side_run(tmp_path, nodes, scenario)
    assert out["qmpd"] == out["qsd"]
    assert "Permission conflict on node 'mid'" in out["qsd"][0]["error"]["desc"]


def test_active_commit_into_a_smaller_base_as_qsd(tmp_path: Path) -> None:
    """A base smaller than the top: QEMU's mirror_run grows the base to the top's
    size first (the job holds it with the resize permission), then commits;
    after the pivot the export sees the whole disk through the base."""
    def nodes(work: Path) -> list[str]:
        base, top = work / "base.qcow2", work / "top.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", base, str(SIZE // 2))
        qemu_io("-f", "qcow2", "-c", "write -P 1 0 1M", base, check=True)
        qemu_img("create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, str(SIZE))
        qemu_io("-f", "qcow2", "-c", "write -P 3 1536k 1M", "-c", "write -P 5 3M 64k", top,
                check=True)
        return ["--blockdev", json.dumps({"driver": "qcow2", "node-name": "base", "file": {
                    "driver": "file", "filename": str(base)}}),
                "--blockdev", json.dumps({"driver": "qcow2", "node-name": "top",
                                          "backing": "base", "file": {
                                              "driver": "file", "filename": str(top)}}),
                "--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
                "--export", "nbd,id=e,node-name=top,name=disk,writable=on"]

    def scenario(client: QmpClient, work: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"start": client.cmd("block-commit", {
            "job-id": "j", "device": "top", "base-node": "base", "auto-dismiss": False})}
        client.wait_event("BLOCK_JOB_READY", timeout=60)
        out["ready"] = client.cmd("query-block-jobs")
        out["complete"] = client.cmd("job-complete", {"id": "j"})
        client.wait_event("JOB_STATUS_CHANGE", "concluded", timeout=30)
        out["concluded"] = client.cmd("query-block-jobs")
        out["dismiss"] = client.cmd("job-dismiss", {"id": "j"})
        out["events"] = events(client)
        out["exports"] = client.cmd("query-block-exports")
        qemu_io("-f", "raw", "-c", "write -P 7 3584k 64k",
                f"nbd+unix:///disk?socket={work}/nbd.sock", check=True)
        out["export-del"] = client.cmd("block-export-del", {"id": "e"})
        client.wait_event("BLOCK_EXPORT_DELETED", timeout=30)
        close_nodes(client, ["top", "base"])
        return out

    out = side_by_side_run(tmp_path, nodes, scenario)
    assert out["qmpd"] == out["qsd"]
    assert "error" not in out["qsd"]["concluded"]["return"][0]
    for impl in ("qmpd", "qsd"):
        base = tmp_path / impl / "base.qcow2"
        qemu_img("check", base)
        info = json.loads(qemu_img("info", "--output=json", base).stdout)
        assert info["virtual-size"] == SIZE, impl
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", tmp_path / "qmpd" / "base.qcow2",
             tmp_path / "qsd" / "base.qcow2")
