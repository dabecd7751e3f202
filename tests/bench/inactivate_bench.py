#!/usr/bin/env python3
"""CPU cost of inactivate-all (the source side of a handover), in process.

Not a pytest test.  For each K it opens K qcow2 nodes (each over its own file
node) active, as on a migration source, then repeats: ``activate_all()``
(untimed), ``inactivate_all()`` timed with ``time.process_time`` (CPU of the
whole process, so I/O-thread work counts) and ``time.perf_counter``.  The
medians per node are what to compare on a busy machine.  ``--dirty`` writes
one cluster to every node before each inactivation (the flush path), and
``--profile`` prints a cProfile of the timed calls at the largest K.

    python tests/bench/inactivate_bench.py [--ks 1,100,1000] [--reps 21] [--dirty]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qmpd.block.core import BlockLayer
from tests.bench.invalidate_bench import close
from tests.bench.startup_bench import make_images


async def open_active(paths: list[Path]) -> BlockLayer:
    layer = BlockLayer()
    for i, path in enumerate(paths):
        await layer.add({"driver": "qcow2", "node-name": f"n{i}",
                         "file": {"driver": "file", "filename": str(path)}})
    return layer


async def runs(paths: list[Path], reps: int, dirty: bool,
               profiler: cProfile.Profile | None) -> list[tuple[float, float]]:
    layer = await open_active(paths)
    nodes = [layer.graph.lookup(f"n{i}") for i in range(len(paths))]
    out = []
    try:
        for _ in range(reps):
            await layer.activate_all()
            if dirty:
                for node in nodes:
                    assert node is not None
                    await node.driver.write(0, b"x" * 65536)
            # As the migration source does: no collection in the downtime (and
            # none just before either, which leaves the CPU caches cold).
            gc.disable()
            cpu, wall = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            await layer.inactivate_all()
            if profiler is not None:
                profiler.disable()
            out.append((time.process_time() - cpu, time.perf_counter() - wall))
            gc.enable()
    finally:
        await layer.activate_all()
        await close(layer)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", default="1,10,100,1000")
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--dirty", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * max(ks) + 256)), hard))
    directory = Path(tempfile.mkdtemp(prefix="qmpd-inactivate-", dir=args.dir or None))
    try:
        paths = make_images(directory, max(ks))
        print(f"{'K':>5} {'cpu us/node':>12} {'wall us/node':>13} {'cpu ms':>8} {'wall ms':>8}"
              f" {'best cpu ms':>12}")
        for k in ks:
            times = asyncio.run(runs(paths[:k], args.reps, args.dirty, None))
            cpu = statistics.median(t[0] for t in times)
            wall = statistics.median(t[1] for t in times)
            print(f"{k:>5} {cpu / k * 1e6:12.1f} {wall / k * 1e6:13.1f} {cpu * 1e3:8.2f}"
                  f" {wall * 1e3:8.2f} {min(t[0] for t in times) * 1e3:12.2f}", flush=True)
        if args.profile:
            profiler = cProfile.Profile()
            asyncio.run(runs(paths[:max(ks)], 3, args.dirty, profiler))
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(25)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
