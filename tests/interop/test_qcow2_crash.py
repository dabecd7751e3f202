"""Crash consistency: a writer killed with SIGKILL never leaves a corrupt image.

A child process (this module run with ``child`` arguments) opens an image
through the qcow2 driver and runs an allocating write load: batches of
concurrent writes into fresh "slots" (partial clusters, across cluster
boundaries, COW from a backing file), plus zero writes, discards and
overwrites in a scratch area (so clusters are freed and reused).  After each
completed flush it reports, on stdout, how many slot writes that flush
covers.  The parent kills it at a random moment, then:

* ``qemu-img check`` must exit 0 or 3 (leaks are allowed, corruption is not);
* every slot write acknowledged before the last completed flush must read
  back exactly (through ``qemu-img convert``, i.e. QEMU's reading).

The next round reopens the same (possibly leaky) image and continues with new
slots, so recovery from a crashed state is exercised too.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop.test_qcow2_common import check, qemu_img_create, to_raw, tools

pytestmark = pytest.mark.qemu

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
BATCH = 6


def slot_layout(size: int, cluster_size: int) -> tuple[int, int, int]:
    """(slot size, number of slots, start of the scratch area)."""
    slot = 3 * cluster_size + 1536 if cluster_size < 65536 else 2 * cluster_size
    scratch = size * 3 // 4
    return slot, scratch // slot, scratch


def slot_write(seed: int, wid: int, size: int, cluster_size: int) -> tuple[int, bytes]:
    """The offset and data of slot write ``wid`` (the same in parent and child)."""
    slot, nslots, _ = slot_layout(size, cluster_size)
    perm = list(range(nslots))
    random.Random(seed).shuffle(perm)
    rng = random.Random(seed * 1_000_003 + wid)
    base = perm[wid % nslots] * slot
    off = base + rng.randrange(0, slot // 2)
    n = rng.randrange(1, slot - (off - base) + 1)
    return off, rng.randbytes(n)


async def child_main(image: str, seed: int, start: int, cluster_size: int) -> None:
    from qmpd.block.graph import BlockGraph
    from qmpd.block.qcow2.standalone import open_image

    graph = BlockGraph(io_threads=4)
    node = await open_image(graph, image, discard_unmap=True)
    size = node.size()
    _, nslots, scratch = slot_layout(size, cluster_size)
    rng = random.Random(seed ^ start)
    out = sys.stdout
    out.write("READY\n")
    out.flush()
    wid = start
    while wid + BATCH <= nslots:
        ops = []
        for _ in range(BATCH):
            off, data = slot_write(seed, wid, size, cluster_size)
            ops.append(node.write(off, data))
            wid += 1
        for _ in range(2):
            off = scratch + rng.randrange(0, size - scratch - 1)
            n = min(rng.randrange(1, 4 * cluster_size), size - off)
            k = rng.random()
            if k < 0.4:
                ops.append(node.write(off, rng.randbytes(n)))
            elif k < 0.7:
                ops.append(node.write_zeroes(off, n, may_unmap=rng.random() < 0.5))
            else:
                ops.append(node.discard(off, n))
        await asyncio.gather(*ops)
        if rng.random() < 0.5:
            await node.flush()
            out.write(f"F {wid}\n")
            out.flush()
    await node.flush()
    out.write(f"F {wid}\nDONE\n")
    out.flush()
    # no clean close: the parent kills us anyway
    await asyncio.sleep(3600)


def crash_round(image: Path, seed: int, start: int, cluster_size: int, rng: random.Random,
                tmp: Path) -> tuple[int, int]:
    """Run the child, kill it, check the image.

    Returns the next free write id and the number of flushed writes verified.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.interop.test_qcow2_crash", "child", str(image),
         str(seed), str(start), str(cluster_size)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise AssertionError(f"child did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    time.sleep(rng.uniform(0.02, 0.6))
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"child exited by itself: {proc.returncode} {err}"
    flushed = start
    for row in out.splitlines():
        if row.startswith("F "):
            flushed = int(row.split()[1])
    result = check(image)
    assert result.returncode in (0, 3), (
        f"corruption after SIGKILL (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    if flushed > start:
        data = to_raw(image, tmp / "crash.raw")
        size = len(data)
        for wid in range(start, flushed):
            off, want = slot_write(seed, wid, size, cluster_size)
            assert data[off : off + len(want)] == want, f"flushed write {wid} lost"
    # continue after the last write that may have been in flight
    return max(flushed, start) + 4 * BATCH, flushed - start


def run_crashes(tmp: Path, rounds: int, seed: int) -> None:
    tools()
    rng = random.Random(seed)
    configs = [
        ("c512", 512, "cluster_size=512", 12 * MiB, False),
        ("c4k-r1", 4096, "cluster_size=4096,refcount_bits=1", 24 * MiB, False),
        ("c64k-backing", 65536, "cluster_size=65536", 48 * MiB, True),
        ("c1k-r64", 1024, "cluster_size=1024,refcount_bits=64", 16 * MiB, False),
    ]
    done = 0
    verified = 0
    while done < rounds:
        for name, cs, opts, size, backing in configs:
            if done >= rounds:
                break
            image = tmp / f"{name}.qcow2"
            if not image.exists():
                if backing:
                    base = tmp / "base.raw"
                    base.write_bytes(random.Random(5).randbytes(size // 2))
                    qemu_img_create(image, size, opts, base, "raw")
                else:
                    qemu_img_create(image, size, opts)
                (tmp / f"{name}.next").write_text("0")
            start = int((tmp / f"{name}.next").read_text())
            nslots = slot_layout(size, cs)[1]
            if start + BATCH > nslots:
                image.unlink()
                continue
            nxt, n = crash_round(image, seed, start, cs, rng, tmp)
            verified += n
            (tmp / f"{name}.next").write_text(str(nxt))
            done += 1
    assert verified > 0, "no flush completed before any kill: the test checked nothing"


def test_crash_consistency(tmp_path: Path) -> None:
    run_crashes(tmp_path, rounds=int(os.environ.get("QMPD_CRASH_ROUNDS", "8")), seed=11)


@pytest.mark.slow
def test_crash_consistency_long(tmp_path: Path) -> None:
    run_crashes(tmp_path, rounds=150, seed=12)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "child":
    asyncio.run(child_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
