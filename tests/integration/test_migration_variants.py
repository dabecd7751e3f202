"""Migration variants, each run on a qmpd pair and on a QEMU pair and compared.

-S then cont, late-block-activate, stop during incoming, cont on a waiting
destination, pause-before-switchover then migrate-continue, and a chain
A -> B -> C; the write lock is watched (one holder at any moment) and who
holds it is checked at each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.migration_helpers import (
    Cluster,
    LockWatcher,
    Peer,
    create_qcow2,
    image_check,
    info_is_locked,
    start,
    writers,
)

pytestmark = pytest.mark.qemu("qemu-system-x86_64")


def pair(mig: Cluster, kind: str, image: Path, *, dst_paused: bool = False,
         dst_caps: dict[str, bool] | None = None, src_caps: dict[str, bool] | None = None,
         ) -> tuple[Peer, Peer, str]:
    src = mig.spawn(kind, f"{kind}-src")
    dst = mig.spawn(kind, f"{kind}-dst", incoming="defer", paused=dst_paused)
    start(src, dst)
    src.caps(events=True, **(src_caps or {}))
    dst.caps(events=True, **(dst_caps or {}))
    src.add_disk(image)
    assert src.qemu_io("disk", "write -P 0x41 0 64k") == ""
    dst.add_disk(image)
    uri = f"unix:{mig.dir / (kind + '-mig.sock')}"
    dst.ok("migrate-incoming", {"uri": uri})
    return src, dst, uri


def holder(image: Path, *peers: Peer) -> str | None:
    names = writers(image, peers)
    assert len(names) <= 1, names
    if not names:
        assert not info_is_locked(image)
        return None
    assert info_is_locked(image)
    return names[0].split("-", 1)[1]


def both(mig: Cluster, scenario: Callable[[Cluster, str, Path], dict[str, Any]]
         ) -> dict[str, Any]:
    """Run ``scenario`` for QEMU, then for qmpd, on separate images; compare."""
    results = {}
    for kind in ("qemu", "qmpd"):
        image = create_qcow2(mig.dir / f"{kind}.qcow2", "1G")
        results[kind] = scenario(mig, kind, image)
        for peer in mig.peers:
            if peer.kind == kind:
                peer.quit()
        image_check(image)
    assert results["qmpd"] == results["qemu"]
    return results["qmpd"]


def finish(src: Peer, dst: Peer) -> None:
    assert src.wait_migration()["status"] == "completed"
    assert dst.wait_migration()["status"] == "completed"
    dst.qmp.wait_event("MIGRATION", "completed")


def test_destination_started_with_S_then_cont(mig: Cluster) -> None:
    def scenario(mig: Cluster, kind: str, image: Path) -> dict[str, Any]:
        src, dst, uri = pair(mig, kind, image, dst_paused=True)
        obs: dict[str, Any] = {}
        with LockWatcher(image, src, dst):
            src.ok("migrate", {"uri": uri})
            finish(src, dst)
            # QEMU 7.2 activates at completion even with -S.
            obs["after"] = (src.status(), dst.status(), holder(image, src, dst))
            obs["dst-events"] = dst.qmp.names()
            assert dst.ok("cont") == {}
            obs["cont"] = (dst.status(), dst.qmp.names()[-1], holder(image, src, dst))
        assert dst.qemu_io("disk", "read -P 0x41 0 64k") == ""
        assert dst.qemu_io("disk", "write -P 0x42 64k 64k") == ""
        return obs

    obs = both(mig, scenario)
    assert obs["after"] == ("postmigrate", "paused", "dst")
    assert "RESUME" not in obs["dst-events"]
    assert obs["cont"] == ("running", "RESUME", "dst")


@pytest.mark.parametrize("dst_paused", [True, False])
def test_late_block_activate(mig: Cluster, dst_paused: bool) -> None:
    def scenario(mig: Cluster, kind: str, image: Path) -> dict[str, Any]:
        src, dst, uri = pair(mig, kind, image, dst_paused=dst_paused,
                             dst_caps={"late-block-activate": True})
        obs: dict[str, Any] = {}
        with LockWatcher(image, src, dst):
            src.ok("migrate", {"uri": uri})
            finish(src, dst)
            # With -S nobody holds the image until cont; without, no effect.
            obs["after"] = (src.status(), dst.status(), holder(image, src, dst))
            obs["dst-events"] = dst.qmp.names()
            assert dst.ok("cont") == {}
            obs["cont"] = (dst.status(), holder(image, src, dst))
        assert dst.qemu_io("disk", "write -P 0x42 64k 64k") == ""
        return obs

    obs = both(mig, scenario)
    if dst_paused:
        assert obs["after"] == ("postmigrate", "paused", None)
    else:
        assert obs["after"] == ("postmigrate", "running", "dst")
    assert obs["cont"] == ("running", "dst")


def test_stop_during_incoming(mig: Cluster) -> None:
    def scenario(mig: Cluster, kind: str, image: Path) -> dict[str, Any]:
        src, dst, uri = pair(mig, kind, image)
        obs: dict[str, Any] = {}
        assert dst.ok("stop") == {}  # only remembered: no event, still inmigrate
        obs["stopped"] = (dst.status(), dst.qmp.names())
        with LockWatcher(image, src, dst):
            src.ok("migrate", {"uri": uri})
            finish(src, dst)
            # Paused, but the images were activated (fact 40).
            obs["after"] = (src.status(), dst.status(), holder(image, src, dst))
            obs["dst-events"] = dst.qmp.names()
            assert dst.ok("cont") == {}
            obs["cont"] = (dst.status(), dst.qmp.names()[-1])
        return obs

    obs = both(mig, scenario)
    assert obs["stopped"] == ("inmigrate", ["MIGRATION:setup"])
    assert obs["after"] == ("postmigrate", "paused", "dst")
    assert obs["cont"] == ("running", "RESUME")


def test_cont_on_a_waiting_destination(mig: Cluster) -> None:
    """7.2's cont activates even in inmigrate: refused while the source holds the image."""
    def scenario(mig: Cluster, kind: str, image: Path) -> dict[str, Any]:
        src, dst, uri = pair(mig, kind, image, dst_paused=True)
        obs: dict[str, Any] = {"cont": dst.err("cont"), "status": dst.status()}
        with LockWatcher(image, src, dst):
            src.ok("migrate", {"uri": uri})
            finish(src, dst)
            obs["after"] = (dst.status(), holder(image, src, dst), dst.qmp.names())
        # Without block nodes, cont is accepted and arms autostart.
        empty = mig.spawn(kind, f"{kind}-empty", incoming="defer", paused=True).ready()
        empty.caps(events=True)
        assert empty.ok("cont") == {}
        obs["empty"] = (empty.status(), empty.qmp.names())
        uri2 = f"unix:{mig.dir / (kind + '-mig2.sock')}"
        empty.ok("migrate-incoming", {"uri": uri2})
        other = mig.spawn(kind, f"{kind}-other").ready()
        other.ok("migrate", {"uri": uri2})
        assert empty.wait_migration()["status"] == "completed"
        empty.qmp.wait_event("MIGRATION", "completed")
        obs["empty-after"] = (empty.status(), empty.qmp.names())
        return obs

    obs = both(mig, scenario)
    assert obs["cont"] == 'Failed to get "write" lock' and obs["status"] == "inmigrate"
    assert obs["after"][:2] == ("paused", "dst")
    assert obs["empty-after"][0] == "running"


