#!/usr/bin/env python3
"""Ceph RBD benchmark: qmpd side by side with QEMU 7.2 (not a pytest test).

Starts a throw-away one-node cluster (tests/support/ceph.py), or uses a
running one whose files are in the folder given with ``--cluster`` (as
tests/support/ceph.py writes them: ``ceph.conf``, ``client.conf``, the
admin keyring), and measures:

* I/O through an NBD export of an ``rbd`` node (writable, the client
  configuration of the tests: librbd's cache in writeback mode), qmpd against
  ``qemu-storage-daemon --blockdev driver=rbd``, each on its own image of the
  same size and features (qmpd holds the exclusive lock of its image, so the
  two cannot share one): sequential 1 MiB writes and reads (``qemu-img bench
  -s 1M -d 4``), 4 KiB scattered writes and reads (``qemu-img bench -s 4k
  -d 16`` with a stride of 100003 blocks) and the same reads again (all
  in librbd's cache by then: the first pass still misses some), MiB/s or
  IOPS, and the server's CPU time per request.  Every repetition runs both targets in turn, in
  rotating order.
* Handover downtime on rbd: a raw rbd node migrated qmpd -> qmpd and
  ``qemu-system-x86_64 -M none`` -> same (``downtime`` and ``total-time``
  of query-migrate on the source, and the wall time from ``migrate`` to the
  destination's first completed read, started at its RESUME event).

Usage::

    python3 tests/bench/rbd_bench.py [--size 256M] [--reps 3] [--handovers 5] [--json out.json]
        [--drop-caches] [--cluster DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.machine import drop_caches  # noqa: E402
from tests.integration.migration_helpers import Cluster  # noqa: E402
from tests.support.ceph import POOL, CephCluster, start_ceph  # noqa: E402

MiB = 1 << 20
STRIDE_BLOCKS = 100003
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def bench(uri: str, block: int, depth: int, count: int, write: bool, stride: int) -> float:
    """``qemu-img bench``: seconds for ``count`` requests."""
    argv = ["qemu-img", "bench", "-f", "raw", "-s", str(block), "-d", str(depth),
            "-c", str(count), "-S", str(stride)]
    if write:
        argv += ["-w", "--pattern=0xa5"]
    start = time.perf_counter()
    res = subprocess.run([*argv, uri], capture_output=True, text=True, timeout=900)
    elapsed = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(f"qemu-img bench: {res.stderr.strip()}")
    m = re.search(r"Run completed in ([0-9.]+) seconds", res.stdout)
    return float(m.group(1)) if m else elapsed


class Target:
    """A daemon exporting an rbd node over NBD on a UNIX socket."""

    def __init__(self, name: str, work: Path, node: str) -> None:
        self.name = name
        self.nbd = work / f"{name}-nbd.sock"
        qmp = work / f"{name}-qmp.sock"
        export = "type=nbd,id=e0,node-name=r,name=bench,writable=on"
        server = f"addr.type=unix,addr.path={self.nbd}"
        if name == "qmpd":
            argv = [sys.executable, "-m", "qmpd", "--log-level", "error",
                    "--qmp", f"unix:{qmp}", "--blockdev", node, "--nbd-server", server,
                    "--export", export]
        else:
            argv = ["qemu-storage-daemon", "--chardev", f"socket,id=m0,path={qmp},server=on,wait=off",
                    "--monitor", "chardev=m0", "--blockdev", node, "--nbd-server", server,
                    "--export", export]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for stale in (self.nbd, qmp):
            stale.unlink(missing_ok=True)
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self.nbd.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            time.sleep(0.05)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///bench?socket={self.nbd}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def measure(target: Target, size: int) -> dict[str, float]:
    res: dict[str, float] = {}
    pid = target.proc.pid
    stride4k = 4096 * STRIDE_BLOCKS % size
    runs = [
        ("seq_write_mibs", 1 * MiB, 4, size // MiB, True, 1 * MiB),
        ("seq_read_mibs", 1 * MiB, 4, size // MiB, False, 1 * MiB),
        ("rand4k_write_iops", 4096, 16, 4096, True, stride4k),
        ("rand4k_read_iops", 4096, 16, 4096, False, stride4k),
        # The same reads again: the first pass after the sequential runs has
        # misses in librbd's cache (OSD reads), this one none.
        ("rand4k_reread_iops", 4096, 16, 4096, False, stride4k),
    ]
    for key, block, depth, count, write, stride in runs:
        cpu = cpu_seconds(pid)
        seconds = bench(target.uri, block, depth, count, write, stride)
        res[key] = (count * block / MiB if key.endswith("mibs") else count) / seconds
        res[key.rsplit("_", 1)[0] + "_cpu_us_per_req"] = (cpu_seconds(pid) - cpu) / count * 1e6
    return res


def io_bench(ceph: CephCluster, work: Path, size: int, reps: int,
             drop: bool = False) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {"qmpd": [], "qsd": []}
    images = {name: ceph.new_image(f"{size // MiB}M", prefix=f"bench-{name}")
              for name in results}
    for rep in range(reps):
        order = list(results) if rep % 2 == 0 else list(reversed(results))
        for name in order:
            node = (f"driver=rbd,node-name=r,pool={POOL},image={images[name]},"
                    f"conf={ceph.client_conf}")
            if drop and not drop_caches():
                raise SystemExit("--drop-caches needs root")
            target = Target(name, work, node)
            try:
                results[name].append(measure(target, size))
            finally:
                target.stop()
            print(f"rep {rep} {name}: {json.dumps(results[name][-1])}", flush=True)
    summary: dict[str, Any] = {}
    for key in results["qmpd"][0]:
        med = {name: statistics.median(r[key] for r in runs) for name, runs in results.items()}
        ratio = (med["qmpd"] / med["qsd"] if not key.endswith("cpu_us_per_req")
                 else med["qsd"] / med["qmpd"])
        summary[key] = {**med, "ratio": ratio}
    return {"runs": results, "median": summary}


def handover(ceph: CephCluster, work: Path, kind: str, n: int) -> dict[str, Any]:
    samples: list[dict[str, float]] = []
    for i in range(n):
        image = ceph.new_image("64M", prefix=f"mig-{kind}")
        mig = Cluster(work / f"{kind}{i}")
        (work / f"{kind}{i}").mkdir()
        try:
            src = mig(kind, "src")
            dst = mig(kind, "dst", incoming="defer")
            for side in (src, dst):
                side.ok("blockdev-add", ceph.blockdev(image, **{"node-name": "disk"}))
            src.qemu_io("disk", "write -P 0x5a 0 1M")
            # As libvirt (and migration_bench.py) sets capabilities before it
            # migrates: qmpd imports its migration code at the first such command.
            for side in (src, dst):
                side.ok("migrate-set-capabilities",
                        {"capabilities": [{"capability": "events", "state": True}]})
            uri = f"unix:{work / f'{kind}{i}' / 'mig.sock'}"
            dst.ok("migrate-incoming", {"uri": uri})
            start = time.perf_counter()
            src.ok("migrate", {"uri": uri})
            # The first read as soon as the destination runs (RESUME), not
            # after polling query-migrate (5 ms steps) on both sides.
            dst.qmp.wait_event("RESUME", timeout=30)
            dst.qemu_io("disk", "read -P 0x5a 0 4k")
            wall = time.perf_counter() - start
            info = src.wait_migration()
            dst.wait_migration()
            assert info["status"] == "completed", info
            samples.append({"downtime_ms": float(info.get("downtime", 0)),
                            "total_ms": float(info.get("total-time", 0)),
                            "migrate_to_first_read_ms": wall * 1e3})
            dst.quit()
            src.quit()
        finally:
            mig.close()
            ceph.remove_image(image)
    return {"samples": samples,
            "median": {k: statistics.median(s[k] for s in samples) for k in samples[0]}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--handovers", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before every run (root; steadier numbers)")
    ap.add_argument("--cluster", type=Path,
                    help="a running cluster's folder (default: start a throw-away one)")
    args = ap.parse_args()
    size = int(args.size.rstrip("M")) * MiB
    for tool in ("qemu-img", "qemu-storage-daemon", "qemu-system-x86_64"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    out: dict[str, Any] = {}
    with ExitStack() as stack:
        if args.cluster is not None:
            if not (args.cluster / "client.conf").is_file():
                raise SystemExit(f"{args.cluster}: no client.conf (not a cluster's folder)")
            ceph = CephCluster(args.cluster)
        else:
            ceph = stack.enter_context(start_ceph())
        work = Path(tempfile.mkdtemp(prefix="qrbdb", dir="/tmp"))
        stack.callback(shutil.rmtree, work, True)
        out["io"] = io_bench(ceph, work, size, args.reps, args.drop_caches)
        out["handover"] = {kind: handover(ceph, work, kind, args.handovers)
                           for kind in ("qmpd", "qemu")}
    print("\nI/O through NBD (median of reps; ratio: qmpd/qsd, CPU: qsd/qmpd)")
    for key, row in out["io"]["median"].items():
        print(f"  {key:28} qmpd {row['qmpd']:10.1f}  qsd {row['qsd']:10.1f}  "
              f"ratio {row['ratio']:.2f}")
    print("Handover on rbd (median)")
    for kind, row in out["handover"].items():
        print(f"  {kind:5} " + "  ".join(f"{k} {v:.1f}" for k, v in row["median"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
