"""The NBD client's requests on a plain connection go straight from the
callers' buffers (no stream transport in between): what that must keep.

The server is ``qemu-nbd``, stopped with SIGSTOP so that a large write stays
queued in the client (the socket takes a few hundred KiB, not 16 MiB).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmpd.nbd.client import NbdClient
from tests.support.tools import qemu_img, require_tool, wait_for_socket

pytestmark = pytest.mark.qemu

MiB = 1 << 20
SIZE = 32 * MiB
WRITE = 16 * MiB


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    image = tmp_path / "disk.raw"
    qemu_img("create", "-q", "-f", "raw", str(image), str(SIZE))
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [require_tool("qemu-nbd"), "-k", str(sock), "-f", "raw", "-t", "--shared=2",
         str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(proc, sock)
        yield proc, sock
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)


async def test_a_cancelled_write_goes_out_whole_with_its_own_bytes(
        server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = server
    client = await NbdClient.connect(f"nbd+unix:///?socket={sock}")
    try:
        assert client._sender is not None, "a plain connection sends without the transport"
        buf = bytearray(b"\xa5" * WRITE)
        proc.send_signal(signal.SIGSTOP)  # the server reads nothing: the write stays queued
        write = asyncio.create_task(client.write(0, memoryview(buf)))
        await asyncio.sleep(0.05)
        assert not write.done()
        write.cancel()
        await asyncio.sleep(0)
        # The caller's buffer is its own again once the cancel is through.
        buf[:] = b"\x5a" * WRITE
        with pytest.raises(asyncio.CancelledError):
            await write
        proc.send_signal(signal.SIGCONT)
        await asyncio.wait_for(client.flush(), 30)
        # The request went out whole, with the bytes it had when it was made.
        data = await asyncio.wait_for(client.read(0, WRITE), 30)
        assert len(data) == WRITE and data.count(0xA5) == WRITE  # (no 16 MiB diff on failure)
        # And the connection still works, in order, for what comes next.
        await client.write(WRITE, b"\x11" * MiB)
        assert (await client.read(WRITE, MiB)).count(0x11) == MiB
    finally:
        proc.send_signal(signal.SIGCONT)
        await client.disconnect(0)


async def test_a_server_gone_mid_write_fails_the_requests(
        server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, sock = server
    client = await NbdClient.connect(f"nbd+unix:///?socket={sock}")
    try:
        proc.send_signal(signal.SIGSTOP)
        write = asyncio.create_task(client.write(0, bytes(WRITE)))
        read = asyncio.create_task(client.read(0, 4096))  # queued behind the write
        await asyncio.sleep(0.05)
        assert not write.done() and not read.done()
        proc.kill()
        for task in (write, read):
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(task, 10)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(client.read(0, 4096), 10)
    finally:
        client.close()
