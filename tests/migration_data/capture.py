#!/usr/bin/env python3
"""Capture QEMU 7.2 migration streams and how a QEMU destination treats streams.

Run from the repository root with QEMU installed::

    python -m tests.migration_data.capture           # rewrite the data files
    python -m tests.migration_data.capture --check   # re-ask QEMU, diff, write nothing

It writes, next to itself:

* ``captures/*.bin``: streams sent by ``qemu-system-x86_64 -M none -nodefaults``
  (``migrate`` to ``exec:cat > FILE``, or over a unix socket through a tapping
  proxy to a real destination when the return path is needed), and
  ``captures.json`` describing each one and what a QEMU destination made of it;
* ``refusals.json``: hand-made variants (broken or odd streams, built by
  :func:`variants` from two captures; the sha256 pins each one) with QEMU's
  exit status, exact stderr and resulting run state;
* ``truncations.json``: for some captures, the same for every truncation
  offset, as ranges of offsets with the same outcome.

The tests compare qmpd's reader with these records without needing QEMU.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.qmp import QmpClient
from tests.support.qsd import QsdMonitor

HERE = Path(__file__).resolve().parent
QEMU = "qemu-system-x86_64"
BASE_ARGS = ["-M", "none", "-nodefaults", "-display", "none"]


class Qemu:
    """One qemu-system-x86_64 -M none with a QMP socket."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.stderr_path = workdir / "stderr"
        self.stderr = open(self.stderr_path, "wb")
        # Connected from the start: QEMU 7.2 can hang a client that connects
        # to a listening QMP socket during its start-up (see QsdMonitor).
        monitor = QsdMonitor("qmp")
        self.proc = monitor.popen(
            [QEMU, *BASE_ARGS, *monitor.qemu_args, *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
        )
        # QEMU's replies are outside qmpd's schema.
        self.qmp = monitor.client(self.proc, 10.0, log=self.stderr_path, check_schema=False,
                                  ids=True, negotiate=True)

    def set_caps(self, caps: Sequence[str]) -> None:
        if caps:
            reply = self.qmp.cmd("migrate-set-capabilities", {
                "capabilities": [{"capability": c, "state": True} for c in caps]})
            assert reply == {"return": {}}, reply

    def quit(self) -> int:
        if self.proc.poll() is None:
            try:
                self.qmp.cmd("quit")
            except (OSError, EOFError, ValueError):
                pass
        rc = self.proc.wait(10)
        self.qmp.close()
        self.stderr.close()
        return rc

    def read_stderr(self) -> str:
        if not self.stderr.closed:
            self.stderr.flush()
        return self.stderr_path.read_text(errors="surrogateescape")


@contextmanager
def workdir() -> Iterator[Path]:
    # Short paths: unix socket names are limited to 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="qmig", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_migration(qmp: QmpClient, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = qmp.cmd("query-migrate")["return"]
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if info.get("status") == "pre-switchover":
            qmp.cmd("migrate-continue", {"state": "pre-switchover"})
        if time.monotonic() > deadline:
            raise TimeoutError(f"migration did not finish: {info}")
        time.sleep(0.005)


# ---------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------


def capture_exec(*, caps: Sequence[str] = (), extra: Sequence[str] = (),
                 before: Sequence[tuple[str, dict[str, Any] | None]] = ()) -> tuple[bytes, str]:
    """Migrate a fresh QEMU to ``exec:cat > FILE``; returns the stream and the source state."""
    with workdir() as tmp:
        src = Qemu(tmp, *extra)
        try:
            src.set_caps(caps)
            for command, args in before:
                reply = src.qmp.cmd(command, args)
                assert "return" in reply, reply
            state = src.qmp.cmd("query-status")["return"]["status"]
            data = migrate_to_file(src, tmp / "stream.bin")
        finally:
            src.quit()
        return data, state


def migrate_to_file(src: Qemu, out: Path) -> bytes:
    """Migrate ``src`` to ``exec:cat``; the whole stream written."""
    # QEMU reports completed once it has closed the pipe, which may be before
    # cat has written everything: the file appears (renamed) when cat is done.
    partial = out.with_suffix(".part")
    reply = src.qmp.cmd("migrate", {"uri": f"exec:cat > {partial} && mv {partial} {out}"})
    assert reply == {"return": {}}, reply
    info = wait_migration(src.qmp)
    assert info["status"] == "completed", info
    deadline = time.monotonic() + 10
    while not out.exists():
        assert time.monotonic() < deadline, "cat did not finish"
        time.sleep(0.005)
    return out.read_bytes()


def capture_unix(*, caps: Sequence[str] = ()) -> tuple[bytes, bytes, str]:
    """Migrate QEMU to QEMU over a unix socket through a tap; returns (stream, return path, dest state)."""
    with workdir() as tmp:
        (tmp / "s").mkdir()
        (tmp / "d").mkdir()
        dst = Qemu(tmp / "d", "-incoming", "defer")
        src = Qemu(tmp / "s")
        forward = bytearray()
        backward = bytearray()
        try:
            for side in (src, dst):
                side.set_caps(caps)
            real = str(tmp / "real.sock")
            tap = str(tmp / "tap.sock")
            assert dst.qmp.cmd("migrate-incoming", {"uri": f"unix:{real}"}) == {"return": {}}
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(tap)
            listener.listen(1)

            def pump(a: socket.socket, b: socket.socket, log: bytearray) -> None:
                while True:
                    data = a.recv(65536)
                    if not data:
                        try:
                            b.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        return
                    log += data
                    b.sendall(data)

            def serve() -> None:
                conn, _ = listener.accept()
                peer = socket.socket(socket.AF_UNIX)
                peer.connect(real)
                threads = [threading.Thread(target=pump, args=(conn, peer, forward)),
                           threading.Thread(target=pump, args=(peer, conn, backward))]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

            server = threading.Thread(target=serve, daemon=True)
            server.start()
            assert src.qmp.cmd("migrate", {"uri": f"unix:{tap}"}) == {"return": {}}
            info = wait_migration(src.qmp)
            assert info["status"] == "completed", info
            wait_migration(dst.qmp)
            state = dst.qmp.cmd("query-status")["return"]["status"]
            server.join(5)
            listener.close()
        finally:
            src.quit()
            dst.quit()
        return bytes(forward), bytes(backward), state


# ---------------------------------------------------------------------------
# Destination
# ---------------------------------------------------------------------------


def destination(data: bytes, *, caps: Sequence[str] = (), extra: Sequence[str] = (),
                timeout: float = 5.0) -> dict[str, Any]:
    """Feed ``data`` to ``-incoming defer`` + ``migrate-incoming exec:cat FILE``."""
    with workdir() as tmp:
        stream = tmp / "in.bin"
        stream.write_bytes(data)
        dst = Qemu(tmp, "-incoming", "defer", *extra)
        result: dict[str, Any] = {}
        try:
            dst.set_caps(caps)
            assert dst.qmp.cmd("migrate-incoming", {"uri": f"exec:cat {stream}"}) == {"return": {}}
            deadline = time.monotonic() + timeout
            while True:
                if dst.proc.poll() is not None:
                    break
                try:
                    info = dst.qmp.cmd("query-migrate")["return"]
                except (OSError, EOFError):
                    continue
                if info.get("status") == "completed":
                    result["runstate"] = dst.qmp.cmd("query-status")["return"]["status"]
                    break
                if time.monotonic() > deadline:
                    result["hang"] = True
                    dst.proc.kill()
                    break
                time.sleep(0.005)
        finally:
            rc = dst.quit()
        result["exit"] = rc
        result["stderr"] = dst.read_stderr()
        return result


# ---------------------------------------------------------------------------
# Variants: hand-made streams, built from a running capture by its offsets
# ---------------------------------------------------------------------------


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def variants(r: bytes, rp: bytes) -> dict[str, tuple[bytes, list[str]]]:
    """name -> (stream, destination capabilities)."""
    hdr, cfg_, rams, rame, timer, gs_, tail = (
        r[:8], r[8:17], r[17:55], r[55:73], r[73:121], r[121:255], r[255:])
    rest = r[17:]

    def full(sid: int, name: bytes, inst: int, ver: int, payload: bytes) -> bytes:
        return b"\x04" + be32(sid) + bytes([len(name)]) + name + be32(inst) + be32(ver) + payload + b"\x7e" + be32(sid)

    def start(sid: int, name: bytes, ver: int, payload: bytes) -> bytes:
        return b"\x01" + be32(sid) + bytes([len(name)]) + name + be32(0) + be32(ver) + payload + b"\x7e" + be32(sid)

    def gs(name: str, size: int | None = None, ver: int = 1) -> bytes:
        b = name.encode()
        return full(4, b"globalstate", 0, ver, be32(len(b) + 1 if size is None else size) + b.ljust(100, b"\0"))

    def cfg(name: bytes) -> bytes:
        return b"\x07" + be32(len(name)) + name

    def sub(name: bytes, ver: int, payload: bytes) -> bytes:
        return b"\x05" + bytes([len(name)]) + name + be32(ver) + payload

    def ram(payload: bytes) -> bytes:
        return start(2, b"ram", 4, payload)

    def cmd(c: int, data: bytes, length: int | None = None) -> bytes:
        return b"\x08" + struct.pack(">HH", c, len(data) if length is None else length) + data

    def body(*parts: bytes) -> bytes:
        return hdr + cfg_ + b"".join(parts)

    tpb = b"configuration/target-page-bits"
    capn = b"configuration/capabilities"
    uuid = b"configuration/uuid"
    x_caps = sub(capn, 1, be32(1) + b"\x0fx-ignore-shared")
    ok_tail = timer + gs_ + tail
    v: dict[str, tuple[bytes, list[str]]] = {}

    def add(name: str, data: bytes, caps: Sequence[str] = ()) -> None:
        assert name not in v, name
        v[name] = (data, list(caps))

    # header and configuration
    add("empty-magic", b"")
    add("bad-magic", b"QEVX" + r[4:])
    add("version-2", r[:4] + be32(2) + r[8:])
    add("version-4", r[:4] + be32(4) + r[8:])
    add("version-0", r[:4] + be32(0) + r[8:])
    add("no-configuration", hdr + rest)
    add("configuration-twice", hdr + cfg_ + cfg_ + rest)
    add("machine-pc", hdr + cfg(b"pc") + rest)
    add("machine-NONE", hdr + cfg(b"NONE") + rest)
    add("machine-nonex", hdr + cfg(b"nonex") + rest)
    add("machine-no", hdr + cfg(b"no") + rest)
    add("machine-empty", hdr + cfg(b"") + rest)
    add("machine-none-nul", hdr + cfg(b"none\0") + rest)
    add("machine-none-nul-x", hdr + cfg(b"none\0x") + rest)
    add("machine-long", hdr + cfg(b"x" * 300) + rest)
    add("machine-pc-truncated", hdr + cfg(b"pc"))
    add("config-sub-target-page-bits-12", hdr + cfg_ + sub(tpb, 1, be32(12)) + rest)
    add("config-sub-target-page-bits-13", hdr + cfg_ + sub(tpb, 1, be32(13)) + rest)
    add("config-sub-target-page-bits-v0", hdr + cfg_ + sub(tpb, 0, be32(12)) + rest)
    add("config-sub-uuid", hdr + cfg_ + sub(uuid, 1, bytes(range(16))) + rest)
    add("config-sub-uuid-twice", hdr + cfg_ + sub(uuid, 1, bytes(16)) + sub(uuid, 1, bytes(16)) + rest)
    add("config-sub-uuid-v2", hdr + cfg_ + sub(uuid, 2, bytes(16)) + rest)
    add("config-sub-uuid-v257", hdr + cfg_ + sub(uuid, 257, bytes(16)) + rest)
    add("config-sub-unknown", hdr + cfg_ + sub(b"configuration/foo", 1, b"") + rest)
    add("config-sub-foreign", hdr + cfg_ + sub(b"foo", 1, b"") + rest)
    add("config-sub-short-name", hdr + cfg_ + sub(b"confi", 1, b"") + rest)
    add("config-sub-lone-byte", hdr + cfg_ + b"\x05" + rest)
    add("config-caps-x-ignore-shared", hdr + cfg_ + x_caps + rest)
    add("config-caps-x-ignore-shared-dest-on", hdr + cfg_ + x_caps + rest, ["x-ignore-shared"])
    add("config-no-caps-dest-on", r, ["x-ignore-shared"])
    add("config-caps-empty-dest-on", hdr + cfg_ + sub(capn, 1, be32(0)) + rest, ["x-ignore-shared"])
    add("config-caps-events", hdr + cfg_ + sub(capn, 1, be32(1) + b"\x06events") + rest)
    add("config-caps-bogus", hdr + cfg_ + sub(capn, 1, be32(1) + b"\x05bogus") + rest)
    add("config-caps-empty-name", hdr + cfg_ + sub(capn, 1, be32(1) + b"\x00") + rest)
    add("config-caps-count-1000", hdr + cfg_ + sub(capn, 1, be32(1000) + b"\x06events") + rest)
    add("config-pc-and-page-bits", hdr + cfg(b"pc") + sub(tpb, 1, be32(13)) + rest)
    add("config-pc-and-uuid", hdr + cfg(b"pc") + sub(uuid, 1, bytes(16)) + rest)
    add("config-page-bits-and-caps", hdr + cfg_ + x_caps + sub(tpb, 1, be32(13)) + rest)
    add("config-caps-and-uuid", hdr + cfg_ + x_caps + sub(uuid, 1, bytes(16)) + rest)
    add("config-truncated-in-page-bits", hdr + cfg_ + sub(tpb, 1, be32(13))[:-2])
    add("config-truncated-in-caps-count", hdr + cfg_ + x_caps[:-18])
    add("config-truncated-in-caps-name", hdr + cfg_ + x_caps[:-3])
    add("config-truncated-in-sub-name", hdr + cfg_ + sub(uuid, 1, bytes(16))[:10])
    add("config-truncated-in-sub-version", hdr + cfg_ + sub(uuid, 1, bytes(16))[:22])
    add("config-truncated-in-uuid", hdr + cfg_ + sub(uuid, 1, bytes(16))[:27])
    # sections
    add("unknown-section-full", body(rams, rame, full(7, b"foo", 0, 1, b""), ok_tail))
    add("unknown-section-start", hdr + cfg_ + start(7, b"foo", 1, b"") + rest)
    add("unknown-instance", body(rams, rame, timer[:11] + be32(1) + timer[15:], gs_, tail))
    add("unknown-instance-huge", body(rams, rame, timer[:11] + be32(0xFFFFFFFF) + timer[15:], gs_, tail))
    add("empty-idstr", body(rams, rame, full(7, b"", 0, 1, b""), ok_tail))
    add("idstr-255", body(full(9, b"a" * 255, 0, 1, b""), gs_, tail))
    add("timer-version-3", body(rams, rame, timer[:15] + be32(3) + timer[19:], gs_, tail))
    add("timer-version-huge", body(rams, rame, timer[:15] + be32(0xFFFFFFFF) + timer[19:], gs_, tail))
    add("timer-version-1", body(rams, rame, timer[:15] + be32(1) + timer[19:], gs_, tail))
    add("timer-version-1-short", body(rams, rame, timer[:15] + be32(1) + timer[19:-13] + timer[-5:], gs_, tail))
    add("timer-version-0", body(rams, rame, timer[:15] + be32(0) + timer[19:], gs_, tail))
    add("timer-sub-unknown", body(rams, rame, timer[:-5] + sub(b"timer/foo", 1, b"") + timer[-5:], gs_, tail))
    add("timer-sub-foreign", body(rams, rame, timer[:-5] + sub(b"foo", 1, b"") + timer[-5:], gs_, tail))
    add("ram-version-5", body(rams[:13] + be32(5) + rams[17:], rame, ok_tail))
    add("ram-version-3", body(rams[:13] + be32(3) + rams[17:], rame, ok_tail))
    add("ram-instance-1", body(b"\x01" + be32(2) + b"\x03ram" + be32(1) + be32(4) + be64(4) + be64(0x10) + b"\x7e" + be32(2), ok_tail))
    add("ram-full", body(full(2, b"ram", 0, 4, be64(4) + be64(0x10)), ok_tail))
    add("ram-start-only", body(rams, ok_tail))
    add("ram-end-only", body(rame, ok_tail))
    add("ram-part-instead-of-end", body(rams, b"\x02" + rame[1:], ok_tail))
    add("ram-end-twice", body(rams, rame, rame, ok_tail))
    add("ram-start-twice", body(rams, rams, rame, ok_tail))
    add("ram-eos-only", body(ram(be64(0x10)), rame, ok_tail))
    add("ram-memsize-twice", body(ram(be64(4) + be64(4) + be64(0x10)), ok_tail))
    add("ram-memsize-eos-combined", body(ram(be64(0x14)), ok_tail))
    add("ram-eos-continue", body(ram(be64(4) + be64(0x30)), ok_tail))
    add("ram-eos-with-address", body(rams, b"\x03" + be32(2) + be64(0x1010) + b"\x7e" + be32(2), ok_tail))
    add("ram-memsize-block", body(ram(be64(0x1004) + b"\x06pc.ram" + be64(0x1000) + be64(0x10)), ok_tail))
    add("ram-memsize-no-block", body(ram(be64(0x1004) + be64(0x10)), ok_tail))
    add("ram-memsize-truncated", hdr + cfg_ + ram(be64(0x2004))[:-5])
    for flags in (0x1, 0x2, 0x8, 0x21, 0x22, 0x40, 0x80, 0x100, 0x102, 0x200, 0x400, 0x800, 0xFFF):
        add(f"ram-flags-0x{flags:x}", body(ram(be64(4) + be64(flags)), ok_tail))
    add("ram-page-named-block", body(ram(be64(4) + be64(0x12345008) + b"\x04abcd"), ok_tail))
    add("ram-page-continue", body(ram(be64(4) + be64(0x12345028)), ok_tail))
    add("globalstate-version-2", body(rams, rame, timer, gs("running", ver=2), tail))
    add("globalstate-version-0", body(rams, rame, timer, gs("running", ver=0), tail))
    for state in ("paused", "prelaunch", "postmigrate", "inmigrate", "finish-migrate",
                  "shutdown", "suspended", "io-error", "colo", "bogus", ""):
        add(f"globalstate-{state or 'empty'}", body(rams, rame, timer, gs(state), tail))
    add("globalstate-size-0", body(rams, rame, timer, gs("", size=0), tail))
    add("globalstate-size-101", body(rams, rame, timer, gs("running", size=101), tail))
    add("globalstate-size-3", body(rams, rame, timer, gs("running", size=3), tail))
    add("globalstate-no-nul", body(rams, rame, timer, full(4, b"globalstate", 0, 1, be32(100) + b"r" * 100), tail))
    add("globalstate-99-chars", body(rams, rame, timer, full(4, b"globalstate", 0, 1, be32(100) + b"r" * 99 + b"\0"), tail))
    add("globalstate-sub-unknown", body(rams, rame, timer, gs_[:-5] + sub(b"globalstate/foo", 1, b"") + gs_[-5:], tail))
    add("globalstate-bogus-truncated", body(gs("bogus")[:-5]))
    add("globalstate-twice", body(rams, rame, timer, gs_, gs("paused"), tail))
    add("no-globalstate", body(rams, rame, timer, tail))
    add("no-ram", body(timer, gs_, tail))
    add("only-eof", body(b"\x00"))
    add("only-eof-and-description", body(tail))
    add("order-reversed", body(gs_, timer, rams, rame, tail))
    add("section-id-reused", body(rams, rame, timer[:1] + be32(2) + timer[5:-4] + be32(2), gs_, tail))
    add("section-id-huge", body(b"\x04" + be32(0xFFFFFFFF) + timer[5:-5] + b"\x7e" + be32(0xFFFFFFFF), gs_, tail))
    add("part-for-timer", body(rams, rame, timer, b"\x02" + be32(0) + timer[19:], gs_, tail))
    add("part-id-0-before-start", body(b"\x03" + be32(0) + timer[19:], gs_, tail))
    add("part-unknown-id", body(rams, b"\x03" + be32(9) + rame[5:], ok_tail))
    add("part-unknown-id-huge", body(rams, b"\x03" + be32(0xFFFFFFFF) + rame[5:], ok_tail))
    add("unknown-type-9", body(rams, rame, b"\x09", ok_tail))
    add("type-subsection-top", body(b"\x05", rest))
    add("type-vmdesc-top", body(b"\x06" + be32(2) + b"{}", rest))
    add("type-footer-top", body(b"\x7e" + be32(0), rest))
    add("footer-bad-byte", body(rams[:-5] + b"\x7f" + rams[-4:], rame, ok_tail))
    add("footer-missing", body(rams, rame, timer[:-5], gs_, tail))
    add("footer-wrong-id", body(rams, rame, timer[:-4] + be32(9), gs_, tail))
    add("block-eos", body(start(1, b"block", 1, be64(2)), ok_tail))
    add("block-progress", body(start(1, b"block", 1, be64(0xC804) + be64(2)), ok_tail))
    add("block-version-2", body(start(1, b"block", 2, be64(2)), ok_tail))
    add("block-version-0", body(start(1, b"block", 0, be64(2)), ok_tail))
    add("block-device", body(start(1, b"block", 1, be64(1) + b"\x04disk"), ok_tail))
    add("block-flags-0", body(start(1, b"block", 1, be64(0)), ok_tail))
    add("block-flags-8", body(start(1, b"block", 1, be64(8)), ok_tail))
    add("block-truncated", body(start(1, b"block", 1, be64(0xC804))[:-13]))
    add("dirty-bitmap-eos", body(start(3, b"dirty-bitmap", 1, b"\x01"), ok_tail))
    add("dirty-bitmap-version-2", body(start(3, b"dirty-bitmap", 2, b"\x01"), ok_tail))
    add("dirty-bitmap-truncated", body(start(3, b"dirty-bitmap", 1, b"")[:-5]))
    # commands
    add("cmd-open-return-path", body(cmd(1, b""), rest))
    add("cmd-open-return-path-twice", body(cmd(1, b""), cmd(1, b""), rest))
    add("cmd-open-return-path-len-4", body(cmd(1, be32(0)), rest))
    add("cmd-ping-without-return-path", body(cmd(2, be32(0xDEADBEEF)), rest))
    add("cmd-ping-after-return-path", body(cmd(1, b""), cmd(2, be32(7)), rest))
    add("cmd-ping-len-2", body(cmd(2, b"\0\0"), rest))
    add("cmd-ping-truncated-data", body(cmd(2, b"\0", length=4)))
    add("cmd-ping-truncated-header", body(b"\x08\x00\x02\x00"))
    add("cmd-ping-truncated-after-return-path", body(cmd(1, b""), cmd(2, b"\0", length=4)))
    add("cmd-invalid", body(cmd(0, b""), rest))
    add("cmd-11", body(cmd(11, b""), rest))
    add("cmd-99-len-4", body(cmd(99, be32(0)), rest))
    add("cmd-99-truncated", body(b"\x08\x00\x63"))
    add("cmd-advise-0", body(cmd(3, b""), rest))
    add("cmd-advise-0-twice", body(cmd(3, b""), cmd(3, b""), rest))
    add("cmd-advise-3", body(cmd(3, b"abc"), rest))
    add("cmd-advise-16", body(cmd(3, be64(0) + be64(4096)), rest))
    add("cmd-advise-16-postcopy", body(cmd(3, be64(0) + be64(4096)), rest), ["postcopy-ram"])
    add("cmd-advise-0-postcopy", body(cmd(3, b""), rest), ["postcopy-ram"])
    add("cmd-advise-16-summary-postcopy", body(cmd(3, be64(4096) + be64(4096)), rest), ["postcopy-ram"])
    add("cmd-advise-16-pagesize-postcopy", body(cmd(3, be64(0) + be64(8192)), rest), ["postcopy-ram"])
    add("cmd-listen", body(cmd(4, b""), rest))
    add("cmd-listen-len-4", body(cmd(4, be32(0)), rest))
    add("cmd-run", body(cmd(5, b""), rest))
    add("cmd-discard", body(cmd(6, b""), rest))
    add("cmd-discard-len-1", body(cmd(6, b"\0"), rest))
    add("cmd-packaged-len-0", body(cmd(7, b""), rest))
    add("cmd-resume", body(cmd(9, b""), rest))
    add("cmd-recv-bitmap-len-0", body(cmd(10, b""), rest))
    add("cmd-recv-bitmap-abc", body(cmd(10, b"\x03abc"), rest))
    add("cmd-recv-bitmap-bad-len", body(cmd(10, b"\x03abcd"), rest))
    add("cmd-after-eof", body(r[17:255], b"\x00", cmd(2, be32(0))))
    # the tail
    add("vmdesc-wrong-type", body(r[17:256], b"\x05", r[257:]))
    add("vmdesc-length-0", r[:257] + be32(0))
    add("vmdesc-not-json", r[:257] + be32(5) + b"hello")
    add("vmdesc-truncated", r[:300])
    add("trailing-garbage", r + b"garbage")
    add("return-path-stream", rp)
    return v


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


CAPTURES: list[dict[str, Any]] = [
    {"name": "running", "how": "exec", "runstate": "running"},
    {"name": "running-2", "how": "exec", "runstate": "running"},
    {"name": "running-3", "how": "exec", "runstate": "running"},
    {"name": "paused", "how": "exec", "runstate": "paused", "before": [["stop", None]]},
    {"name": "prelaunch", "how": "exec", "runstate": "prelaunch", "extra": ["-S"]},
    {"name": "prelaunch-stopped", "how": "exec", "runstate": "prelaunch", "extra": ["-S"], "before": [["stop", None]]},
    {"name": "cont-after-S", "how": "exec", "runstate": "running", "extra": ["-S"], "before": [["cont", None]]},
    {"name": "events", "how": "exec", "runstate": "running", "caps": ["events"]},
    {"name": "qcow2-node", "how": "exec", "runstate": "running", "qcow2": True},
    {"name": "pause-before-switchover", "how": "exec", "runstate": "running", "caps": ["pause-before-switchover"]},
    {"name": "late-block-activate", "how": "exec", "runstate": "running", "caps": ["late-block-activate"]},
    {"name": "dirty-bitmaps", "how": "exec", "runstate": "running", "caps": ["dirty-bitmaps"]},
    {"name": "x-ignore-shared", "how": "exec", "runstate": "running", "caps": ["x-ignore-shared"]},
    {"name": "block", "how": "exec", "runstate": "running", "caps": ["block"]},
    {"name": "background-snapshot", "how": "exec", "runstate": "running", "caps": ["background-snapshot"]},
    {"name": "unix", "how": "unix", "runstate": "running"},
    {"name": "unix-return-path", "how": "unix", "runstate": "running", "caps": ["return-path"]},
    {"name": "unix-postcopy-ram", "how": "unix", "runstate": "running", "caps": ["postcopy-ram"]},
    {"name": "unix-return-path-dirty-bitmaps-x-ignore-shared", "how": "unix", "runstate": "running",
     "caps": ["return-path", "dirty-bitmaps", "x-ignore-shared"]},
    {"name": "unix-postcopy-ram-dirty-bitmaps", "how": "unix", "runstate": "running",
     "caps": ["postcopy-ram", "dirty-bitmaps"]},
]
TRUNCATED = ["running", "unix-return-path-dirty-bitmaps-x-ignore-shared", "paused"]


def take_capture(spec: dict[str, Any]) -> dict[str, Any]:
    caps = spec.get("caps", [])
    record: dict[str, Any] = {k: v for k, v in spec.items() if k != "name"}
    if spec["how"] == "exec":
        before: list[tuple[str, dict[str, Any] | None]] = [(c, a) for c, a in spec.get("before", [])]
        extra = list(spec.get("extra", []))
        if spec.get("qcow2"):
            with workdir() as tmp:
                image = tmp / "disk.qcow2"
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
                before.append(("blockdev-add", {
                    "driver": "qcow2", "node-name": "disk",
                    "file": {"driver": "file", "node-name": "disk-file", "filename": str(image)}}))
                data, state = capture_exec(caps=caps, extra=extra, before=before)
        else:
            data, state = capture_exec(caps=caps, extra=extra, before=before)
        assert state == spec["runstate"], (spec, state)
    else:
        data, back, dest_state = capture_unix(caps=caps)
        record["return_path_bytes"] = back.hex()
        record["unix_destination_runstate"] = dest_state
    (HERE / "captures" / f"{spec['name']}.bin").write_bytes(data)
    record["size"] = len(data)
    return record


def ranges(outcomes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for n, o in enumerate(outcomes):
        if out and {k: v for k, v in out[-1].items() if k not in ("from", "to")} == o:
            out[-1]["to"] = n
        else:
            out.append({"from": n, "to": n, **o})
    return out


def parallel(fn: Callable[..., dict[str, Any]], jobs: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    with cf.ThreadPoolExecutor(max(4, (os.cpu_count() or 2) * 4)) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


def outcome(data: bytes, caps: Sequence[str] = (), extra: Sequence[str] = ()) -> dict[str, Any]:
    return destination(data, caps=caps, extra=extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="re-ask QEMU and diff; write nothing")
    parser.add_argument("--skip-captures", action="store_true", help="reuse captures/*.bin")
    args = parser.parse_args()
    if shutil.which(QEMU) is None:
        print(f"{QEMU} is not installed", file=sys.stderr)
        return 2
    (HERE / "captures").mkdir(exist_ok=True)
    if args.check or args.skip_captures:
        captures = json.loads((HERE / "captures.json").read_text())
    else:
        captures = {}
        for spec in CAPTURES:
            captures[spec["name"]] = take_capture(spec)
            print("captured", spec["name"], captures[spec["name"]]["size"], file=sys.stderr)
    blobs = {name: (HERE / "captures" / f"{name}.bin").read_bytes() for name in captures}
    names = list(captures)
    plain = parallel(outcome, [(blobs[n], captures[n].get("caps", [])) for n in names])
    with_s = parallel(outcome, [(blobs[n], captures[n].get("caps", []), ["-S"]) for n in names])
    for n, a, b in zip(names, plain, with_s, strict=True):
        captures[n]["destination"] = a
        captures[n]["destination_with_S"] = b

    made = variants(blobs["running"], blobs["unix-return-path"])
    refusals_list = parallel(outcome, [(data, caps) for data, caps in made.values()])
    refusals = {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
               "destination_caps": caps, **res}
        for (name, (data, caps)), res in zip(made.items(), refusals_list, strict=True)
    }
    truncations: dict[str, Any] = {}
    for name in TRUNCATED:
        data = blobs[name]
        caps = captures[name].get("caps", [])
        results = parallel(outcome, [(data[:n], caps) for n in range(len(data) + 1)])
        truncations[name] = ranges(results)

    files = {
        "captures.json": captures,
        "refusals.json": refusals,
        "truncations.json": truncations,
    }
    status = 0
    for fname, content in files.items():
        text = json.dumps(content, indent=1, sort_keys=True) + "\n"
        path = HERE / fname
        if args.check:
            if path.read_text() != text:
                old = json.loads(path.read_text())
                for key in sorted(set(old) | set(content)):
                    if old.get(key) != content.get(key):
                        print(f"{fname}: {key} differs:\n  was {old.get(key)}\n  now {content.get(key)}")
                status = 1
        else:
            path.write_text(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
