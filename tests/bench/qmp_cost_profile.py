#!/usr/bin/env python3
"""CPU cost of the QMP layer per command, in a real daemon (not a pytest test).

Starts ``python -m qmpd`` (optionally under cProfile) with one UNIX-socket
monitor, adds K qcow2-over-file nodes, then runs ``query-named-block-nodes``
R times.  Reports the daemon's CPU time (user+system from /proc, all
threads) per ``blockdev-add`` and per query, and with ``--profile FILE``
leaves a cProfile of the daemon's main thread for ``pstats``.

Usage: python tests/bench/qmp_cost_profile.py [--nodes 1000] [--queries 20]
       [--profile /tmp/qmpd.prof] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.qmp import QmpClient

REPO = Path(__file__).resolve().parents[2]
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system time of every thread of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--profile", default="")
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmp-cost.", dir=args.dir or None))
    try:
        base = work / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
        images = []
        for i in range(args.nodes):
            image = work / f"img{i}.qcow2"
            shutil.copyfile(base, image)
            images.append(image)
        sock = work / "qmp.sock"
        chardev = f"socket,id=m0,path={sock},server=on,wait=off"
        prof = ["-m", "cProfile", "-o", args.profile] if args.profile else []
        cmd = [sys.executable, *prof, "-m", "qmpd", "--chardev", chardev,
               "--monitor", "chardev=m0"]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        try:
            client = QmpClient(str(sock), timeout=120, wait=30, proc=proc, check_schema=False)
            client.negotiate()
            client.ok("query-version")
            c0, t0 = cpu_seconds(proc.pid), time.perf_counter()
            for i, image in enumerate(images):
                client.ok("blockdev-add", {"driver": "qcow2", "node-name": f"q{i}",
                                           "file": {"driver": "file", "node-name": f"f{i}",
                                                    "filename": str(image)}})
            c1, t1 = cpu_seconds(proc.pid), time.perf_counter()
            walls = []
            for _ in range(args.queries):
                t = time.perf_counter()
                client.ok("query-named-block-nodes")
                walls.append(time.perf_counter() - t)
            c2 = cpu_seconds(proc.pid)
            client.cmd("quit")
            client.close()
            proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        k = max(args.nodes, 1)
        print(f"blockdev-add: {(c1 - c0) / k * 1e3:.3f} ms CPU/node, "
              f"{(t1 - t0) / k * 1e3:.3f} ms wall/node (K={args.nodes})")
        print(f"query-named-block-nodes ({2 * args.nodes} nodes): "
              f"{(c2 - c1) / args.queries * 1e3:.2f} ms CPU/query, "
              f"median wall {statistics.median(walls) * 1e3:.2f} ms")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
