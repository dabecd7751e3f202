"""Dirty bitmaps side by side with qemu-storage-daemon 7.2 (issue 11).

Both daemons run the same command line (null-co nodes exported over NBD);
the same writes go through qemu-io over NBD to each, the same commands go
to each, and every reply is compared: the bitmaps' SHA-256, counts and
``query-named-block-nodes`` entries, the error texts of every refusal, and
what a failing ``transaction`` leaves behind (nothing).
"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess
from tests.support.qmp import QmpClient
from tests.support.qsd import QsdMonitor, side_by_side
from tests.support.tools import QSD, qemu_io, require_tool

pytestmark = pytest.mark.qemu

#: Not a multiple of any granularity used: the last granule is partial.
SIZE = 8 * 1024 * 1024 + 3 * 512
NODES = ["--blockdev", f"null-co,node-name=n0,size={SIZE}",
         "--blockdev", f"null-co,node-name=n1,size={SIZE}",
         "--blockdev", "null-co,node-name=small,size=1048576"]


class Side:
    """One daemon: its QMP client and its NBD socket."""

    def __init__(self, name: str, client: QmpClient, nbd: Path) -> None:
        self.name = name
        self.qmp = client
        self.nbd = nbd
        self.map = ""

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.qmp.cmd(execute, arguments)

    def write(self, ops: list[str]) -> None:
        """Run qemu-io commands against the export ``n0``."""
        args: list[str] = ["-f", "raw"]
        for op in ops:
            args += ["-c", op]
        args.append(f"nbd+unix:///n0?socket={self.nbd}")
        result = qemu_io(*args, check=True)
        assert "error" not in result.stdout.lower() + result.stderr.lower(), result

    def bitmaps(self, node: str = "n0") -> list[dict[str, Any]] | None:
        for info in self.cmd("query-named-block-nodes", {"flat": True})["return"]:
            if info["node-name"] == node:
                return info.get("dirty-bitmaps")  # type: ignore[no-any-return]
        raise AssertionError(f"{self.name}: no node {node}")

    def raw_bitmaps(self) -> list[bytes]:
        """Every node's ``dirty-bitmaps`` as the wire carries it (member order)."""
        self.qmp.send_msg({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
        while True:
            line = self.qmp.recv_line()
            if line.startswith(b'{"return"'):
                return re.findall(rb'"dirty-bitmaps": \[[^\]]*\]', line)

    def state(self, names: list[str], node: str = "n0") -> dict[str, Any]:
        """What both daemons must agree on: the query and every bitmap's hash."""
        out: dict[str, Any] = {"query": self.bitmaps(node)}
        for name in names:
            out[name] = self.cmd("x-debug-block-dirty-bitmap-sha256",
                                 {"node": node, "name": name})
        return out


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    require_tool(QSD)
    qsd_dir = tmp_path / "qsd"
    qmpd_dir = tmp_path / "qmpd"
    qsd_dir.mkdir()
    qmpd_dir.mkdir()
    export = ["--export", "nbd,id=e,node-name=n0,name=n0,writable=on"]
    monitor = QsdMonitor("c")
    proc = monitor.popen(
        [QSD, *monitor.args,
         *NODES, "--nbd-server", f"addr.type=unix,addr.path={qsd_dir}/nbd.sock", *export],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    try:
        daemon = QmpdProcess(qmpd_dir, *NODES, "--nbd-server",
                             f"addr.type=unix,addr.path={qmpd_dir}/nbd.sock", *export)
        qsd = Side("qsd", monitor.client(proc, 20, check_schema=False, negotiate=True),
                   qsd_dir / "nbd.sock")
        ours = Side("qmpd", QmpClient(daemon.sock, 20, negotiate=True), qmpd_dir / "nbd.sock")
        yield qsd, ours
        qsd.qmp.close()
        ours.qmp.close()
        assert proc.poll() is None, "qemu-storage-daemon died"
    finally:
        proc.terminate()
        proc.wait(10)
        if daemon is not None:
            daemon.stop()


def both(pair: tuple[Side, Side], execute: str, arguments: dict[str, Any] | None = None
         ) -> dict[str, Any]:
    """Run a command on both daemons; the replies must be equal."""
    qsd, ours = pair
    expected = qsd.cmd(execute, arguments)
    got = ours.cmd(execute, arguments)
    assert got == expected, (execute, arguments)
    return got


def random_ops(rng: random.Random, count: int) -> list[str]:
    ops = []
    for _ in range(count):
        offset = rng.randrange(SIZE)
        edge = rng.choice([None, 512, 4096, 65536, 1 << 20])
        if edge is not None:  # a granule's first or last byte: off-by-ones show here
            offset = max(offset // edge * edge - rng.choice([0, 1]), 0)
        length = min(rng.choice([1, 2, 511, 512, 513, 4096, 65537, 200_000, 1 << 20]),
                     SIZE - offset)
        kind = rng.choice(["write -P 0x5a", "write -P 0x5a", "write -z", "read"])
        ops.append(f"{kind} {offset} {length}")
    return ops


BITMAPS = {"a": 512, "b": 4096, "c": None, "d": 1 << 20, "e": 1 << 31}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_same_writes_same_bitmaps(pair: tuple[Side, Side], seed: int) -> None:
    rng = random.Random(seed)
    for name, granularity in BITMAPS.items():
        args: dict[str, Any] = {"node": "n0", "name": name}
        if granularity is not None:
            args["granularity"] = granularity
        if name == "d":
            args["disabled"] = True
        assert both(pair, "block-dirty-bitmap-add", args) == {"return": {}}
    names = list(BITMAPS)
    qsd, ours = pair

    def batch() -> None:
        ops = random_ops(rng, 25)
        qsd.write(ops)
        ours.write(ops)
        assert ours.state(names) == qsd.state(names)

    batch()
    raw = ours.raw_bitmaps()
    assert raw == qsd.raw_bitmaps() and len(raw) == 1
    counts = {b["name"]: b["count"] for b in ours.bitmaps() or []}
    assert counts["a"] > 0 and counts["b"] >= counts["a"] and counts["d"] == 0, counts
    both(pair, "block-dirty-bitmap-disable", {"node": "n0", "name": "a"})
    both(pair, "block-dirty-bitmap-enable", {"node": "n0", "name": "d"})
    batch()
    both(pair, "block-dirty-bitmap-clear", {"node": "n0", "name": "b"})
    batch()
    both(pair, "block-dirty-bitmap-merge",
         {"node": "n0", "target": "c", "bitmaps": ["a", {"node": "n0", "name": "d"}]})
    both(pair, "block-dirty-bitmap-merge", {"node": "n0", "target": "a", "bitmaps": ["e"]})
    assert ours.state(names) == qsd.state(names)
    both(pair, "block-dirty-bitmap-remove", {"node": "n0", "name": "c"})
    batch()
    for name in ["a", "b", "d", "e"]:
        both(pair, "block-dirty-bitmap-remove", {"node": "n0", "name": name})
    # No bitmaps left: the member is gone, not empty.
    assert ours.bitmaps() is None and qsd.bitmaps() is None


REFUSALS: list[tuple[str, dict[str, Any]]] = [
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "nx", "name": ""}),
    ("block-dirty-bitmap-add", {"node": "nx", "name": "y"}),
    ("block-dirty-bitmap-add", {"node": "nx", "name": "y", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "y" * 1023}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "z" * 1024}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 1000}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 256}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 0}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": -512}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": 1 << 32}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "x", "persistent": True}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "granularity": "4096"}),
    ("block-dirty-bitmap-add", {"node": "n0"}),
    ("block-dirty-bitmap-add", {"node": "n0", "name": "g", "extra": 1}),
    ("block-dirty-bitmap-add", {"node": "small", "name": "s", "granularity": 1 << 31}),
    ("block-dirty-bitmap-remove", {"node": "n0", "name": "zz"}),
    ("block-dirty-bitmap-remove", {"node": "nx", "name": "zz"}),
    ("block-dirty-bitmap-clear", {"node": "n0", "name": "zz"}),
    ("block-dirty-bitmap-enable", {"node": "n0", "name": "zz"}),
    ("block-dirty-bitmap-disable", {"node": "nx", "name": "x"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "n0", "name": "zz"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "n0", "name": "x"}),
    ("x-debug-block-dirty-bitmap-sha256", {"node": "small", "name": "s"}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "zz", "bitmaps": ["x"]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x", "bitmaps": ["zz"]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x", "bitmaps": ["x", "zz"]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x",
                                  "bitmaps": [{"node": "nx", "name": "x"}]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x",
                                  "bitmaps": [{"node": "n0", "name": "zz"}]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x",
                                  "bitmaps": [{"node": "small", "name": "s"}]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x", "bitmaps": [7]}),
    ("block-dirty-bitmap-merge", {"node": "n0", "target": "x",
                                  "bitmaps": [{"node": "n0", "name": "x"}, "x"]}),
    ("block-dirty-bitmap-enable", {"node": "n0", "name": "x"}),
    ("block-dirty-bitmap-disable", {"node": "n0", "name": "x"}),
    ("block-dirty-bitmap-disable", {"node": "n0", "name": "x"}),
    ("block-dirty-bitmap-clear", {"node": "n0", "name": "x"}),
    ("block-dirty-bitmap-remove", {"node": "n0", "name": "x"}),
    ("block-dirty-bitmap-remove", {"node": "n0", "name": "x"}),
    ("query-named-block-nodes", {"flat": True}),
]


