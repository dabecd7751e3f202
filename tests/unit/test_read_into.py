"""``read_into`` (a read into the caller's buffer) against the plain read path
and against what QEMU reads (``qemu-img convert`` of the same images).

The images are made with qemu-img and qemu-io: a qcow2 overlay (64 KiB
clusters) over a qcow2 (4 KiB clusters) over a raw file, each shorter than
the one above it, with data, partial-cluster writes (copy-on-write from
below), zero clusters (plain and allocated), compressed clusters and ranges
crossing the end of the backing file.  Random ranges, aligned or not, are
read through qcow2, file, raw (with an offset) and nbd (a qemu-nbd export):
``read_into`` must fill exactly its buffer with the bytes QEMU reads.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmpd.block.driver import ChildRole
from qmpd.block.graph import BlockGraph, BlockNode, NodeConfig
from qmpd.block.nbd import NbdDriver
from qmpd.block.qcow2.driver import Qcow2Driver
from qmpd.block.qcow2.format import ClusterType
from qmpd.block.qcow2.format import cluster_type as entry_type
from qmpd.block.qcow2.standalone import close_image, open_file_node, open_image
from qmpd.block.raw import RawDriver
from tests.support.tools import require_tool

K = 1024
BASE_SIZE = 5 * 65536 + 3 * 512  # raw, not cluster-aligned
MID_SIZE = 10 * 65536 + 3 * 4096  # qcow2, 4 KiB clusters
TOP_SIZE = 32 * 65536  # qcow2, 64 KiB clusters
RAW_OFFSET = 4096 + 512

#: (options, offset, length) of the qemu-io writes on each image; "" data
#: writes random bytes, "-z"/"-z -u" zeroes, "-c" compresses whole clusters.
MID_WRITES = [
    ("", 2 * 4096 + 100, 5000),  # partial clusters: COW from the raw base
    ("-z", 10 * 4096, 3 * 4096),  # allocated zero clusters over base data
    ("-z -u", 14 * 4096, 2 * 4096),  # plain zero clusters
    ("-c", 20 * 4096, 4096),  # compressed
    ("-c", 21 * 4096, 4096),
    ("", BASE_SIZE - 7000, 20000),  # across the end of the base
    ("", MID_SIZE - 4096 - 300, 4096 + 300),  # up to the end
]
TOP_WRITES = [
    ("", 65536 + 1000, 3000),
    ("-z", 3 * 65536, 2 * 65536),
    ("-z -u", 8 * 65536, 65536),  # over mid data: reads zeros, not the backing
    ("-c", 6 * 65536, 65536),
    ("", 600_000, 200_000),  # across the end of mid
    ("", 25 * 65536, 2 * 65536),
    ("-z", 28 * 65536 + 512, 1024),  # a partial zero write: data
    ("", TOP_SIZE - 777, 777),
]


@dataclass
class Chain:
    top: Path
    mid: Path
    base: Path
    ref: dict[str, bytes] = field(repr=False)


def _run(*argv: str | Path) -> None:
    subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def _apply(path: Path, fmt: str, writes: list[tuple[str, int, int]], rng: random.Random,
           tmp: Path) -> None:
    ops: list[str] = []
    for i, (opts, offset, length) in enumerate(writes):
        if "-z" in opts:
            ops += ["-c", f"write -q {opts} {offset} {length}"]
            continue
        src = tmp / f"{path.name}.{i}.src"
        if "-c" in opts:
            # Compressible (else QEMU stores the cluster uncompressed), and
            # different every 128 bytes.
            data = b"".join(rng.randbytes(16) * 8 for _ in range(length // 128))
        else:
            data = rng.randbytes(length)
        src.write_bytes(data)
        ops += ["-c", f"write -q {opts} -s {src} {offset} {length}"]
    _run("qemu-io", "-f", fmt, *ops, path)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    require_tool("qemu-img")
    require_tool("qemu-io")
    tmp = tmp_path_factory.mktemp("read_into")
    rng = random.Random(12)
    base, mid, top = tmp / "base.raw", tmp / "mid.qcow2", tmp / "top.qcow2"
    base.write_bytes(rng.randbytes(BASE_SIZE))
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
         "-b", base, "-F", "raw", mid, str(MID_SIZE))
    _apply(mid, "qcow2", MID_WRITES, rng, tmp)
    _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top,
         str(TOP_SIZE))
    _apply(top, "qcow2", TOP_WRITES, rng, tmp)
    ref: dict[str, bytes] = {}
    for name, path, fmt in (("top", top, "qcow2"), ("mid", mid, "qcow2")):
        out = tmp / f"{name}.ref"
        _run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out)
        ref[name] = out.read_bytes()
    ref["base"] = base.read_bytes()
    ref["raw"] = ref["base"][RAW_OFFSET:]
    assert len(ref["top"]) == TOP_SIZE and len(ref["mid"]) == MID_SIZE
    # The images hold what the test is about (qemu-img map's view).
    mapped = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(top)],
                            check=True, capture_output=True, text=True).stdout
    assert '"zero": true' in mapped and '"depth": 2' in mapped
    asyncio.run(_with_graph(lambda graph: _check_compressed(graph, top)))
    return Chain(top, mid, base, ref)


async def _check_compressed(graph: BlockGraph, path: Path) -> None:
    """The ``-c`` writes did make compressed clusters, in both qcow2 layers."""
    top = await open_image(graph, str(path), read_only=True)
    try:
        for node, writes in ((top, TOP_WRITES), (top.backing, MID_WRITES)):
            assert node is not None
            driver = node.driver
            assert isinstance(driver, Qcow2Driver) and driver.image is not None
            image = driver.image
            for opts, offset, _ in writes:
                if opts == "-c":
                    entry = int((await image.entries(offset >> image.cluster_bits, 1))[0])
                    assert entry_type(entry) == ClusterType.COMPRESSED
    finally:
        await close_image(top)


def _boundaries() -> list[int]:
    points = {0, BASE_SIZE, MID_SIZE, TOP_SIZE}
    for _, offset, length in MID_WRITES + TOP_WRITES:
        points |= {offset, offset + length}
    points |= set(range(0, TOP_SIZE + 1, 65536))
    return sorted(p for p in points if p <= TOP_SIZE)


_POINTS = _boundaries()


@st.composite
def _ranges(draw: st.DrawFn, size: int) -> tuple[int, int]:
    near = draw(st.sampled_from([p for p in _POINTS if p <= size]))
    offset = draw(st.one_of(
        st.integers(0, size),
        st.integers(max(0, near - 700), min(size, near + 700)),
    ))
    length = draw(st.one_of(st.integers(0, 5000), st.integers(0, size - offset)))
    return offset, min(length, size - offset)


async def _check(node: BlockNode, ref: bytes, ranges: list[tuple[int, int]]) -> None:
    for offset, length in ranges:
        want = ref[offset : offset + length]
        assert await node.read(offset, length) == want, (offset, length)
        # A buffer full of garbage, with guard bytes either side of the view.
        buf = bytearray(b"\xee" * (length + 16))
        await node.read_into(offset, memoryview(buf)[8 : 8 + length])
        assert bytes(buf[8 : 8 + length]) == want, (offset, length)
        assert buf[:8] == b"\xee" * 8 and buf[8 + length :] == b"\xee" * 8


def _node_config(read_only: bool = False) -> NodeConfig:
    return NodeConfig(read_only, False, "off", False, False, False, False)


async def _with_graph(body: Callable[[BlockGraph], Awaitable[None]]) -> None:
    graph = BlockGraph(io_threads=4)
    try:
        await body(graph)
    finally:
        graph.close()


_SETTINGS = settings(max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(ranges=st.lists(_ranges(TOP_SIZE), min_size=1, max_size=12))
def test_qcow2_chain(chain: Chain, ranges: list[tuple[int, int]]) -> None:
    async def body(graph: BlockGraph) -> None:
        top = await open_image(graph, str(chain.top), read_only=True)
        try:
            await _check(top, chain.ref["top"], ranges)
            mid = top.backing
            assert mid is not None and mid.backing is not None
            await _check(mid, chain.ref["mid"],
                         [(o, min(n, MID_SIZE - o)) for o, n in ranges if o <= MID_SIZE])
            await _check(mid.backing, chain.ref["base"],
                         [(o, min(n, BASE_SIZE - o)) for o, n in ranges if o <= BASE_SIZE])
        finally:
            await close_image(top)

    asyncio.run(_with_graph(body))


def _around_boundaries(size: int) -> list[tuple[int, int]]:
    """Unaligned ranges starting, ending and crossing at every boundary."""
    out = []
    for p in _POINTS:
        for start, length in ((p - 513, 1025), (p + 1, 4095), (p - 1, 2), (p + 300, 70000),
                              (p - 70001, 70000), (p, 1)):
            start = max(0, min(start, size))
            out.append((start, min(length, size - start)))
    return out


def test_qcow2_chain_boundaries(chain: Chain) -> None:
    async def body(graph: BlockGraph) -> None:
        top = await open_image(graph, str(chain.top), read_only=True)
        try:
            await _check(top, chain.ref["top"], _around_boundaries(TOP_SIZE))
            assert top.backing is not None
            await _check(top.backing, chain.ref["mid"], _around_boundaries(MID_SIZE))
        finally:
            await close_image(top)

    asyncio.run(_with_graph(body))


@_SETTINGS
@given(ranges=st.lists(_ranges(BASE_SIZE - RAW_OFFSET), min_size=1, max_size=12))
def test_raw_with_offset(chain: Chain, ranges: list[tuple[int, int]]) -> None:
    async def body(graph: BlockGraph) -> None:
        file = await open_file_node(graph, str(chain.base), "base-file", read_only=True)
        node = graph.new_node("raw", False, _node_config())
        node.driver = RawDriver(node)
        graph.attach(node, file, "file", ChildRole.image())
        await node.driver.open({"driver": "raw", "file": "base-file", "offset": RAW_OFFSET})
        graph.register(node)
        try:
            await _check(node, chain.ref["raw"], ranges)
        finally:
            await close_image(node)

    asyncio.run(_with_graph(body))


@pytest.fixture(scope="module")
def nbd_socket(chain: Chain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """qemu-nbd exporting the overlay (structured replies: holes as hole chunks)."""
    require_tool("qemu-nbd")
    sock = tmp_path_factory.mktemp("nbd") / "s.sock"
    proc = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-x", "top", "-k", str(sock),
                             "--persistent", "--shared=4", str(chain.top)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if sock.exists():
                break
            if proc.poll() is not None:
                pytest.fail("qemu-nbd exited")
            subprocess.run(["sleep", "0.01"], check=True)
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


@_SETTINGS
@given(ranges=st.lists(_ranges(TOP_SIZE), min_size=1, max_size=12))
def test_nbd(chain: Chain, nbd_socket: Path, ranges: list[tuple[int, int]]) -> None:
    async def body(graph: BlockGraph) -> None:
        node = graph.new_node("nbd", False, _node_config(read_only=True))
        driver = NbdDriver(node)
        node.driver = driver
        await driver.open({"driver": "nbd", "export": "top",
                           "server": {"type": "unix", "path": str(nbd_socket)}})
        graph.register(node)
        try:
            await _check(node, chain.ref["top"], ranges)
        finally:
            await driver.close()
            graph.unregister(node)

    asyncio.run(_with_graph(body))


def test_nbd_read_into_larger_than_a_request(chain: Chain, nbd_socket: Path) -> None:
    """Split over several NBD requests (the server's maximum block size)."""
    async def body(graph: BlockGraph) -> None:
        node = graph.new_node("nbd", False, _node_config(read_only=True))
        driver = NbdDriver(node)
        node.driver = driver
        await driver.open({"driver": "nbd", "export": "top",
                           "server": {"type": "unix", "path": str(nbd_socket)}})
        graph.register(node)
        try:
            driver._max_block = 65536 + 512
            await _check(node, chain.ref["top"], [(100, TOP_SIZE - 200), (0, TOP_SIZE)])
        finally:
            await driver.close()
            graph.unregister(node)

    asyncio.run(_with_graph(body))


def test_write_view_matches_write(chain: Chain, tmp_path: Path) -> None:
    """Writes from a borrowed view (the buffer reused right after) land as
    plain writes do, on a qcow2 overlay over the chain (COW included)."""
    overlay = tmp_path / "ov.qcow2"
    twin = tmp_path / "twin.qcow2"
    for path in (overlay, twin):
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-b", chain.top, "-F", "qcow2", path,
             str(TOP_SIZE))
    rng = random.Random(5)
    writes = [(rng.randrange(TOP_SIZE - 70000), rng.randrange(1, 70000)) for _ in range(40)]

    async def body(graph: BlockGraph) -> None:
        a = await open_image(graph, str(overlay), node_name="a")
        b = await open_image(graph, str(twin), node_name="b")
        try:
            buf = bytearray(70000)
            for offset, length in writes:
                data = rng.randbytes(length)
                buf[:length] = data
                await a.write_view(offset, memoryview(buf)[:length])
                buf[:length] = b"\x99" * length  # reused at once
                await b.write(offset, data)
        finally:
            await close_image(a)
            await close_image(b)

    asyncio.run(_with_graph(body))
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", str(overlay),
                    str(twin)], check=True)
    subprocess.run(["qemu-img", "check", "-q", str(overlay)], check=True)
    assert os.path.getsize(overlay) > 0
