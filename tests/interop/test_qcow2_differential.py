"""Differential random testing of the qcow2 driver against a raw mirror.

Images come from ``qemu-img create`` with many option combinations (cluster
sizes 512 B..2 MiB, refcount widths 1..64, compat 0.10/1.1, lazy refcounts,
preallocation), optionally over backing chains written by qemu-io, or start
out compressed (``qemu-img convert -c``) or with an internal snapshot (shared
clusters).  Random reads, writes, zero writes (with and without unmap) and
discards go through the driver and are mirrored on a bytearray; every read is
compared.  At the end ``qemu-img check`` must exit 0 and ``qemu-img compare``
must find the image identical to the mirror.

Default counts keep the module at a few seconds per config; QMPD_SLOW=1 runs
the long variants (more operations, several seeds).
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmpd.block.graph import BlockNode
from tests.interop.test_qcow2_common import (
    assert_clean,
    assert_same,
    opened,
    qemu_img_create,
    qemu_io,
    run,
    to_raw,
    tools,
)

pytestmark = pytest.mark.qemu

MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    name: str
    cluster_size: int
    refcount_bits: int = 16
    compat: str = "1.1"
    size: int = 16 * MiB
    extra: str = ""
    source: str = "empty"  # empty | qcow2-backing | raw-backing | chain | compressed | snapshot
    unmap: bool = True

    @property
    def v3(self) -> bool:
        return self.compat == "1.1"

    @property
    def has_backing(self) -> bool:
        return self.source in ("qcow2-backing", "raw-backing", "chain")


CONFIGS = [
    Config("c64k-r16", 65536, 16, size=32 * MiB),
    Config("c512-r16", 512, 16, size=12 * MiB),
    Config("c512-r1", 512, 1, size=8 * MiB),
    Config("c1k-r2-v2", 1024, 16, "0.10", size=8 * MiB, unmap=False),
    Config("c4k-r4", 4096, 4, size=16 * MiB),
    Config("c8k-r8-lazy", 8192, 8, extra="lazy_refcounts=on"),
    Config("c16k-r32", 16384, 32, size=24 * MiB),
    Config("c4k-r64", 4096, 64),
    Config("c2m-r16", 2 * MiB, 16, size=64 * MiB),
    Config("c64k-v2", 65536, 16, "0.10", size=24 * MiB),
    Config("c64k-meta", 65536, 16, extra="preallocation=metadata"),
    Config("c4k-falloc", 4096, 16, extra="preallocation=falloc", size=8 * MiB),
    Config("c64k-full-v2", 65536, 16, "0.10", extra="preallocation=full", size=8 * MiB),
    Config("c64k-qcow2-backing", 65536, 16, source="qcow2-backing", size=24 * MiB),
    Config("c512-raw-backing", 512, 16, source="raw-backing", size=12 * MiB),
    Config("c4k-v2-qcow2-backing", 4096, 16, "0.10", source="qcow2-backing", size=24 * MiB),
    Config("c64k-chain", 65536, 16, source="chain", size=24 * MiB),
    Config("c2m-chain-r8", 2 * MiB, 8, source="chain", size=34 * MiB),
    Config("c64k-compressed", 65536, 16, source="compressed"),
    Config("c4k-snapshot", 4096, 16, source="snapshot"),
    Config("c64k-snapshot-v2", 65536, 16, "0.10", source="snapshot"),
]


def _make_backing(tmp: Path, kind: str) -> tuple[Path, str]:
    if kind == "raw":
        raw = tmp / "base.raw"
        rng = random.Random(7)
        raw.write_bytes(rng.randbytes(9 * MiB) + b"\x01" * 12345)  # smaller than overlays
        return raw, "raw"
    base = tmp / "base.qcow2"
    qemu_img_create(base, 20 * MiB, "cluster_size=4096")
    qemu_io(base, "write -q -P 0x5a 0 3M", "write -q -P 0x77 5000000 1M",
            "write -q -z 1M 100k", "write -q -P 0x31 12M 33k", "discard -q 2M 64k")
    return base, "qcow2"


def build_image(tmp: Path, cfg: Config) -> Path:
    img = tmp / "img.qcow2"
    opts = f"cluster_size={cfg.cluster_size},refcount_bits={cfg.refcount_bits},compat={cfg.compat}"
    if cfg.extra:
        opts += "," + cfg.extra
    if cfg.source in ("qcow2-backing", "raw-backing"):
        base, fmt = _make_backing(tmp, cfg.source.split("-")[0])
        qemu_img_create(img, cfg.size, opts, base, fmt)
    elif cfg.source == "chain":
        base, fmt = _make_backing(tmp, "raw")
        mid = tmp / "mid.qcow2"
        qemu_img_create(mid, 20 * MiB, "cluster_size=65536", base, fmt)
        qemu_io(mid, "write -q -P 0x42 1M 2M", "write -q -z 6M 1M", "write -q -P 0x43 8M 100k")
        qemu_img_create(img, cfg.size, opts, mid, "qcow2")
    elif cfg.source == "compressed":
        src = tmp / "src.qcow2"
        qemu_img_create(src, cfg.size, opts)
        qemu_io(src, "write -q -P 0x11 0 5M", "write -q -P 0x12 7M 1M",
                "write -q -P 0x13 9000000 300000")
        run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", opts, src, img)
    elif cfg.source == "snapshot":
        qemu_img_create(img, cfg.size, opts)
        qemu_io(img, "write -q -P 0x21 0 4M", "write -q -P 0x22 6M 1M")
        run("qemu-img", "snapshot", "-c", "snap1", img)
        qemu_io(img, "write -q -P 0x23 1M 64k")
    else:
        qemu_img_create(img, cfg.size, opts)
    return img


class Mirror:
    """The raw model of the image and QEMU's semantics for each operation."""

    def __init__(self, data: bytearray, cfg: Config) -> None:
        self.data = data
        self.cfg = cfg
        self.size = len(data)

    def write(self, off: int, buf: bytes) -> None:
        self.data[off : off + len(buf)] = buf

    def zero(self, off: int, n: int) -> None:
        self.data[off : off + n] = bytes(n)

    def discard(self, off: int, n: int) -> None:
        cs = self.cfg.cluster_size
        if not self.cfg.unmap:
            return  # discard=ignore (QEMU's default): discard requests do nothing
        if not self.cfg.v3 and self.cfg.has_backing:
            return  # v2 with a backing file: QEMU refuses (ENOTSUP)
        start = -(-off // cs) * cs
        end = (off + n) // cs * cs
        if off + n == self.size and self.size % cs and end >= off:
            end = self.size
        if end > start:
            self.data[start:end] = bytes(end - start)


def _pick(rng: random.Random, size: int, cs: int) -> tuple[int, int]:
    if rng.random() < 0.5:
        off = rng.randrange(0, max(1, size // cs)) * cs + rng.choice(
            [0, 0, 512, max(0, cs - 512), rng.randrange(cs)])
    else:
        off = rng.randrange(size)
    off = min(off, size - 1)
    n = rng.choice([1, 512, 4096, cs, 2 * cs, rng.randrange(1, 3 * cs + 1),
                    rng.randrange(1, MiB + 1)])
    return off, max(1, min(n, size - off))


async def _one_op(node: BlockNode, mirror: Mirror, rng: random.Random, i: int) -> None:
    off, n = _pick(rng, mirror.size, mirror.cfg.cluster_size)
    k = rng.random()
    if k < 0.40:
        buf = rng.randbytes(n)
        await node.write(off, buf)
        mirror.write(off, buf)
    elif k < 0.55:
        await node.write_zeroes(off, n, may_unmap=rng.random() < 0.5)
        mirror.zero(off, n)
    elif k < 0.67:
        await node.discard(off, n)
        mirror.discard(off, n)
    elif k < 0.97:
        got = await node.read(off, n)
        want = bytes(mirror.data[off : off + n])
        if got != want:
            bad = next(j for j in range(n) if got[j] != want[j])
            raise AssertionError(f"op {i}: read {off}+{n} differs at {off + bad}")
    else:
        await node.flush()


def _disjoint_batch(rng: random.Random, size: int, cs: int, count: int) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for _ in range(count * 4):
        off, n = _pick(rng, size, cs)
        if all(off + n <= a or b <= off for a, b in ((x, x + m) for x, m in ranges)):
            ranges.append((off, n))
            if len(ranges) == count:
                break
    return ranges


async def _concurrent_batch(node: BlockNode, mirror: Mirror, rng: random.Random) -> None:
    """Several writes/zeroes/discards at once on disjoint ranges (a deterministic result)."""
    batch = _disjoint_batch(rng, mirror.size, mirror.cfg.cluster_size, 8)
    coros = []
    for off, n in batch:
        k = rng.random()
        if k < 0.6:
            buf = rng.randbytes(n)
            coros.append(node.write(off, buf))
            mirror.write(off, buf)
        elif k < 0.8:
            coros.append(node.write_zeroes(off, n, may_unmap=rng.random() < 0.5))
            mirror.zero(off, n)
        else:
            coros.append(node.discard(off, n))
            mirror.discard(off, n)
    await asyncio.gather(*coros)
    # then concurrent reads of everything the batch touched
    reads = [node.read(off, n) for off, n in batch]
    for (off, n), got in zip(batch, await asyncio.gather(*reads), strict=True):
        assert got == bytes(mirror.data[off : off + n]), f"concurrent batch read {off}+{n}"


async def differential(tmp: Path, cfg: Config, nops: int, seed: int,
                       batches: int = 0) -> None:
    img = build_image(tmp, cfg)
    ref_path = tmp / "ref.raw"
    mirror = Mirror(bytearray(to_raw(img, ref_path)), cfg)
    rng = random.Random(seed)
    async with opened(img, discard_unmap=cfg.unmap) as node:
        for i in range(nops):
            await _one_op(node, mirror, rng, i)
            if batches and i % max(1, nops // batches) == 0:
                await _concurrent_batch(node, mirror, rng)
        got = await node.read(0, mirror.size)
        assert got == bytes(mirror.data), "final full read differs"
    ref_path.write_bytes(mirror.data)
    assert_clean(img)
    assert_same(img, ref_path)


SEED = int(os.environ.get("QMPD_SEED", "20261126"))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
async def test_differential(tmp_path: Path, cfg: Config) -> None:
    tools()
    await differential(tmp_path, cfg, nops=160, seed=SEED, batches=4)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_differential_long(tmp_path: Path, cfg: Config, seed: int) -> None:
    tools()
    await differential(tmp_path, cfg, nops=3000, seed=SEED + seed, batches=60)


async def chaos(tmp: Path, cfg: Config, workers: int, ops: int, seed: int) -> None:
    """Overlapping concurrent operations (no single expected result), then a
    sequential differential phase starting from whatever the image holds: the
    metadata must stay consistent and the image must stay self-consistent."""
    img = build_image(tmp, cfg)
    rng = random.Random(seed)
    async with opened(img, discard_unmap=cfg.unmap) as node:
        size = node.size()

        async def worker(wrng: random.Random) -> None:
            for _ in range(ops):
                # a few hot clusters, so requests really collide
                if wrng.random() < 0.6:
                    off = wrng.randrange(0, 4 * cfg.cluster_size) + wrng.choice([0, size // 2])
                else:
                    off = wrng.randrange(size)
                off = min(off, size - 1)
                n = max(1, min(wrng.randrange(1, 3 * cfg.cluster_size), size - off))
                k = wrng.random()
                if k < 0.5:
                    await node.write(off, wrng.randbytes(n))
                elif k < 0.65:
                    await node.write_zeroes(off, n, may_unmap=wrng.random() < 0.5)
                elif k < 0.8:
                    await node.discard(off, n)
                elif k < 0.95:
                    await node.read(off, n)
                else:
                    await node.flush()

        await asyncio.gather(*(worker(random.Random(rng.random())) for _ in range(workers)))
        await node.flush()
        mirror = Mirror(bytearray(await node.read(0, size)), cfg)
        for i in range(100):
            await _one_op(node, mirror, rng, i)
        assert await node.read(0, size) == bytes(mirror.data)
    ref = tmp / "ref.raw"
    ref.write_bytes(mirror.data)
    assert_clean(img)
    assert_same(img, ref)


CHAOS = [c for c in CONFIGS if c.name in ("c512-r16", "c4k-r4", "c64k-qcow2-backing",
                                          "c64k-compressed", "c4k-snapshot", "c1k-r2-v2")]


@pytest.mark.parametrize("cfg", CHAOS, ids=lambda c: c.name)
async def test_concurrent_chaos(tmp_path: Path, cfg: Config) -> None:
    tools()
    await chaos(tmp_path, cfg, workers=8, ops=40, seed=SEED)


@pytest.mark.slow
@pytest.mark.parametrize("cfg", CHAOS, ids=lambda c: c.name)
async def test_concurrent_chaos_long(tmp_path: Path, cfg: Config) -> None:
    tools()
    await chaos(tmp_path, cfg, workers=16, ops=600, seed=SEED + 1)
