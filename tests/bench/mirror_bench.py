#!/usr/bin/env python3
"""Mirror throughput: qmpd side by side with qemu-storage-daemon 7.2 (not a pytest test).

A qcow2 source of ``--size`` (default 1 GiB) filled with data (one 64 MiB
stretch in 16 left unallocated) is mirrored (``blockdev-mirror sync=full``,
the same command for both) into a fresh local qcow2 target.  Measured from
the command to ``BLOCK_JOB_READY`` (everything copied and the target
flushed); the job then ends with a soft ``block-job-cancel``.  Each
repetition runs both daemons in rotating order; medians are printed, with
the daemon's CPU time (user + system) per GiB, and the ratio qmpd / QSD.

Usage::

    python3 tests/bench/mirror_bench.py [--size 1G] [--reps 3] [--dir /dev/shm] [--json out.json]
        [--drop-caches]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
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
from tests.bench.nbd_bench import cpu_seconds, parse_size  # noqa: E402
from tests.support.qmp import QmpClient  # noqa: E402
from tests.support.qsd import QsdMonitor  # noqa: E402

MiB = 1 << 20
CHUNK = 64 * MiB


def make_source(path: Path, size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True)
    ops: list[str] = []
    for i, offset in enumerate(range(0, size, CHUNK)):
        if i % 16 == 7:
            continue  # a hole: mirrored as zeros
        ops += ["-c", f"write -P {0x11 + i % 200} {offset} {min(CHUNK, size - offset)}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *ops, str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def start_daemon(impl: str, sock: Path, nodes: list[str]
                 ) -> tuple[subprocess.Popen[bytes], Path | socket.socket]:
    """qmpd (this checkout) with ``nodes``, its QMP on ``sock``, or qemu-storage-daemon
    with ``nodes``, its QMP on the socket returned (a :class:`QsdMonitor`)."""
    if impl == "qsd":
        monitor = QsdMonitor("c")
        return monitor.popen(["qemu-storage-daemon", *monitor.args, *nodes],
                             stdout=subprocess.DEVNULL), monitor.sock
    sock.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "qmpd", "--qmp", f"unix:{sock}", *nodes]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{impl} did not start")
        time.sleep(0.01)
    return proc, sock


def start(impl: str, work: Path, src: Path, tgt: Path
          ) -> tuple[subprocess.Popen[bytes], Path | socket.socket]:
    nodes = ["--blockdev", f"driver=qcow2,node-name=src,file.driver=file,file.filename={src}",
             "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}"]
    return start_daemon(impl, work / f"{impl}.qmp", nodes)


def one_run(impl: str, work: Path, src: Path, size: int) -> dict[str, float]:
    tgt = work / "tgt.qcow2"
    tgt.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tgt), str(size)],
                   check=True)
    proc, sock = start(impl, work, src, tgt)
    try:
        qmp = QmpClient(sock, 600, check_schema=False, negotiate=True)
        cpu0 = cpu_seconds(proc.pid)
        t0 = time.perf_counter()
        qmp.ok("blockdev-mirror", {"job-id": "m", "device": "src", "target": "tgt",
                                   "sync": "full"})
        qmp.wait_event("BLOCK_JOB_READY", timeout=600)
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(proc.pid) - cpu0
        qmp.ok("block-job-cancel", {"device": "m"})
        qmp.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        qmp.close()
    finally:
        proc.terminate()
        proc.wait(60)
    same = subprocess.run(["qemu-img", "compare", "-q", str(src), str(tgt)]).returncode == 0
    if not same:
        raise SystemExit(f"{impl}: the target differs from the source")
    return {"seconds": elapsed, "mb_s": size / elapsed / 1e6,
            "cpu_s_per_gib": cpu / (size / (1 << 30))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the images go (default: a temp dir)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--drop-caches", action="store_true",
                        help="drop the page cache before every run (root; steadier numbers)")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="mirror-bench-", dir=args.dir))
    try:
        src = work / "src.qcow2"
        make_source(src, size)
        impls = ["qsd", "qmpd"]
        runs: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
        for rep in range(args.reps):
            order = impls if rep % 2 == 0 else impls[::-1]
            for impl in order:
                if args.drop_caches and not drop_caches():
                    raise SystemExit("--drop-caches needs root")
                result = one_run(impl, work, src, size)
                runs[impl].append(result)
                print(f"rep {rep + 1} {impl:5s} {result['mb_s']:8.1f} MB/s "
                      f"{result['seconds']:6.2f} s  cpu {result['cpu_s_per_gib']:.2f} s/GiB",
                      flush=True)
        summary: dict[str, Any] = {}
        for impl in impls:
            summary[impl] = {key: statistics.median(r[key] for r in runs[impl])
                             for key in runs[impl][0]}
        ratio = summary["qmpd"]["mb_s"] / summary["qsd"]["mb_s"]
        print(f"\nmirror of a {args.size} qcow2 to a local qcow2, medians of {args.reps}:")
        for impl in impls:
            s = summary[impl]
            print(f"  {impl:5s} {s['mb_s']:8.1f} MB/s  cpu {s['cpu_s_per_gib']:.2f} s/GiB")
        print(f"  ratio qmpd/qsd: {ratio:.2f}x (goal >= 1.0x)")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": runs, "median": summary,
                                                   "ratio": ratio}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
