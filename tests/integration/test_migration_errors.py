"""Migration commands' errors, parameters and capabilities, against a live QEMU.

Each test sends the same commands to a qmpd and to a ``qemu-system-x86_64
-M none`` in the same state and compares the replies (and the events in
between) exactly; a few assertions then pin the texts the issue names.
getfd and migrate fd: are driven with descriptors passed over the QMP unix
socket with SCM_RIGHTS, as libvirt does.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from typing import Any

import pytest

from qmpd.migration.state import CAPABILITIES
from tests.integration.migration_helpers import (
    Cluster,
    Peer,
    create_qcow2,
    image_check,
    start,
)
from tests.support.qmp import QmpClient

pytestmark = pytest.mark.qemu("qemu-system-x86_64")

Step = tuple[str, dict[str, Any] | None]


def _for(peer: Peer, value: Any) -> Any:
    """``{kind}`` in a string argument becomes the peer's kind (separate socket paths);
    replies get ``@{kind}`` back where they show ``@qmpd`` or ``@qemu``."""
    if isinstance(value, str):
        return value.replace("{kind}", peer.kind)
    if isinstance(value, dict):
        return {k: _for(peer, v) for k, v in value.items()}
    return value


def run(peer: Peer, steps: Sequence[Step]) -> list[Any]:
    """Replies (errors with their class) and the events that came with each."""
    out: list[Any] = []
    for execute, arguments in steps:
        before = len(peer.qmp.events)
        reply = peer.qmp.cmd(execute, _for(peer, arguments))
        reply = json.loads(json.dumps(reply).replace(f"@{peer.kind}", "@{kind}"))
        events_follow = execute in ("migrate", "migrate-incoming", "migrate_cancel")
        peer.qmp.pump(0.02 if events_follow else 0)
        events = [e["event"] + ":" + str((e.get("data") or {}).get("status", ""))
                  for e in peer.qmp.events[before:]]
        out.append((execute, arguments, reply, events))
    return out


def compare(mig: Cluster, steps: Sequence[Step], *, incoming: bool = False) -> list[Any]:
    peers = {kind: mig.spawn(kind, kind, incoming="defer" if incoming else None)
             for kind in ("qemu", "qmpd")}
    start(*peers.values())
    results = {kind: run(peer, steps) for kind, peer in peers.items()}
    for got, want in zip(results["qmpd"], results["qemu"], strict=True):
        assert got == want, b"\n".join(peers["qemu"].qmp.transcript).decode()
    return results["qmpd"]


def desc(result: Any) -> str:
    return str(result[2]["error"]["desc"])


PARAMETER_STEPS: list[Step] = [
    ("query-migrate-parameters", None),
    ("query-migrate-capabilities", None),
    *[("migrate-set-parameters", p) for p in (
        {"downtime-limit": 3000000}, {"downtime-limit": 2000001}, {"downtime-limit": -1},
        {"downtime-limit": "x"}, {"downtime-limit": 2000000},
        {"cpu-throttle-initial": 0}, {"cpu-throttle-initial": 300}, {"cpu-throttle-initial": 100},
        {"cpu-throttle-increment": 0}, {"cpu-throttle-increment": 100},
        {"announce-initial": 100001}, {"announce-initial": -1}, {"announce-max": 100001},
        {"announce-rounds": 1001}, {"announce-step": 0}, {"announce-step": 10001},
        {"xbzrle-cache-size": 1000}, {"xbzrle-cache-size": 8193}, {"xbzrle-cache-size": -4096},
        {"max-cpu-throttle": 100}, {"max-cpu-throttle": 10}, {"max-cpu-throttle": 0},
        {"compress-level": 10}, {"compress-level": -1}, {"compress-threads": 0},
        {"compress-threads": 256}, {"decompress-threads": 0},
        {"throttle-trigger-threshold": 0}, {"throttle-trigger-threshold": 101},
        {"multifd-channels": 0}, {"multifd-zlib-level": 10}, {"multifd-zstd-level": 21},
        {"multifd-zlib-level": 5}, {"max-bandwidth": 18446744073709551616},
        {"x-checkpoint-delay": -1}, {"multifd-compression": "bogus"}, {"bogus": 1},
        {"cpu-throttle-initial": 50, "max-cpu-throttle": 40},
        {"max-cpu-throttle": 30, "cpu-throttle-initial": 40},
    )],
    ("query-migrate-parameters", None),
    *[("migrate-set-parameters", p) for p in (
        {"max-bandwidth": -1}, {"max-postcopy-bandwidth": -5}, {"tls-creds": None},
        {"tls-hostname": "h"}, {"tls-authz": None}, {"cpu-throttle-initial": 99},
        {"xbzrle-cache-size": 8192}, {"announce-initial": 40, "announce-max": 30},
        {"multifd-compression": "zstd"}, {"x-checkpoint-delay": 0},
        {"block-incremental": True}, {"cpu-throttle-tailslow": True},
        {"compress-wait-thread": False}, {"downtime-limit": 0},
    )],
    ("query-migrate-parameters", None),
]


def test_parameters_like_qemu(mig: Cluster) -> None:
    results = compare(mig, PARAMETER_STEPS)
    texts = {desc(r) for r in results if "error" in r[2]}
    for text in (
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
        "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
        "Parameter 'announce_initial' expects a value between 0 and 100000",
        "Parameter 'announce_step' expects a value between 0 and 10000",
        "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size",
        "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
    ):
        assert text in texts
    assert results[-1][2]["return"]["max-bandwidth"] == 18446744073709551615


CAPABILITY_STEPS: list[Step] = [
    *[("migrate-set-capabilities", {"capabilities": caps}) for caps in (
        [{"capability": "bogus", "state": True}],
        [{"capability": "events", "state": "yes"}],
        [{"capability": "events"}],
        [],
        [{"capability": "postcopy-preempt", "state": True}],
        [{"capability": "zero-copy-send", "state": True}],
        [{"capability": "multifd", "state": True}, {"capability": "compress", "state": True}],
        [{"capability": "postcopy-ram", "state": True},
         {"capability": "x-ignore-shared", "state": True}],
        [{"capability": "background-snapshot", "state": True},
         {"capability": "xbzrle", "state": True}, {"capability": "return-path", "state": True}],
        [{"capability": "postcopy-preempt", "state": True},
         {"capability": "postcopy-ram", "state": True}, {"capability": "compress", "state": True}],
        [{"capability": "postcopy-ram", "state": True}, {"capability": "compress", "state": True}],
        [{"capability": "late-block-activate", "state": True},
         {"capability": "late-block-activate", "state": False}],
        [{"capability": "multifd", "state": True}, {"capability": "zero-copy-send", "state": True}],
    )],
    ("query-migrate-capabilities", None),
    ("migrate-set-parameters", {"multifd-compression": "zlib"}),
    ("migrate-set-parameters", {"tls-creds": "x"}),
    ("query-migrate-parameters", None),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": c, "state": False} for c in CAPABILITIES]}),
    ("migrate-set-capabilities", {"capabilities": [
        {"capability": c, "state": True} for c in ("events", "return-path", "xbzrle",
                                                   "pause-before-switchover", "block")]}),
    ("query-migrate-capabilities", None),
]


def test_capabilities_like_qemu(mig: Cluster) -> None:
    results = compare(mig, CAPABILITY_STEPS)
    texts = [desc(r) for r in results if "error" in r[2]]
    assert "Parameter 'capability' does not accept value 'bogus'" in texts
    assert "Postcopy preempt requires postcopy-ram" in texts


def test_every_capability_pair_like_qemu(mig: Cluster) -> None:
    """Each capability alone and with every other one, from all-off each time."""
    steps: list[Step] = []
    off = {"capabilities": [{"capability": c, "state": False} for c in CAPABILITIES]}
    for i, first in enumerate(CAPABILITIES):
        for second in (None, *CAPABILITIES[i + 1:]):
            caps = [{"capability": first, "state": True}]
            if second is not None:
                caps.append({"capability": second, "state": True})
            steps += [("migrate-set-capabilities", {"capabilities": caps}),
                      ("migrate-set-capabilities", off)]
    results = compare(mig, steps)
    assert sum("error" in r[2] for r in results) > 50


def test_command_errors_like_qemu(mig: Cluster) -> None:
    missing = str(mig.dir / "no" / "such" / "dir" / "sock")
    results = compare(mig, [
        ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}),
        ("query-migrate", None),
        ("migrate-incoming", {"uri": "unix:/tmp/x"}),
        ("migrate-continue", {"state": "pre-switchover"}),
        ("migrate_cancel", None),
        ("migrate", {"uri": "bogus:x"}),
        ("query-migrate", None),
        ("migrate", {"uri": "tcp:1.2.3.4"}),
        ("query-migrate", None),
        ("migrate", {"uri": "unix:"}),
        ("migrate", {"uri": "fd:nosuch"}),
        ("query-migrate", None),
        ("migrate", {"uri": "unix:/x", "resume": True}),
        ("migrate", {"uri": f"unix:{missing}"}),
        ("query-migrate", None),
        ("getfd", {"fdname": "mig"}),
        ("getfd", {"fdname": "0mig"}),
        ("closefd", {"fdname": "mig"}),
        ("migrate-set-parameters", {"downtime-limit": 100}),
        ("query-status", None),
    ])
    texts = [desc(r) for r in results if "error" in r[2]]
    assert "'-incoming' was not specified on the command line" in texts
    assert "Parameter 'uri' expects a valid migration protocol" in texts
    assert "Migration not in expected state: none" in texts
    bad = next(r for r in results if r[1] == {"uri": "bogus:x"})
    assert bad[3] == ["MIGRATION:setup", "MIGRATION:failed"]


def test_incoming_errors_like_qemu(mig: Cluster) -> None:
    sock = str(mig.dir / "in.sock")
    results = compare(mig, [
        ("query-status", None),
        ("migrate", {"uri": "unix:/tmp/x"}),
        ("migrate-incoming", {"uri": "bogus:x"}),
        ("query-migrate", None),
        ("migrate-incoming", {"uri": "tcp:1.2.3.4"}),
        ("migrate-incoming", {"uri": "unix:"}),
        ("migrate-incoming", {"uri": "fd:nosuch"}),
        ("migrate-incoming", {"uri": "tcp:nosuch.invalid:0"}),
        ("migrate-incoming", {"uri": "tcp:127.0.0.1:notaport"}),
        ("query-migrate", None),
        ("migrate-incoming", {"uri": f"unix:{sock}@{{kind}}"}),
        ("query-migrate", None),
        ("migrate-incoming", {"uri": f"unix:{sock}"}),
        ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}),
        ("migrate_cancel", None),
        ("query-status", None),
    ], incoming=True)
    texts = [desc(r) for r in results if "error" in r[2]]
    assert "Guest is waiting for an incoming migration" in texts
    assert "The incoming migration has already been started" in texts
    started = next(r for r in results if r[1] == {"uri": f"unix:{sock}@{{kind}}"})
    assert started[3] == ["MIGRATION:setup"]  # even with the events capability off
    refused = next(r for r in results if r[1] == {"uri": "bogus:x"})
    assert refused[2]["error"]["desc"] == "unknown migration protocol: bogus:x"
    assert refused[3] == ["MIGRATION:setup"]  # even for a refused URI


def test_incoming_tcp_addresses_like_qemu(mig: Cluster) -> None:
    """query-migrate's socket-address on a waiting destination, per tcp: form."""
    uris = ["tcp:127.0.0.1:0", "tcp::0", "tcp:[::1]:0", "tcp:localhost:0"]
    peers = {(kind, uri): mig.spawn(kind, f"{kind}{i}", incoming="defer")
             for kind in ("qemu", "qmpd") for i, uri in enumerate(uris)}
    start(*peers.values())
    seen: dict[str, list[Any]] = {"qemu": [], "qmpd": []}
    for (kind, uri), peer in peers.items():
        reply = peer.qmp.cmd("migrate-incoming", {"uri": uri})
        info = peer.migrate_info()
        for addr in info.get("socket-address", []):
            assert addr["port"].isdigit() and addr["port"] != "0"
            addr["port"] = "<port>"
        seen[kind].append((uri, reply, json.dumps(info)))
    assert seen["qmpd"] == seen["qemu"]