def test_pause_before_switchover_then_continue(mig: Cluster) -> None:
    def scenario(mig: Cluster, kind: str, image: Path) -> dict[str, Any]:
        src, dst, uri = pair(mig, kind, image, src_caps={"pause-before-switchover": True})
        obs: dict[str, Any] = {}
        with LockWatcher(image, src, dst):
            src.ok("migrate", {"uri": uri})
            src.qmp.wait_event("MIGRATION", "pre-switchover")
            time.sleep(0.05)
            info = src.migrate_info()
            obs["paused"] = (info["status"], sorted(info), src.status(),
                             dst.migrate_info()["status"], dst.status(),
                             holder(image, src, dst))
            obs["cont"] = src.err("cont")
            obs["wrong-state"] = src.err("migrate-continue", {"state": "active"})
            obs["in-progress"] = src.err("migrate", {"uri": uri})
            obs["caps"] = src.err("migrate-set-capabilities",
                                  {"capabilities": [{"capability": "events", "state": True}]})
            assert src.ok("migrate-continue", {"state": "pre-switchover"}) == {}
            finish(src, dst)
            obs["again"] = src.err("migrate-continue", {"state": "pre-switchover"})
        obs["after"] = (src.status(), dst.status(), holder(image, src, dst))
        # Events only: QEMU's migration thread races its monitor, so its
        # 'device' may come before or after migrate-continue's reply.
        obs["src-events"] = src.qmp.names()
        obs["dst-events"] = dst.qmp.names()
        if kind == "qmpd":
            replies = src.qmp.names(replies=True)
            at = replies.index("MIGRATION:pre-switchover")
            assert replies[at:at + 6] == [
                "MIGRATION:pre-switchover", "<cont>", "<migrate-continue>", "<migrate>",
                "<migrate-set-capabilities>", "<migrate-continue>"]
        return obs

    obs = both(mig, scenario)
    # Held in pre-switchover: stopped, but still the holder of the image.
    assert obs["paused"][2:] == ("finish-migrate", "active", "inmigrate", "src")
    assert obs["cont"] == "Migration is not finalized yet"
    events = obs["src-events"]
    assert events[-5:] == ["STOP", "MIGRATION:pre-switchover", "MIGRATION:device",
                           "MIGRATION_PASS:2", "MIGRATION:completed"]


