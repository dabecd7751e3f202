#!/usr/bin/env python3
"""Start-up and node opening: qmpd next to qemu-storage-daemon 7.2 (not a pytest test).

Issue 10's non-migration targets, measured in one run on one machine:

* ``exec->listening``: from exec to a QMP socket that answers with its greeting,
  with one ``--chardev socket,...,server=on,wait=off --monitor`` (the default
  configuration of both), and the idle RSS a second later;
* ``first add``: the first ``blockdev-add`` of a qcow2 over a file node in a
  fresh daemon;
* ``add per node``: K more such ``blockdev-add``, sequential, per node;
* ``query-named-block-nodes`` with K nodes open.

Each target runs ``--reps`` times, alternating; medians, and the ratio
qmpd/QSD taken per repetition (then the median).

Usage: python tests/bench/startup_bench.py [--reps 5] [--nodes 1000] [--dir /dev/shm]
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


def argv(target: str, sock: Path) -> list[str]:
    chardev = f"socket,id=m0,path={sock},server=on,wait=off"
    if target == "qsd":
        return ["qemu-storage-daemon", "--chardev", chardev, "--monitor", "chardev=m0"]
    return [sys.executable, "-m", "qmpd", "--chardev", chardev, "--monitor", "chardev=m0"]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one_run(target: str, work: Path, images: list[Path]) -> dict[str, float]:
    sock = work / f"{target}.sock"
    sock.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen(argv(target, sock), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = QmpClient(str(sock), timeout=60, wait=30, proc=proc, check_schema=False)
        listening = time.perf_counter() - start
        time.sleep(1.0)
        idle_rss = rss_kib(proc.pid)
        client.negotiate()

        def add(i: int) -> None:
            client.ok("blockdev-add", {"driver": "qcow2", "node-name": f"q{i}",
                                       "file": {"driver": "file", "node-name": f"f{i}",
                                                "filename": str(images[i])}})

        t = time.perf_counter()
        add(0)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(1, len(images)):
            add(i)
        per_node = (time.perf_counter() - t) / max(len(images) - 1, 1)
        queries = []
        for _ in range(5):
            t = time.perf_counter()
            client.ok("query-named-block-nodes")
            queries.append(time.perf_counter() - t)
        client.cmd("quit")
        client.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"exec->listening ms": listening * 1e3, "idle RSS MiB": idle_rss / 1024,
            "first add ms": first * 1e3, "add per node ms": per_node * 1e3,
            "query-named-block-nodes ms": statistics.median(queries) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()
    if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
        print("needs qemu-storage-daemon and qemu-img (QEMU 7.2)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="startup-bench.", dir=args.dir or None))
    try:
        base = work / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1G"], check=True)
        images = []
        for i in range(args.nodes):
            image = work / f"img{i}.qcow2"
            shutil.copyfile(base, image)
            images.append(image)
        runs: dict[str, list[dict[str, float]]] = {"qmpd": [], "qsd": []}
        for rep in range(args.reps):
            order = ("qmpd", "qsd") if rep % 2 == 0 else ("qsd", "qmpd")
            for target in order:
                runs[target].append(one_run(target, work, images))
        metrics = list(runs["qmpd"][0])
        print(f"K = {args.nodes} qcow2-over-file nodes, {args.reps} repetitions, medians")
        print(f"{'metric':30} {'qmpd':>10} {'qsd':>10} {'qmpd/qsd':>9}")
        for m in metrics:
            ours = statistics.median(r[m] for r in runs["qmpd"])
            theirs = statistics.median(r[m] for r in runs["qsd"])
            ratio = statistics.median(a[m] / b[m] for a, b in zip(runs["qmpd"], runs["qsd"], strict=True)
                                      if b[m] > 0)
            print(f"{m:30} {ours:10.2f} {theirs:10.2f} {ratio:8.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