def test_getfd_and_migrate_fd_over_scm_rights(mig: Cluster) -> None:
    """A socketpair's ends handed to both sides with getfd, then migrate fd:NAME."""
    results = {}
    for kind in ("qemu", "qmpd"):
        image = create_qcow2(mig.dir / f"{kind}.qcow2", "64M")
        src = mig.spawn(kind, f"{kind}-src")
        dst = mig.spawn(kind, f"{kind}-dst", incoming="defer")
        start(src, dst)
        for side in (src, dst):
            side.caps(events=True)
        src.add_disk(image)
        assert src.qemu_io("disk", "write -P 0x3c 0 64k") == ""
        dst.add_disk(image)
        a, b = socket.socketpair()
        with a, b:
            assert src.ok("getfd", {"fdname": "mig"}, fds=[a.fileno()]) == {}
            assert dst.ok("getfd", {"fdname": "mig"}, fds=[b.fileno()]) == {}
        c, d = socket.socketpair()
        with c, d:
            assert src.err("getfd", {"fdname": "0spare"}, fds=[c.fileno()]) == (
                "Parameter 'fdname' expects a name not starting with a digit")
            assert src.ok("getfd", {"fdname": "spare"}, fds=[c.fileno()]) == {}
            # A second getfd under the same name replaces (and closes) the first.
            assert src.ok("getfd", {"fdname": "spare"}, fds=[d.fileno()]) == {}
            assert src.ok("closefd", {"fdname": "spare"}) == {}
        assert src.err("closefd", {"fdname": "spare"}) == "File descriptor named 'spare' not found"
        assert dst.ok("migrate-incoming", {"uri": "fd:mig"}) == {}
        assert src.ok("migrate", {"uri": "fd:mig"}) == {}
        src_info = src.wait_migration()
        assert dst.wait_migration() == {"status": "completed"}
        dst.qmp.wait_event("MIGRATION", "completed")
        # The descriptor was used up by the migration.
        assert src.err("closefd", {"fdname": "mig"}) == "File descriptor named 'mig' not found"
        assert dst.qemu_io("disk", "read -P 0x3c 0 64k") == ""
        results[kind] = (src_info["status"], src.qmp.names(), dst.qmp.names(),
                         src.status(), dst.status(), dst.holds_write(image))
        src.quit()
        dst.quit()
        image_check(image)
    assert results["qmpd"] == results["qemu"]
    assert results["qmpd"][0] == "completed"


