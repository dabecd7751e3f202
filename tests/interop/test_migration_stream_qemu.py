"""qmpd's migration stream against a live QEMU 7.2 (``qemu-system-x86_64 -M none``).

Skipped without QEMU, a failure when CI=true (the qemu marker, tests/conftest.py).
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from qmpd.migration.stream import (
    ReturnPathReader,
    RPMessage,
    RPMessageType,
    StreamWriter,
    TimerState,
)
from tests.migration_data import capture as qemu
from tests.migration_data.streams import build_stream, parse_stream
from tests.unit.test_migration_stream import REFUSALS, expected, made_variants, outcome

pytestmark = pytest.mark.qemu(qemu.QEMU)


@pytest.mark.parametrize(
    ("runstate", "extra", "caps", "final"),
    [
        ("running", [], [], "running"),
        ("running", ["-S"], [], "paused"),
        ("paused", [], [], "paused"),
        ("prelaunch", [], [], "prelaunch"),
        ("running", [], ["return-path"], "running"),
        ("running", [], ["dirty-bitmaps", "x-ignore-shared"], "running"),
    ],
)
def test_qemu_destination_completes_with_our_stream(
    runstate: str, extra: list[str], caps: list[str], final: str
) -> None:
    data = build_stream(runstate, TimerState(123456789, 53412345),
                        capabilities={c: True for c in caps})
    # -incoming defer, then migrate-incoming exec:cat FILE; waits for
    # query-migrate "completed" before reading the run state.
    result = qemu.destination(data, caps=caps, extra=extra)
    assert result == {"runstate": final, "exit": 0, "stderr": ""}


def test_qemu_answers_our_return_path_stream_over_unix(tmp_path: Path) -> None:
    """We act as the source: QEMU sends PONG(1) for our PING and SHUT(0) at the end."""
    with qemu.workdir() as work:
        dst = qemu.Qemu(work, "-incoming", "defer")
        try:
            dst.set_caps(["return-path", "events"])
            path = str(work / "mig.sock")
            assert dst.qmp.cmd("migrate-incoming", {"uri": f"unix:{path}"}) == {"return": {}}
            writer = StreamWriter({"return-path": True})
            rp = ReturnPathReader()
            got: list[RPMessage] = []
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(path)
                sock.sendall(writer.setup())
                while not got:
                    got += rp.feed(sock.recv(4096))
                sock.sendall(writer.complete("running", TimerState(1, 2)))
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    got += rp.feed(chunk)
            rp.close()
            assert [(m.type, m.value) for m in got] == [(RPMessageType.PONG, 1), (RPMessageType.SHUT, 0)]
            info = qemu.wait_migration(dst.qmp)
            assert info == {"status": "completed"}
            assert dst.qmp.cmd("query-status")["return"]["status"] == "running"
            events = [e["event"] + ":" + str(e.get("data", {}).get("status", "")) for e in dst.qmp.events]
            assert events == ["MIGRATION:setup", "MIGRATION:active", "RESUME:", "MIGRATION:completed"]
        finally:
            dst.quit()
        assert dst.read_stderr() == ""


def test_live_qemu_source_still_matches_the_writer() -> None:
    data, state = qemu.capture_exec(before=[("stop", None)])
    assert state == "paused"
    parsed = parse_stream(data)
    assert parsed.runstate == "paused"
    assert build_stream("paused", parsed.timer) == data


LIVE_SAMPLE = ["bad-magic", "version-2", "machine-pc", "unknown-section-full",
               "globalstate-paused", "footer-wrong-id", "ram-flags-0x8", "cmd-ping-without-return-path"]


def test_live_qemu_still_refuses_like_recorded() -> None:
    """A sample of the recorded refusals, re-asked from QEMU, plus a few truncations."""
    variants = made_variants()
    jobs: list[tuple[Any, ...]] = [(variants[n][0], variants[n][1]) for n in LIVE_SAMPLE]
    running = qemu.HERE.joinpath("captures", "running.bin").read_bytes()
    cuts = [9, 30, 60, 100, 140, 200, 252, 256, 300]
    jobs += [(running[:n], []) for n in cuts]
    results = qemu.parallel(qemu.outcome, jobs)
    for name, result in zip(LIVE_SAMPLE, results, strict=False):
        assert expected(result) == expected(REFUSALS[name]), name
        assert outcome(*variants[name]) == expected(result), name
    for n, result in zip(cuts, results[len(LIVE_SAMPLE):], strict=True):
        assert outcome(running[:n], []) == expected(result), f"cut at {n}"
    assert struct.unpack(">I", running[:4])[0] == 0x5145564D