def test_refusals_as_qsd(pair: tuple[Side, Side]) -> None:
    for execute, arguments in REFUSALS:
        if execute == "query-named-block-nodes":
            assert pair[1].bitmaps("small") == pair[0].bitmaps("small")
            assert pair[1].bitmaps() == pair[0].bitmaps()
            continue
        both(pair, execute, arguments)


TRANSACTIONS: list[list[dict[str, Any]]] = [
    [{"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "t"}},
     {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "a"}},
     {"type": "block-dirty-bitmap-disable", "data": {"node": "n0", "name": "a"}},
     {"type": "block-dirty-bitmap-enable", "data": {"node": "n0", "name": "b"}},
     {"type": "block-dirty-bitmap-merge", "data": {"node": "n0", "target": "b",
                                                   "bitmaps": ["a", "c"]}},
     {"type": "block-dirty-bitmap-remove", "data": {"node": "n0", "name": "c"}},
     {"type": "abort", "data": {}}],
    [{"type": "block-dirty-bitmap-remove", "data": {"node": "n0", "name": "a"}},
     {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "a"}}],
    [{"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "c"}},
     {"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "c"}}],
    [{"type": "block-dirty-bitmap-merge", "data": {"node": "n0", "target": "a",
                                                   "bitmaps": ["c"]}},
     {"type": "block-dirty-bitmap-remove", "data": {"node": "n0", "name": "zz"}}],
    [{"type": "block-dirty-bitmap-disable", "data": {"node": "n0", "name": "c"}},
     {"type": "block-dirty-bitmap-merge", "data": {"node": "n0", "target": "a",
                                                   "bitmaps": [{"node": "small",
                                                                "name": "s"}]}}],
    [{"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "a"}},
     {"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "u",
                                                 "persistent": True}}],
    [{"type": "abort", "data": {}}],
    [{"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "t", "bad": 1}}],
]


#: QEMU's job and snapshot actions qmpd lacks: not in its TransactionActionKind,
#: so refused as QEMU refuses a type its enum lacks (QSD tries to run them).
UNSUPPORTED: list[dict[str, Any]] = [
    {"type": "drive-backup", "data": {"device": "n0", "target": "x", "sync": "full"}},
    {"type": "blockdev-snapshot-sync", "data": {"device": "n0", "snapshot-file": "x"}},
]

#: blockdev-backup actions that fail as QSD's do (and undo the bitmap action).
FAILING_BACKUPS: list[dict[str, Any]] = [
    {"type": "blockdev-backup", "data": {"device": "n0", "target": "n1", "sync": "full"}},
    {"type": "blockdev-backup", "data": {"job-id": "j", "device": "n0", "target": "x",
                                         "sync": "full"}},
    {"type": "blockdev-backup", "data": {"job-id": "j", "device": "n0", "target": "small",
                                         "sync": "bitmap", "bitmap": "a"}},
]


def test_transaction_all_or_nothing(pair: tuple[Side, Side]) -> None:
    qsd, ours = pair
    for name, disabled in (("a", False), ("b", True), ("c", False)):
        both(pair, "block-dirty-bitmap-add", {"node": "n0", "name": name, "disabled": disabled,
                                              "granularity": 4096})
    both(pair, "block-dirty-bitmap-add", {"node": "small", "name": "s"})
    ops = random_ops(random.Random(7), 30)
    qsd.write(ops)
    ours.write(ops)
    names = ["a", "b", "c"]
    before = ours.state(names)
    assert before == qsd.state(names)
    assert any(b["count"] for b in before["query"])
    for actions in TRANSACTIONS:
        reply = both(pair, "transaction", {"actions": actions})
        assert "error" in reply, actions
        assert ours.state(names) == before, actions
    for action in UNSUPPORTED:
        actions = [TRANSACTIONS[0][0], action]
        assert "error" in qsd.cmd("transaction", {"actions": actions})
        assert ours.cmd("transaction", {"actions": actions})["error"] == {
            "class": "GenericError",
            "desc": f"Parameter 'type' does not accept value '{action['type']}'"}
        assert ours.state(names) == before == qsd.state(names)
    for action in FAILING_BACKUPS:
        reply = both(pair, "transaction", {"actions": [TRANSACTIONS[0][0], action]})
        assert "error" in reply, action
        assert ours.state(names) == before == qsd.state(names)
    for mode in ("grouped", "individual"):
        both(pair, "transaction", {"actions": [{"type": "abort", "data": {}}],
                                   "properties": {"completion-mode": mode}})
        both(pair, "transaction", {"actions": TRANSACTIONS[2][:1],
                                   "properties": {"completion-mode": "grouped"}})
    assert ours.state(names) == before
    # A successful one: every action's effect, later actions seeing earlier ones.
    good = [
        {"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "t"}},
        {"type": "block-dirty-bitmap-merge", "data": {"node": "n0", "target": "t",
                                                      "bitmaps": ["a", "c"]}},
        {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "a"}},
        {"type": "block-dirty-bitmap-enable", "data": {"node": "n0", "name": "b"}},
        {"type": "block-dirty-bitmap-disable", "data": {"node": "n0", "name": "c"}},
        {"type": "block-dirty-bitmap-remove", "data": {"node": "n0", "name": "c"}},
    ]
    assert both(pair, "transaction", {"actions": good}) == {"return": {}}
    assert both(pair, "transaction", {"actions": []}) == {"return": {}}
    after = ours.state(["a", "b", "t"])
    assert after == qsd.state(["a", "b", "t"])
    assert after != before
    ops = random_ops(random.Random(8), 30)
    qsd.write(ops)
    ours.write(ops)
    assert ours.state(["a", "b", "t"]) == qsd.state(["a", "b", "t"])


def test_transaction_enable_missing_bitmap(qmpd_factory: Any) -> None:
    """QEMU 7.2 dies of SIGSEGV here (its abort handler uses the missing
    bitmap); qmpd answers with the lookup error and changes nothing."""
    daemon = qmpd_factory(*NODES)
    client = daemon.client()
    client.negotiate()
    client.ok("block-dirty-bitmap-add", {"node": "n0", "name": "a"})
    actions = [{"type": "block-dirty-bitmap-disable", "data": {"node": "n0", "name": "a"}},
               {"type": "block-dirty-bitmap-enable", "data": {"node": "n0", "name": "zz"}}]
    assert client.err("transaction", {"actions": actions}) == "Dirty bitmap 'zz' not found"
    nodes = client.ok("query-named-block-nodes", {"flat": True})
    (n0,) = [n for n in nodes if n["node-name"] == "n0"]
    assert n0["dirty-bitmaps"][0]["recording"] is True
    client.close()


def nbdinfo(side: Side, export: str, *args: str) -> str:
    result = subprocess.run(
        [require_tool("nbdinfo"), *args, f"nbd+unix:///{export}?socket={side.nbd}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.replace(str(side.nbd), "SOCKET")


def test_exported_bitmaps_as_qsd(pair: tuple[Side, Side]) -> None:
    qsd, ours = pair
    for name, granularity, disabled in (("a", 512, False), ("d", 65536, True),
                                        ("g", 1 << 20, False)):
        both(pair, "block-dirty-bitmap-add", {"node": "n0", "name": name,
                                              "granularity": granularity, "disabled": disabled})
    ops = random_ops(random.Random(11), 40)
    qsd.write(ops)
    ours.write(ops)
    both(pair, "block-dirty-bitmap-enable", {"node": "n0", "name": "d"})
    ops = random_ops(random.Random(12), 10)
    qsd.write(ops)
    ours.write(ops)
    both(pair, "block-dirty-bitmap-disable", {"node": "n0", "name": "d"})

    def export(export_id: str, bitmaps: list[Any], **extra: Any) -> dict[str, Any]:
        return both(pair, "block-export-add", {"type": "nbd", "id": export_id,
                                               "node-name": "n0", "name": export_id,
                                               "bitmaps": bitmaps, **extra})

    # A read-only export of an enabled bitmap of a node something writes.
    assert "error" in export("x", ["a"])
    assert "error" in export("x", ["zz"])
    assert "error" in export("x", [{"node": "n0", "name": "zz"}])
    assert "error" in export("x", [{"node": "nx", "name": "a"}])
    assert export("x", ["d", {"node": "n0", "name": "a"}], writable=True) == {"return": {}}
    assert "error" in export("y", ["d"])  # busy
    assert export("y", ["g"], writable=True) == {"return": {}}
    assert ours.bitmaps() == qsd.bitmaps()
    assert all(b["busy"] for b in ours.bitmaps() or [])
    for execute in ("block-dirty-bitmap-clear", "block-dirty-bitmap-remove",
                    "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"):
        assert "error" in both(pair, execute, {"node": "n0", "name": "d"})
    assert "error" in both(pair, "block-dirty-bitmap-merge",
                           {"node": "n0", "target": "a", "bitmaps": ["d"]})
    assert "error" in both(pair, "transaction", {"actions": [
        {"type": "block-dirty-bitmap-clear", "data": {"node": "n0", "name": "g"}}]})
    assert nbdinfo(ours, "x") == nbdinfo(qsd, "x")
    assert "qemu:dirty-bitmap:a" in nbdinfo(ours, "x")
    for name, export_name in (("a", "x"), ("d", "x"), ("g", "y")):
        expected = nbdinfo(qsd, export_name, f"--map=qemu:dirty-bitmap:{name}")
        assert "dirty" in expected
        assert nbdinfo(ours, export_name, f"--map=qemu:dirty-bitmap:{name}") == expected
    for side in pair:  # qemu-img reads a bitmap through x-dirty-bitmap
        result = subprocess.run(
            [require_tool("qemu-img"), "map", "--output=json", "--image-opts",
             f"driver=nbd,server.type=unix,server.path={side.nbd},export=x,"
             "x-dirty-bitmap=qemu:dirty-bitmap:a"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        side.map = result.stdout
    assert ours.map == qsd.map and '"data": false' in qsd.map
    # The bitmap goes on recording while exported (QEMU's "a" is enabled).
    ops = random_ops(random.Random(13), 10)
    qsd.write(ops)
    ours.write(ops)
    expected = nbdinfo(qsd, "x", "--map=qemu:dirty-bitmap:a")
    assert nbdinfo(ours, "x", "--map=qemu:dirty-bitmap:a") == expected
    both(pair, "block-export-del", {"id": "x"})
    both(pair, "block-export-del", {"id": "y"})
    assert ours.bitmaps() == qsd.bitmaps()
    assert not any(b["busy"] for b in ours.bitmaps() or [])
    # nbd-server-add's single 'bitmap'.
    assert both(pair, "nbd-server-add", {"device": "n0", "name": "leg", "bitmap": "d"}) == {
        "return": {}}
    assert "error" in both(pair, "nbd-server-add", {"device": "n0", "name": "l2", "bitmap": "a"})
    assert nbdinfo(ours, "leg", "--map=qemu:dirty-bitmap:d") == nbdinfo(
        qsd, "leg", "--map=qemu:dirty-bitmap:d")
    assert ours.bitmaps() == qsd.bitmaps()


def test_bitmaps_follow_block_resize(tmp_path: Path) -> None:
    """block_resize truncates the bitmaps of the node and of the file below."""

    def nodes(work: Path) -> list[str]:
        (work / "disk.raw").write_bytes(bytes(1 << 20))
        return ["--blockdev", f"file,node-name=f,filename={work}/disk.raw",
                "--blockdev", "raw,node-name=r,file=f"]

    steps: list[tuple[str, dict[str, Any]]] = [
        ("block-dirty-bitmap-add", {"node": "r", "name": "a", "granularity": 512}),
        ("block-dirty-bitmap-add", {"node": "f", "name": "b", "granularity": 4096}),
        ("block_resize", {"node-name": "r", "size": 3 * 1024 * 1024 + 512}),
        ("x-debug-block-dirty-bitmap-sha256", {"node": "r", "name": "a"}),
        ("x-debug-block-dirty-bitmap-sha256", {"node": "f", "name": "b"}),
        ("block-dirty-bitmap-add", {"node": "r", "name": "c", "granularity": 65536}),
        ("block-dirty-bitmap-merge", {"node": "r", "target": "a", "bitmaps": ["c"]}),
        ("block_resize", {"node-name": "r", "size": 4096}),
        ("x-debug-block-dirty-bitmap-sha256", {"node": "r", "name": "a"}),
        ("block-dirty-bitmap-merge", {"node": "r", "target": "a", "bitmaps": ["c"]}),
    ]
    replies = side_by_side(tmp_path, nodes, steps)
    assert replies["qmpd"] == replies["qsd"]
    assert replies["qsd"][3] != replies["qsd"][8]  # the hash covers the bitmap's size


def test_bitmaps_of_a_read_only_image_as_qsd(tmp_path: Path) -> None:
    """Loaded read-only: not to be cleared or merged into, but enabled, disabled
    and read as QSD does."""

    def nodes(work: Path) -> list[str]:
        image = work / "ro.qcow2"
        subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image),
                        "16M"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b"], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), "c"], check=True)
        return ["--blockdev", f"driver=qcow2,node-name=n,read-only=on,file.driver=file,"
                              f"file.filename={image}"]

    steps: list[tuple[str, dict[str, Any]]] = [
        ("block-dirty-bitmap-clear", {"node": "n", "name": "b"}),
        ("block-dirty-bitmap-merge", {"node": "n", "target": "b", "bitmaps": ["c"]}),
        ("block-dirty-bitmap-disable", {"node": "n", "name": "b"}),
        ("block-dirty-bitmap-enable", {"node": "n", "name": "b"}),
        ("block-dirty-bitmap-remove", {"node": "n", "name": "c"}),
        ("x-debug-block-dirty-bitmap-sha256", {"node": "n", "name": "b"}),
    ]
    replies = side_by_side(tmp_path, nodes, steps)
    assert replies["qmpd"] == replies["qsd"]
    assert replies["qsd"][0]["error"]["desc"] == "Bitmap 'b' is readonly and cannot be modified"
