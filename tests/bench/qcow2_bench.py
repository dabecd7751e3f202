#!/usr/bin/env python3
"""qcow2 driver throughput next to ``qemu-img bench``, in one run (not a pytest test).

For each target (tmpfs with the page cache, and a disk directory with
O_DIRECT / ``qemu-img bench -t none``) and each configuration
``{read,write} x {seq,rand} x {4k,64k}`` on a fully allocated 1 GiB image,
plus the allocating paths (``alloc.write.seq.64k``, ``alloc.write.rand.4k``
on a fresh empty image), it runs

* ``qemu-img bench -f qcow2 -d DEPTH -s BS -c COUNT [-S STRIDE] [-w] -t CACHE``;
* the same request stream through the qcow2 driver in this process (DEPTH
  coroutines, node-level read/write, the daemon's default graph thread pool);
* (``--file-baseline``) the same stream on a raw image through the ``file``
  driver alone: the ceiling of our protocol layer, so the qcow2 layer's own
  cost shows as qcow2/file;

and prints per-configuration medians and the ratio ours/qemu (computed per
repetition, then the median).  "rand" is qemu-img bench's stride mode (an odd
multiple of the block size, visiting every block once in scattered order).

It also times ``invalidate_cache`` (the activation reload) for 1 GiB and
1 TiB virtual sizes: the cost must not depend on the virtual size.

``--fast-io`` additionally runs ours with an experimental batched thread pool
in place of ``graph.run_io`` (asyncio's ``run_in_executor`` costs a
concurrent.futures round trip per request; the pool wakes the loop once per
batch of completions).  This is a measurement aid for the graph's owner, not
something the product uses.

Usage: python -m tests.bench.qcow2_bench [--reps 3] [--size-mib 1024]
           [--tmpfs /dev/shm] [--disk /tmp] [--depth 16] [--quick]
           [--file-baseline] [--fast-io] [--loop asyncio|uvloop] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import queue
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qmpd.block.graph import BlockGraph, BlockNode
from qmpd.block.qcow2.standalone import close_image, open_file_node, open_image

MiB = 1 << 20


# --- helpers ------------------------------------------------------------------------


def sh(*argv: str | Path) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def stride_for(bs: int) -> int:
    return bs * 100003 if bs <= 16384 else bs * 10007


def count_for(bs: int, direct: bool, quick: bool) -> int:
    n = (20000 if direct else 50000) if bs == 4096 else (8192 if direct else 16384)
    return max(256, n // 8) if quick else n


class BatchedPool:
    """Experimental: worker threads, completions handed to the loop in batches."""

    def __init__(self, loop: asyncio.AbstractEventLoop, threads: int) -> None:
        self.loop = loop
        self.q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.done: collections.deque[Any] = collections.deque()
        self.lock = threading.Lock()
        self.armed = False
        for _ in range(threads):
            threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            fut, fn, args = item
            try:
                res = (True, fn(*args))
            except BaseException as exc:  # handed to the awaiting coroutine
                res = (False, exc)
            self.done.append((fut, res))
            with self.lock:
                if self.armed:
                    continue
                self.armed = True
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self.lock:
            self.armed = False
        while self.done:
            fut, (ok, value) = self.done.popleft()
            if not fut.cancelled():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    async def run_io(self, fn: Callable[..., Any], *args: Any) -> Any:
        fut = self.loop.create_future()
        self.q.put((fut, fn, args))
        return await fut

    def stop(self, threads: int) -> None:
        for _ in range(threads):
            self.q.put(None)


def qemu_bench(img: Path, fmt: str, bs: int, count: int, step: int, write: bool,
               direct: bool) -> float:
    argv = ["qemu-img", "bench", "-f", fmt, "-t", "none" if direct else "writeback",
            "-d", str(ARGS.depth), "-s", str(bs), "-c", str(count)]
    if step != bs:
        argv += ["-S", str(step)]
    if write:
        argv += ["-w"]
    out = sh(*argv, img)
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        raise RuntimeError(out)
    if write:
        os.sync()
    return count / float(m.group(1))


async def ours(img: Path, fmt: str, bs: int, count: int, step: int, write: bool,
               direct: bool, fast: bool) -> float:
    graph = BlockGraph()
    pool = None
    if fast:
        pool = BatchedPool(asyncio.get_running_loop(), 16)
        graph.run_io = pool.run_io  # type: ignore[method-assign]
    node: BlockNode
    if fmt == "qcow2":
        node = await open_image(graph, str(img), cache_direct=direct)
    else:
        node = await open_file_node(graph, str(img), "raw", cache_direct=direct)
        await graph.refresh_perms(node)
    size = node.size()
    buf = b"\xa5" * bs
    nxt = 0

    async def worker() -> None:
        nonlocal nxt
        while nxt < count:
            off = (nxt * step) % size
            nxt += 1
            if write:
                await node.write(off, buf)
            else:
                await node.read(off, bs)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(ARGS.depth)))
    secs = time.perf_counter() - t0
    if fmt == "qcow2":
        await close_image(node)
    else:
        await node.driver.close()
    if pool is not None:
        pool.stop(16)
    graph.close()
    if write:
        os.sync()
    return count / secs


def run_ours(*args: Any) -> float:
    loop_factory = None
    if ARGS.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    if loop_factory is None:
        return asyncio.run(ours(*args))
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(ours(*args))


def prepare(dirpath: Path, size: int) -> dict[str, Path]:
    full = dirpath / "full.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", full, str(size))
    sh("qemu-io", "-f", "qcow2", "-c", f"write -q -P 0xa5 0 {size}", full)
    empty = dirpath / "empty.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", empty, str(size))
    paths = {"full": full, "empty": empty}
    if ARGS.file_baseline:
        raw = dirpath / "full.raw"
        sh("qemu-img", "create", "-q", "-f", "raw", raw, str(size))
        sh("qemu-io", "-f", "raw", "-c", f"write -q -P 0xa5 0 {size}", raw)
        paths["raw"] = raw
    os.sync()
    return paths


def configs() -> list[tuple[str, int, bool, bool, bool]]:
    """(name, bs, rand, write, alloc)."""
    out = []
    for bs in (4096, 65536):
        for write in (False, True):
            for rand in (False, True):
                name = f"{'write' if write else 'read'}.{'rand' if rand else 'seq'}.{bs // 1024}k"
                out.append((name, bs, rand, write, False))
    out.append(("alloc.write.seq.64k", 65536, False, True, True))
    out.append(("alloc.write.rand.4k", 4096, True, True, True))
    return out


def bench_target(label: str, dirpath: Path, direct: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="qcow2bench.", dir=dirpath))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        size = ARGS.size_mib * MiB
        print(f"[{label}] preparing {ARGS.size_mib} MiB images in {tmp} "
              f"({'O_DIRECT' if direct else 'page cache'})", file=sys.stderr)
        paths = prepare(tmp, size)
        for rep in range(ARGS.reps):
            cfgs = configs()
            random.Random(rep).shuffle(cfgs)
            for name, bs, rand, write, alloc in cfgs:
                count = count_for(bs, direct, ARGS.quick)
                count = min(count, size // bs)
                step = stride_for(bs) if rand else bs
                row = results.setdefault(name, {})
                runs: list[tuple[str, str, Callable[[Path], float]]] = [
                    ("qemu", "qcow2",
                     lambda p, bs=bs, c=count, s=step, w=write: qemu_bench(p, "qcow2", bs, c, s, w,
                                                                          direct)),
                    ("ours", "qcow2",
                     lambda p, bs=bs, c=count, s=step, w=write: run_ours(p, "qcow2", bs, c, s, w,
                                                                        direct, False)),
                ]
                if ARGS.fast_io:
                    runs.append(("ours+pool", "qcow2",
                                 lambda p, bs=bs, c=count, s=step, w=write: run_ours(
                                     p, "qcow2", bs, c, s, w, direct, True)))
                if ARGS.file_baseline and not alloc:
                    runs.append(("file", "raw",
                                 lambda p, bs=bs, c=count, s=step, w=write: run_ours(
                                     paths["raw"], "raw", bs, c, s, w, direct, False)))
                if rep % 2:
                    runs.reverse()
                for who, _fmt, fn in runs:
                    if alloc:
                        target = tmp / "alloc.qcow2"
                        shutil.copy(paths["empty"], target)
                    else:
                        target = paths["full"]
                    iops = fn(target)
                    row.setdefault(who, []).append(iops)
                    if alloc:
                        target.unlink()
                line = "  ".join(f"{w}={row[w][-1]:9.0f}" for w in row)
                print(f"  rep {rep + 1} {name:22s} {line}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp)
    return results


def summarize(label: str, results: dict[str, dict[str, list[float]]], bs_of: dict[str, int]
              ) -> dict[str, Any]:
    table = {}
    print(f"\n=== {label}: IOPS medians (MiB/s), ratio = ours/qemu per repetition, median ===")
    cols = ["qemu", "ours"] + (["ours+pool"] if ARGS.fast_io else []) + (
        ["file"] if ARGS.file_baseline else [])
    head = f"{'config':22s}" + "".join(f"{c:>22s}" for c in cols) + f"{'ratio':>8s}"
    if ARGS.fast_io:
        head += f"{'pool':>8s}"
    if ARGS.file_baseline:
        head += f"{'q/file':>8s}"
    print(head)
    for name, row in results.items():
        bs = bs_of[name]
        med = {w: statistics.median(v) for w, v in row.items()}
        ratio = statistics.median(o / q for o, q in zip(row["ours"], row["qemu"], strict=False))
        entry: dict[str, Any] = {"iops": med, "ratio_ours_over_qemu": round(ratio, 3),
                                 "runs": row}
        line = f"{name:22s}"
        for c in cols:
            if c in med:
                line += f"{med[c]:>11.0f} ({med[c] * bs / MiB:7.0f})"
            else:
                line += f"{'-':>22s}"
        line += f"{ratio:8.2f}"
        if ARGS.fast_io:
            pr = statistics.median(o / q for o, q in zip(row["ours+pool"], row["qemu"],
                                                          strict=False))
            entry["ratio_pool_over_qemu"] = round(pr, 3)
            line += f"{pr:8.2f}"
        if ARGS.file_baseline and "file" in row:
            fr = statistics.median(o / f for o, f in zip(row["ours"], row["file"], strict=False))
            entry["ratio_ours_over_file_driver"] = round(fr, 3)
            line += f"{fr:8.2f}"
        print(line)
        table[name] = entry
    return table


# --- invalidate_cache cost -------------------------------------------------------------------


async def invalidate_cost(dirpath: Path) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="qcow2inval.", dir=dirpath))
    out = {}
    try:
        for label, size in (("1GiB", 1 << 30), ("1TiB", 1 << 40)):
            img = tmp / f"{label}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
            cmds = []
            for k in range(64):
                cmds += ["-c", f"write -q -P 0x5 {k * (size // 64)} 64k"]
            sh("qemu-io", "-f", "qcow2", *cmds, img)
            graph = BlockGraph()
            node = await open_image(graph, str(img))
            drv = node.driver
            for k in range(64):  # warm the caches
                await node.read(k * (size // 64), 4096)
            times = []
            for _ in range(30 if not ARGS.quick else 10):
                await drv.inactivate()
                t0 = time.perf_counter()
                await drv.invalidate_cache()
                times.append(time.perf_counter() - t0)
            out[label] = statistics.median(times) * 1e3
            await close_image(node)
            graph.close()
    finally:
        shutil.rmtree(tmp)
    return out


# --- main ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--tmpfs", default="/dev/shm", help="'' to skip")
    p.add_argument("--disk", default=os.environ.get("TMPDIR", "/tmp"), help="'' to skip")
    p.add_argument("--quick", action="store_true", help="1/8 of the request counts")
    p.add_argument("--file-baseline", action="store_true")
    p.add_argument("--fast-io", action="store_true")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--json", default="")
    return p.parse_args()


ARGS = argparse.Namespace()


def main() -> None:
    global ARGS
    ARGS = parse_args()
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required")
    report: dict[str, Any] = {"params": vars(ARGS).copy(), "host": {
        "nproc": os.cpu_count(), "loadavg": os.getloadavg(),
        "qemu": sh("qemu-img", "--version").splitlines()[0]}}
    bs_of = {name: bs for name, bs, *_ in configs()}
    if ARGS.tmpfs:
        res = bench_target("tmpfs writeback", Path(ARGS.tmpfs), False)
        report["tmpfs"] = summarize(f"tmpfs ({ARGS.tmpfs}), writeback", res, bs_of)
    if ARGS.disk:
        res = bench_target("disk O_DIRECT", Path(ARGS.disk), True)
        report["disk"] = summarize(f"disk ({ARGS.disk}), O_DIRECT (-t none)", res, bs_of)
    target = Path(ARGS.tmpfs or ARGS.disk)
    cost = asyncio.run(invalidate_cost(target))
    report["invalidate_cache_ms"] = cost
    print("\n=== invalidate_cache (driver level, median) ===")
    for label, ms in cost.items():
        print(f"  {label:6s} virtual size: {ms:8.3f} ms")
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
