#!/usr/bin/env python3
"""NFS benchmark: qmpd side by side with QEMU 7.2 (not a pytest test).

Starts a throw-away NFS server (rpcbind and nfs-ganesha with FSAL_VFS,
tests/support/nfs.py; nothing else may listen on port 2049) and measures I/O
through a writable NBD export of an ``nfs`` node (libnfs, NFSv3): qmpd
against ``qemu-storage-daemon --blockdev driver=nfs``, each on its own raw
file of the same size in the same export (the files are written in full
first, so neither side reads holes): sequential 1 MiB writes and reads
(``qemu-img bench -s 1M -d 4``), 4 KiB scattered writes and reads
(``qemu-img bench -s 4k -d 16`` with a stride of 100003 blocks), MiB/s or
IOPS, and the server's CPU time per request.  Every repetition runs both
targets in turn, in rotating order.

Usage::

    python3 tests/bench/nfs_bench.py [--size 256M] [--reps 3] [--count4k 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "bench"))

from rbd_bench import STRIDE_BLOCKS, Target, bench, cpu_seconds  # noqa: E402

from tests.support.nfs import EXPORT, HOST, NfsServer, missing  # noqa: E402

MiB = 1 << 20


def measure(target: Target, size: int, count4k: int) -> dict[str, float]:
    res: dict[str, float] = {}
    pid = target.proc.pid
    stride4k = 4096 * STRIDE_BLOCKS % size
    runs = [
        ("seq_write_mibs", 1 * MiB, 4, size // MiB, True, 1 * MiB),
        ("seq_read_mibs", 1 * MiB, 4, size // MiB, False, 1 * MiB),
        ("rand4k_write_iops", 4096, 16, count4k, True, stride4k),
        ("rand4k_read_iops", 4096, 16, count4k, False, stride4k),
    ]
    for key, block, depth, count, write, stride in runs:
        cpu = cpu_seconds(pid)
        seconds = bench(target.uri, block, depth, count, write, stride)
        res[key] = (count * block / MiB if key.endswith("mibs") else count) / seconds
        res[key.rsplit("_", 1)[0] + "_cpu_us_per_req"] = (cpu_seconds(pid) - cpu) / count * 1e6
    return res


def io_bench(server: NfsServer, work: Path, size: int, reps: int,
             count4k: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {"qmpd": [], "qsd": []}
    for name in results:
        # Written in full (not sparse): both sides read real data.
        with open(server.export / f"bench-{name}.raw", "wb") as f:
            block = b"\x5a" * MiB
            for _ in range(size // MiB):
                f.write(block)
    for rep in range(reps):
        order = list(results) if rep % 2 == 0 else list(reversed(results))
        for name in order:
            node = (f"driver=nfs,node-name=r,server.type=inet,server.host={HOST},"
                    f"path={EXPORT}/bench-{name}.raw")
            target = Target(name, work, node)
            try:
                results[name].append(measure(target, size, count4k))
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="256M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--count4k", type=int, default=4096, help="4 KiB requests per run")
    ap.add_argument("--json")
    args = ap.parse_args()
    size = int(args.size.rstrip("M")) * MiB
    for tool in ("qemu-img", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is needed")
    reason = missing()
    if reason is not None:
        raise SystemExit(reason)
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="qnfsb", dir="/tmp"))
        stack.callback(shutil.rmtree, work, True)
        server = NfsServer(work / "nfs")
        server.start()
        stack.callback(server.stop)
        out = {"io": io_bench(server, work, size, args.reps, args.count4k)}
    print("\nI/O through NBD on nfs (median of reps; ratio: qmpd/qsd, CPU: qsd/qmpd)")
    for key, row in out["io"]["median"].items():
        print(f"  {key:28} qmpd {row['qmpd']:10.1f}  qsd {row['qsd']:10.1f}  "
              f"ratio {row['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
