#!/usr/bin/env python3
"""Migration without shared storage, libvirt's flow: qmpd -> qmpd against
QEMU 7.2 -> QEMU 7.2 (``qemu-system-x86_64 -M none``), side by side (not a pytest test).

One qcow2 disk of ``--size`` (default 1 GiB, filled with data but for one
64 MiB stretch in 16) goes to an empty qcow2 on the destination: the
destination exports it over NBD (``block-export-add writable``), the source
adds an ``nbd`` node with ``raw`` on top and runs ``blockdev-mirror
sync=full`` until READY, then ``migrate`` with ``pause-before-switchover``;
at ``pre-switchover`` ``block-job-cancel`` (the final sync), ``job-dismiss``,
``blockdev-del`` of the two nodes, ``migrate-continue``; the destination
``nbd-server-stop`` and ``cont``.  Measured, per repetition (pairs in
rotating order; event timestamps are the processes' own, same host clock):

  total     blockdev-mirror sent -> the destination's RESUME
  mirror    blockdev-mirror sent -> BLOCK_JOB_READY
  downtime  the source's STOP -> the destination's RESUME

Usage::

    python3 tests/bench/storage_migration_bench.py [--size 1G] [--reps 3] [--dir /tmp]
        [--drop-caches]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.machine import drop_caches  # noqa: E402
from tests.bench.nbd_bench import parse_size  # noqa: E402
from tests.integration.migration_helpers import Cluster, Peer  # noqa: E402

MiB = 1 << 20
CHUNK = 64 * MiB


def stamp(ev: dict[str, Any]) -> float:
    ts = ev["timestamp"]
    return float(ts["seconds"]) + ts["microseconds"] / 1e6


def make_source(path: Path, size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    cmds: list[str] = []
    for k, off in enumerate(range(0, size, CHUNK)):
        if k % 16 != 5:
            cmds += ["-c", f"write -P {k % 250 + 1} {off} {min(CHUNK, size - off)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *cmds, str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def add_disk(peer: Peer, image: Path) -> None:
    peer.ok("blockdev-add", {"node-name": "disk-storage", "driver": "file",
                             "filename": str(image)})
    peer.ok("blockdev-add", {"node-name": "disk", "driver": "qcow2", "file": "disk-storage"})


def one_run(kind: str, work: Path, source: Path, size: int,
            dst_kind: str | None = None) -> dict[str, float]:
    src_image = work / "src.qcow2"
    dst_image = work / "dst.qcow2"
    shutil.copyfile(source, src_image)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dst_image), str(size)],
                   check=True)
    cluster = Cluster(work)
    try:
        src = cluster(kind, "src")
        dst = cluster(dst_kind or kind, "dst", incoming="defer", paused=True)
        nbd_sock = str(work / "nbd.sock")
        uri = f"unix:{work / 'mig.sock'}"
        dst.caps(events=True, late_block_activate=True)
        add_disk(dst, dst_image)
        dst.ok("nbd-server-start", {"addr": {"type": "unix", "data": {"path": nbd_sock}}})
        dst.ok("block-export-add", {"type": "nbd", "id": "disk", "node-name": "disk",
                                    "writable": True})
        src.caps(events=True, pause_before_switchover=True)
        add_disk(src, src_image)
        src.ok("blockdev-add", {"driver": "nbd", "node-name": "mig-storage",
                                "server": {"type": "unix", "path": nbd_sock},
                                "export": "disk"})
        src.ok("blockdev-add", {"driver": "raw", "node-name": "mig-format",
                                "file": "mig-storage"})
        start = time.time()
        src.ok("blockdev-mirror", {"job-id": "drive-disk", "device": "disk",
                                   "target": "mig-format", "sync": "full",
                                   "auto-dismiss": False})
        ready = stamp(src.qmp.wait_event("BLOCK_JOB_READY", timeout=600))
        dst.ok("migrate-incoming", {"uri": uri})
        src.ok("migrate", {"uri": uri})
        src.qmp.wait_event("MIGRATION", status="pre-switchover", timeout=60)
        src.ok("block-job-cancel", {"device": "drive-disk"})
        src.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        src.ok("job-dismiss", {"id": "drive-disk"})
        src.ok("blockdev-del", {"node-name": "mig-format"})
        src.ok("blockdev-del", {"node-name": "mig-storage"})
        src.ok("migrate-continue", {"state": "pre-switchover"})
        src.wait_migration(timeout=60)
        dst.wait_migration(timeout=60)
        dst.ok("nbd-server-stop")
        dst.ok("cont")
        resume = stamp(dst.qmp.wait_event("RESUME", timeout=30))
        stop = stamp(src.qmp.wait_event("STOP", timeout=5))
        src.quit()
        dst.quit()
    finally:
        cluster.close()
    res = subprocess.run(["qemu-img", "compare", "-q", str(src_image), str(dst_image)])
    if res.returncode != 0:
        raise SystemExit(f"{kind}: the destination's disk differs from the source's")
    for path in (src_image, dst_image):
        path.unlink()
    return {"total": resume - start, "mirror": ready - start, "downtime": resume - stop}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", type=parse_size)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before every run (root; steadier numbers)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="smig", dir=args.dir))
    try:
        source = base / "source.qcow2"
        make_source(source, args.size)
        runs: dict[str, list[dict[str, float]]] = {"qemu": [], "qmpd": []}
        for rep in range(args.reps):
            order = ["qemu", "qmpd"] if rep % 2 == 0 else ["qmpd", "qemu"]
            for kind in order:
                work = base / f"{kind}{rep}"
                work.mkdir()
                if args.drop_caches and not drop_caches():
                    raise SystemExit("--drop-caches needs root")
                got = one_run(kind, work, source, args.size)
                runs[kind].append(got)
                print(f"rep {rep} {kind:5}: total {got['total']:.3f} s, mirror "
                      f"{got['mirror']:.3f} s, downtime {got['downtime'] * 1000:.1f} ms",
                      flush=True)
                shutil.rmtree(work, ignore_errors=True)
        print(f"\nmedians of {args.reps} ({args.size // MiB} MiB disk):")
        med = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for kind, rs in runs.items()}
        for key in ("total", "mirror", "downtime"):
            q, m = med["qemu"][key], med["qmpd"][key]
            print(f"  {key:9} QEMU {q * 1000:9.1f} ms   qmpd {m * 1000:9.1f} ms   "
                  f"ratio {m / q:.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
