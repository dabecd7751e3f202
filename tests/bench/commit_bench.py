#!/usr/bin/env python3
"""Chain job cost: qmpd (optionally side by side with qemu-storage-daemon 7.2;
not a pytest test).

A qcow2 base of ``--size`` (default 256 MiB) under a qcow2 overlay filled
with data (one 16 MiB stretch in 8 left to the base), under an empty
active layer, and a job on that chain (``--job``): ``active`` commits the
overlay (a ``block-commit`` of the active layer: from the command to
``BLOCK_JOB_READY``, then ``block-job-complete`` until
``BLOCK_JOB_COMPLETED``), ``intermediate`` commits the overlay into the base
from under the active layer, ``stream`` streams the overlay and the base
into the active layer.  Printed per repetition and as medians: the wall
time and the daemon's CPU time (user + system from /proc/PID/stat) over
that whole span.

Usage::

    python3 tests/bench/commit_bench.py [--size 256M] [--reps 3] [--dir /dev/shm] [--qsd]
                                        [--job active|intermediate|stream]
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

from tests.bench.mirror_bench import start_daemon  # noqa: E402
from tests.bench.nbd_bench import cpu_seconds, parse_size  # noqa: E402
from tests.support.qmp import QmpClient  # noqa: E402

MiB = 1 << 20
CHUNK = 16 * MiB


def make_chain(work: Path, size: int) -> tuple[Path, Path, Path]:
    base, top, active = work / "base.qcow2", work / "top.qcow2", work / "active.qcow2"
    for path in (base, top, active):
        path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 1 0 {size}", str(base)],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2",
                    str(top)], check=True)
    ops: list[str] = []
    for i, offset in enumerate(range(0, size, CHUNK)):
        if i % 8 == 3:
            continue  # left to the base
        ops += ["-c", f"write -P {0x21 + i % 200} {offset} {min(CHUNK, size - offset)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *ops, str(top)], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2",
                    str(active)], check=True)
    return base, top, active


def start(impl: str, work: Path, base: Path, top: Path,
          active: Path | None) -> tuple[subprocess.Popen[bytes], Path | socket.socket]:
    sock = work / f"{impl}.qmp"
    nodes = ["--blockdev", f"driver=qcow2,node-name=base,file.driver=file,file.filename={base}",
             "--blockdev", f"driver=qcow2,node-name=top,backing=base,file.driver=file,"
             f"file.filename={top}"]
    if active is not None:
        nodes += ["--blockdev", f"driver=qcow2,node-name=active,backing=top,file.driver=file,"
                  f"file.filename={active}"]
    return start_daemon(impl, sock, nodes)


def one_run(impl: str, work: Path, size: int, job: str) -> dict[str, float]:
    base, top, active = make_chain(work, size)
    view = work / "expected.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(top), str(view)], check=True)
    proc, sock = start(impl, work, base, top, None if job == "active" else active)
    try:
        qmp = QmpClient(sock, 600, check_schema=False, negotiate=True)
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        if job == "active":
            qmp.ok("block-commit", {"job-id": "c", "device": "top", "base-node": "base"})
            qmp.wait_event("BLOCK_JOB_READY", timeout=600)
            qmp.ok("block-job-complete", {"device": "c"})
        elif job == "intermediate":
            qmp.ok("block-commit", {"job-id": "c", "device": "active", "top-node": "top",
                                    "base-node": "base"})
        else:
            qmp.ok("block-stream", {"job-id": "c", "device": "active"})
        qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=600)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        qmp.close()
    finally:
        proc.terminate()
        proc.wait(60)
    result = active if job == "stream" else base
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(view),
                           str(result)]).returncode == 0
    view.unlink()
    if not same:
        raise SystemExit(f"{impl}: {result.name} differs from what the top showed")
    return {"seconds": elapsed, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    parser.add_argument("--qsd", action="store_true", help="qemu-storage-daemon too")
    parser.add_argument("--job", choices=["active", "intermediate", "stream"], default="active")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="commit-bench-", dir=args.dir))
    impls = ["qmpd", "qsd"] if args.qsd else ["qmpd"]
    runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
    try:
        for rep in range(args.reps):
            for impl in impls if rep % 2 == 0 else impls[::-1]:
                result = one_run(impl, work, size, args.job)
                runs[impl].append(result)
                print(f"rep {rep + 1} {impl:5s} {result['seconds']:6.2f} s  "
                      f"cpu {result['cpu_s']:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.job} job on a {args.size} qcow2 chain, medians of {args.reps}:")
    for impl in impls:
        print(f"  {impl:5s} {statistics.median(r['seconds'] for r in runs[impl]):6.2f} s  "
              f"cpu {statistics.median(r['cpu_s'] for r in runs[impl]):.2f} s")


if __name__ == "__main__":
    main()
