"""Dirty bitmaps across a handover with the dirty-bitmaps capability: QEMU 7.2
and qmpd in every pairing, the bitmaps bit for bit (QEMU's own sha256) and
still recording on the destination."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.migration_helpers import Cluster, Peer, short_dir, start

pytestmark = pytest.mark.qemu("qemu-system-x86_64")

SIZE = 64 << 20


@pytest.fixture
def work() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def disk(kind: str) -> list[str]:
    spec = f"null-co,node-name=disk0,size={SIZE}"
    return ["-blockdev", spec] if kind == "qemu" else ["--blockdev", spec]


def bitmaps(peer: Peer) -> dict[str, Any]:
    """name -> (granularity, recording, busy, persistent, count, sha256)."""
    node = next(n for n in peer.ok("query-named-block-nodes") if n["node-name"] == "disk0")
    return {b["name"]: (b["granularity"], b["recording"], b["busy"], b["persistent"],
                        b["count"], peer.ok("x-debug-block-dirty-bitmap-sha256",
                                            {"node": "disk0", "name": b["name"]})["sha256"])
            for b in node.get("dirty-bitmaps", [])}


@pytest.mark.parametrize(("src_kind", "dst_kind"), [
    ("qemu", "qmpd"), ("qmpd", "qemu"), ("qmpd", "qmpd"), ("qemu", "qemu")])
def test_bitmaps_travel_and_keep_recording(work: Path, src_kind: str, dst_kind: str) -> None:
    cluster = Cluster(work)
    try:
        src = cluster.spawn(src_kind, "src", extra=disk(src_kind))
        dst = cluster.spawn(dst_kind, "dst", incoming="defer", extra=disk(dst_kind))
        start(src, dst)
        for side in (src, dst):
            side.caps(events=True, dirty_bitmaps=True)
        src.ok("block-dirty-bitmap-add", {"node": "disk0", "name": "fine", "granularity": 4096})
        src.ok("block-dirty-bitmap-add", {"node": "disk0", "name": "coarse",
                                          "granularity": 1 << 20})
        src.ok("block-dirty-bitmap-add", {"node": "disk0", "name": "off", "disabled": True})
        for command in ("write 0 4k", "write 40M 3M", f"write {SIZE - 512} 512"):
            assert src.qemu_io("disk0", command) == ""
        src.ok("block-dirty-bitmap-merge", {"node": "disk0", "target": "off",
                                            "bitmaps": ["fine"]})
        before = bitmaps(src)
        uri = f"unix:{work / 'mig.sock'}"
        dst.ok("migrate-incoming", {"uri": uri})
        src.ok("migrate", {"uri": uri})
        assert src.wait_migration()["status"] == "completed"
        assert dst.wait_migration()["status"] == "completed"
        dst.qmp.wait_event("RESUME")
        after = bitmaps(dst)
        assert after == before
        # Made in the order they come (the source's, newest first), they are
        # listed the other way round (QEMU 7.2 does the same).
        assert list(after) == list(reversed(before))
        # The source keeps its bitmaps, no longer busy.
        assert bitmaps(src) == before
        # Enabled bitmaps record on the destination; the disabled one does not.
        assert dst.qemu_io("disk0", "write 20M 64k") == ""
        now = bitmaps(dst)
        assert now["fine"][4] == before["fine"][4] + (64 << 10)
        assert now["coarse"][4] == before["coarse"][4] + (1 << 20)
        assert now["off"] == before["off"]
    finally:
        cluster.close()


def test_an_existing_bitmap_on_the_destination_fails_the_migration(work: Path) -> None:
    cluster = Cluster(work)
    try:
        src = cluster.spawn("qmpd", "src", extra=disk("qmpd"))
        dst = cluster.spawn("qmpd", "dst", incoming="defer", extra=disk("qmpd"))
        start(src, dst)
        for side in (src, dst):
            side.caps(events=True, dirty_bitmaps=True)
        for side in (src, dst):
            side.ok("block-dirty-bitmap-add", {"node": "disk0", "name": "b"})
        uri = f"unix:{work / 'mig.sock'}"
        dst.ok("migrate-incoming", {"uri": uri})
        src.ok("migrate", {"uri": uri})
        # As QEMU's, a destination whose load fails exits with status 1.
        assert dst.wait() == 1
        assert dst.stderr().splitlines()[:3] == [
            "qmpd: error: Bitmap with the same name ('b') already exists on destination",
            "qmpd: error: error while loading state for instance 0x0 of device 'dirty-bitmap'",
            "qmpd: error: load of migration failed: Invalid argument"]
    finally:
        cluster.close()


def test_a_bitmap_that_may_not_travel_fails_the_migration_at_setup(work: Path) -> None:
    cluster = Cluster(work)
    try:
        src = cluster("qmpd", "src", extra=["--blockdev", "raw,node-name=top,file.driver=null-co"])
        src.caps(events=True, dirty_bitmaps=True)
        hidden = next(n["node-name"] for n in src.ok("query-named-block-nodes")
                      if n["node-name"].startswith("#"))
        src.ok("block-dirty-bitmap-add", {"node": hidden, "name": "b"})
        src.ok("migrate", {"uri": f"exec:cat > {work / 'out.bin'}"})
        info = src.wait_migration()
        assert info == {"status": "failed"}
        assert src.status() == "running"
        assert (f"Bitmap 'b' in a node with auto-generated name '{hidden}' can't be migrated"
                in src.stderr())
        names = [e["data"]["status"] for e in src.qmp.events if e["event"] == "MIGRATION"]
        assert names == ["setup", "active", "failed"]
    finally:
        cluster.close()


def named_disk(kind: str, name: str) -> list[str]:
    spec = f"null-co,node-name={name},size={SIZE}"
    return ["-blockdev", spec] if kind == "qemu" else ["--blockdev", spec]


@pytest.mark.parametrize(("src_kind", "dst_kind"), [
    ("qemu", "qmpd"), ("qmpd", "qemu"), ("qmpd", "qmpd")])
def test_block_bitmap_mapping_renames_as_in_qemu(work: Path, src_kind: str,
                                                  dst_kind: str) -> None:
    """Node and bitmap aliases on both sides, a persistence transform, and a
    bitmap left out of the mapping (not sent)."""
    cluster = Cluster(work)
    try:
        src = cluster.spawn(src_kind, "src", extra=named_disk(src_kind, "here"))
        dst = cluster.spawn(dst_kind, "dst", incoming="defer",
                            extra=named_disk(dst_kind, "there"))
        start(src, dst)
        for side in (src, dst):
            side.caps(events=True, dirty_bitmaps=True)
        src.params(block_bitmap_mapping=[{"node-name": "here", "alias": "disk", "bitmaps": [
            {"name": "a", "alias": "wire-a", "transform": {"persistent": False}},
            {"name": "b", "alias": "wire-b"}]}])
        dst.params(block_bitmap_mapping=[{"node-name": "there", "alias": "disk", "bitmaps": [
            {"name": "a2", "alias": "wire-a"}, {"name": "b2", "alias": "wire-b"}]}])
        for name in ("a", "b", "left-out"):
            src.ok("block-dirty-bitmap-add", {"node": "here", "name": name})
        assert src.qemu_io("here", "write 1M 64k") == ""
        sums = {name: src.ok("x-debug-block-dirty-bitmap-sha256",
                             {"node": "here", "name": name})["sha256"] for name in ("a", "b")}
        uri = f"unix:{work / 'mig.sock'}"
        dst.ok("migrate-incoming", {"uri": uri})
        src.ok("migrate", {"uri": uri})
        assert src.wait_migration()["status"] == "completed"
        assert dst.wait_migration()["status"] == "completed"
        node = next(n for n in dst.ok("query-named-block-nodes") if n["node-name"] == "there")
        assert sorted(b["name"] for b in node["dirty-bitmaps"]) == ["a2", "b2"]
        for ours, theirs in (("a", "a2"), ("b", "b2")):
            assert dst.ok("x-debug-block-dirty-bitmap-sha256",
                          {"node": "there", "name": theirs})["sha256"] == sums[ours]
    finally:
        cluster.close()


@pytest.mark.parametrize("mapping", [
    [{"node-name": "n", "alias": "1bad", "bitmaps": []}],
    [{"node-name": "n", "alias": "a", "bitmaps": []},
     {"node-name": "n", "alias": "b", "bitmaps": []}],
    [{"node-name": "n", "alias": "a", "bitmaps": []},
     {"node-name": "m", "alias": "a", "bitmaps": []}],
    [{"node-name": "n", "alias": "a", "bitmaps": [{"name": "x", "alias": "y"},
                                                  {"name": "x", "alias": "z"}]}],
    [{"node-name": "n", "alias": "a", "bitmaps": [{"name": "x", "alias": "y"},
                                                  {"name": "w", "alias": "y"}]}],
    [{"node-name": "n" * 32, "alias": "a", "bitmaps": []}],
], ids=["not-well-formed", "node-twice", "alias-twice", "bitmap-twice", "bitmap-alias-twice",
        "long-node-name"])
def test_a_mapping_qemu_refuses_is_refused_alike(work: Path, mapping: list[Any]) -> None:
    cluster = Cluster(work)
    try:
        peers = [cluster.spawn(kind, kind) for kind in ("qemu", "qmpd")]
        start(*peers)
        texts = [peer.err("migrate-set-parameters", {"block-bitmap-mapping": mapping})
                 for peer in peers]
        assert texts[0] == texts[1]
    finally:
        cluster.close()