def test_block_migration_is_refused(mig: Cluster) -> None:
    """A deliberate difference: shared storage makes block migration pointless."""
    peer = mig.spawn("qmpd", "qmpd").ready()
    text = ("qmpd migrates over shared storage: block migration (blk, inc, the 'block' "
            "capability) is not supported")
    assert peer.err("migrate", {"uri": "unix:/tmp/x", "blk": True}) == text
    assert peer.err("migrate", {"uri": "unix:/tmp/x", "inc": True}) == text
    peer.caps(block=True)
    assert peer.err("migrate", {"uri": "unix:/tmp/x"}) == text
    assert peer.status() == "running"


def test_oob_migrate_pause_overtakes_queued_requests(mig: Cluster) -> None:
    """exec-oob of an OOB-capable command is answered as soon as it is parsed,
    before in-band requests that arrived ahead of it (one write, one read)."""
    peer = mig.spawn("qmpd", "qmpd").ready()
    client = QmpClient(peer.qmp_path)
    try:
        assert client.greeting["QMP"]["capabilities"] == ["oob"]
        assert client.cmd("qmp_capabilities", {"enable": ["oob"]}) == {"return": {}}
        client.send(b'{"execute": "query-status", "id": 1}'
                    b'{"execute": "query-migrate", "id": 2}'
                    b'{"exec-oob": "migrate-pause", "id": 3}'
                    b'{"exec-oob": "migrate-recover", "arguments": {"uri": "x"}, "id": 4}\n')
        replies = [client.recv() for _ in range(4)]
    finally:
        client.close()
    assert [r["id"] for r in replies] == [3, 4, 1, 2]
    assert replies[0]["error"]["desc"] == (
        "migrate-pause is currently only supported during postcopy-active state")
    assert replies[1]["error"]["desc"] == (
        "Migrate recover can only be run when postcopy is paused.")
