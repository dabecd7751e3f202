"""Cost of invalidate-all (activating every block node), in process.

Not a pytest test.  For K = 1, 100 and 1000 qcow2 nodes (each over its own
file node) it opens the images inactive, as a migration destination does,
then times ``BlockLayer.activate_all()``: every node re-reads its header, L1
table and refcount table and takes its locks.  It also compares 1 GiB with
1 TiB virtual size at K = 100, since the cost must not grow with image size.

    python tests/bench/invalidate_bench.py [--reps 5] [--counts 1,100,1000]

Target (issue 3): <= 0.2 ms per node, flat in virtual size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qmpd.block.core import BlockLayer
from tests.bench.startup_bench import make_images


async def open_inactive(paths: list[Path]) -> BlockLayer:
    """A block layer with a qcow2 node over a file node per image, inactive."""
    layer = BlockLayer()
    for i, path in enumerate(paths):
        await layer.add(
            {"driver": "qcow2", "node-name": f"n{i}",
             "file": {"driver": "file", "filename": str(path)}},
            inactive=True,
        )
    return layer


async def close(layer: BlockLayer) -> None:
    await layer.close_all()
    layer.graph.close()


async def one_run(paths: list[Path]) -> float:
    layer = await open_inactive(paths)
    start = time.perf_counter()
    await layer.activate_all()
    elapsed = time.perf_counter() - start
    await close(layer)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--counts", default="1,100,1000")
    parser.add_argument("--dir", default="")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    directory = Path(args.dir or tempfile.mkdtemp(prefix="qmpd-invalidate-"))
    try:
        rows = []
        for size, ks in (("1G", counts), ("1T", [100])):
            for k in ks:
                paths = make_images(directory, k, size)
                # Like a migration destination, start with no dirty page cache
                # for the images: activation's flush must not write our copies.
                os.sync()
                times = [asyncio.run(one_run(paths)) for _ in range(args.reps)]
                med = statistics.median(times)
                rows.append((size, k, med * 1000, med / k * 1000, min(times) * 1000))
        print(f"{'virtual size':>12} {'nodes':>6} {'activate_all ms':>16} "
              f"{'ms per node':>12} {'best ms':>9}")
        for size, k, total, per, best in rows:
            print(f"{size:>12} {k:>6} {total:16.2f} {per:12.3f} {best:9.2f}")
        flat = {size: per for size, k, _, per, _ in rows if k == 100}
        if "1G" in flat and "1T" in flat:
            print(f"per-node cost 1 TiB / 1 GiB at K=100: {flat['1T'] / flat['1G']:.2f}x")
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