def test_chain_a_b_c(mig: Cluster) -> None:
    def scenario(mig: Cluster, kind: str, image: Path) -> dict[str, Any]:
        a = mig.spawn(kind, f"{kind}-a")
        b = mig.spawn(kind, f"{kind}-b", incoming="defer")
        c = mig.spawn(kind, f"{kind}-c", incoming="defer")
        start(a, b, c)
        for peer in (a, b, c):
            peer.caps(events=True)
        a.add_disk(image)
        b.add_disk(image)
        c.add_disk(image)  # C opens the image before either hop
        obs: dict[str, Any] = {}
        assert a.qemu_io("disk", "write -P 0x61 0 64k") == ""
        assert a.qemu_io("disk", "write -P 0x62 300M 64k") == ""
        for src, dst, tag, write in ((a, b, "ab", "write -P 0x63 600M 64k"),
                                     (b, c, "bc", "write -P 0x64 900M 64k")):
            uri = f"unix:{mig.dir / (kind + tag)}"
            dst.ok("migrate-incoming", {"uri": uri})
            with LockWatcher(image, src, dst):
                src.ok("migrate", {"uri": uri})
                finish(src, dst)
            obs[tag] = (src.status(), dst.status(), holder(image, a, b, c),
                        src.qmp.names(), dst.qmp.names())
            assert dst.qemu_io("disk", write) == ""
        for check in ("read -P 0x61 0 64k", "read -P 0x62 300M 64k",
                      "read -P 0x63 600M 64k", "read -P 0x64 900M 64k"):
            assert c.qemu_io("disk", check) == ""
        time.sleep(0.05)
        assert "Pattern verification failed" not in c.stdout()
        assert c.stdout().count("read 65536/65536") == 4
        obs["b-again"] = b.err("migrate", {"uri": "unix:/nonexistent"})
        return obs

    obs = both(mig, scenario)
    assert obs["ab"][:3] == ("postmigrate", "running", "b")
    assert obs["bc"][:3] == ("postmigrate", "running", "c")


@pytest.mark.slow
def test_long_chain(mig: Cluster) -> None:
    """Eight hops on one image, a write at each; the last hop reads them all."""
    hops = 8
    image = create_qcow2(mig.dir / "chain.qcow2", "2G")
    peers = [mig.spawn("qmpd", f"qmpd-h{i}", incoming=None if i == 0 else "defer")
             for i in range(hops + 1)]
    start(*peers)
    for peer in peers:
        peer.caps(events=True)
        peer.add_disk(image)
    assert peers[0].qemu_io("disk", "write -P 0x10 0 64k") == ""
    for i in range(hops):
        src, dst = peers[i], peers[i + 1]
        uri = f"unix:{mig.dir / f'hop{i}'}"
        dst.ok("migrate-incoming", {"uri": uri})
        with LockWatcher(image, src, dst):
            src.ok("migrate", {"uri": uri})
            finish(src, dst)
        assert holder(image, *peers) == f"h{i + 1}"
        assert dst.qemu_io("disk", f"write -P {0x11 + i:#x} {(i + 1) * 200}M 64k") == ""
        src.quit()
    last = peers[-1]
    assert last.qemu_io("disk", "read -P 0x10 0 64k") == ""
    for i in range(hops):
        assert last.qemu_io("disk", f"read -P {0x11 + i:#x} {(i + 1) * 200}M 64k") == ""
    time.sleep(0.05)
    assert "Pattern verification failed" not in last.stdout()
    last.quit()
    image_check(image)


def test_activation_failure_on_destination(mig: Cluster) -> None:
    """A third process holds one of the destination's images: activation fails.

    Both stay paused with the migration completed and retry on cont.  qmpd
    also says why in query-migrate and gives back the locks of the images that
    did activate (QEMU 7.2 keeps those active: see the end of this test)."""
    results = {}
    locks_held = {}
    for kind in ("qemu", "qmpd"):
        a = create_qcow2(mig.dir / f"{kind}-a.qcow2", "1G")
        b = create_qcow2(mig.dir / f"{kind}-b.qcow2", "1G")
        src = mig.spawn(kind, f"{kind}-src")
        dst = mig.spawn(kind, f"{kind}-dst", incoming="defer")
        other = mig.spawn("qmpd", f"{kind}-other")
        start(src, dst, other)
        for side in (src, dst):
            side.caps(events=True)
        src.add_disk(a, "da")
        assert src.qemu_io("da", "write -P 0x51 0 64k") == ""
        dst.add_disk(a, "da")
        dst.add_disk(b, "db")
        other.add_disk(b, "db")
        uri = f"unix:{mig.dir / (kind + '.sock')}"
        dst.ok("migrate-incoming", {"uri": uri})
        src.ok("migrate", {"uri": uri})
        assert src.wait_migration()["status"] == "completed"
        info = dst.wait_migration()
        dst.qmp.wait_event("MIGRATION", "completed")
        locks_held[kind] = (dst.holds_write(a), dst.holds_write(b))
        failed_cont = dst.err("cont")
        status = dst.status()
        other.quit()
        assert dst.ok("cont") == {}
        results[kind] = (info["status"], dst.qmp.names(), failed_cont, status, dst.status(),
                         dst.holds_write(a), dst.holds_write(b))
        assert dst.qemu_io("da", "read -P 0x51 0 64k") == ""
        if kind == "qmpd":
            assert info == {"status": "completed", "error-desc":
                            'Could not activate block devices: Failed to get "write" lock'}
    assert results["qmpd"] == results["qemu"]
    assert results["qmpd"][2:] == ('Failed to get "write" lock', "paused", "running", True, True)
    assert locks_held == {"qemu": (True, False), "qmpd": (False, False)}
