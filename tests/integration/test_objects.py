"""object-add/object-del: QEMU 7.2's texts (differential against qemu-storage-daemon),
objects in use, iothreads on exports, and secrets that never leak."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient, require_tool
from tests.support.qsd import QsdMonitor

SECRET = "hunter2-do-not-leak"


def _conversation(tmp: Path) -> list[tuple[str, dict[str, Any]]]:
    image = tmp / "a.raw"
    image.write_bytes(bytes(1 << 20))
    missing = tmp / "missing"
    tg = {"qom-type": "throttle-group"}
    return [
        ("object-add", {"qom-type": "iothread", "id": "io0"}),
        ("object-add", {"qom-type": "iothread", "id": "io0"}),
        ("object-add", {"qom-type": "nosuch", "id": "x"}),
        ("object-add", {"id": "x"}),
        ("object-add", {"qom-type": "iothread"}),
        ("object-add", {"qom-type": "iothread", "id": "1bad"}),
        ("object-add", {"qom-type": "iothread", "id": "io1", "poll-grow": -1}),
        ("object-add", {"qom-type": "iothread", "id": "io1", "bogus": 1}),
        ("object-add", {"qom-type": "iothread", "id": "io1", "poll-max-ns": 5}),
        ("object-add", {"qom-type": "secret", "id": "s0", "data": SECRET}),
        ("object-add", {"qom-type": "secret", "id": "s0", "data": SECRET}),
        ("object-add", {"qom-type": "secret", "id": "s1"}),
        ("object-add", {"qom-type": "secret", "id": "s1", "data": "aGVsbG8", "format": "base64"}),
        ("object-add", {"qom-type": "secret", "id": "s2", "data": "a b", "format": "base64"}),
        ("object-add", {"qom-type": "secret", "id": "s2", "data": "x", "format": "hex"}),
        ("object-add", {"qom-type": "secret", "id": "s2", "data": "x", "file": str(image)}),
        ("object-add", {"qom-type": "secret", "id": "s2", "file": str(missing)}),
        ("object-add", {"qom-type": "secret", "id": "s2", "file": str(tmp)}),
        ("object-add", {"qom-type": "secret", "id": "s2", "file": str(image)}),
        ("object-add", {**tg, "id": "t0", "x-bps-total": 1 << 20}),
        ("object-add", {**tg, "id": "t1", "limits": {"bps-total": 1 << 20, "iops-read": 5}}),
        ("object-add", {**tg, "id": "t2", "limits": {"bps-total": 1}, "x-bps-read": 5}),
        ("object-add", {**tg, "id": "t2", "x-bps-total-max": 1 << 20}),
        ("object-add", {**tg, "id": "t2", "x-bps-total": 100, "x-bps-total-max": 50}),
        ("object-add", {**tg, "id": "t2", "x-bps-total": -1}),
        ("object-add", {**tg, "id": "t2", "x-bps-total": 10**15 + 1}),
        ("object-add", {**tg, "id": "t2", "limits": {"bps-total": -1}}),
        ("object-add", {**tg, "id": "t2", "limits": {"bps-total": 1, "foo": 1}}),
        ("object-add", {**tg, "id": "t2", "x-bps-total": 1, "x-bps-total-max": 2,
                        "x-bps-total-max-length": 0}),
        ("object-add", {**tg, "id": "t2", "x-bps-total": 1, "x-bps-total-max": 2,
                        "x-bps-total-max-length": 1 << 32}),
        ("object-add", {**tg, "id": "t2", "limits": {"bps-total": 1, "bps-total-max": 2,
                                                      "bps-total-max-length": 1 << 32}}),
        ("object-add", {**tg, "id": "t2", "x-bps-total": 1, "x-bps-total-max-length": 5}),
        ("object-add", {**tg, "id": "t2", "x-iops-size": 4096}),
        ("object-add", {**tg, "id": "t2", "x-bps-total": "100"}),
        ("object-add", {**tg, "id": "t2", "limits": {"bps-total-max": 5, "bps-total": 1},
                        "x-bps-total": 0}),
        ("object-add", {**tg, "id": "t2", "x-iops-total": 10, "x-iops-size": 4096}),
        ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(image)}),
        ("blockdev-add", {"driver": "throttle", "node-name": "n0", "file": "f0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "n0", "file": "f0",
                          "throttle-group": "nosuch"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "n0", "file": "f0",
                          "throttle-group": "io0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "n0", "file": "f0",
                          "throttle-group": "t0"}),
        ("blockdev-add", {"driver": "throttle", "node-name": "n1", "file": "f0",
                          "throttle-group": "t0"}),
        ("object-del", {"id": "t0"}),
        ("blockdev-del", {"node-name": "n0"}),
        ("object-del", {"id": "t0"}),
        ("blockdev-del", {"node-name": "n1"}),
        ("object-del", {"id": "t0"}),
        ("object-del", {"id": "t0"}),
        ("object-del", {"id": "s0", "x": 1}),
        ("object-del", {"id": "s0"}),
        ("object-del", {"id": "io0"}),
        ("object-del", {"id": "io0"}),
    ]


def _replay(client: RawClient, conversation: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    replies = []
    for execute, args in conversation:
        reply = client.cmd(execute, args)
        replies.append(reply.get("error", reply.get("return")))
    return replies


def _qsd() -> tuple[subprocess.Popen[bytes], RawClient]:
    qsd = require_tool("qemu-storage-daemon")
    monitor = QsdMonitor("m0")
    proc = monitor.popen([qsd, *monitor.args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc, monitor.client(proc, 10, negotiate=True)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def test_object_commands_match_qsd(qmpd: QmpdProcess, tmp_path: Path) -> None:
    conversation = _conversation(tmp_path)
    client = qmpd.client()
    client.negotiate()
    ours = _replay(client, conversation)
    proc, qsd_client = _qsd()
    try:
        theirs = _replay(qsd_client, conversation)
    finally:
        proc.terminate()
        proc.wait(10)
    for (execute, args), mine, qemu in zip(conversation, ours, theirs, strict=True):
        assert mine == qemu, (execute, args)


def _wait_object_del(client: RawClient, object_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        reply = client.cmd("object-del", {"id": object_id})
        if "return" in reply or time.monotonic() > deadline:
            return reply
        time.sleep(0.05)


def test_iothread_held_by_export(qmpd: QmpdProcess, tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(bytes(1 << 20))
    c = qmpd.client()
    c.negotiate()
    assert c.cmd("object-add", {"qom-type": "iothread", "id": "io0"}) == {"return": {}}
    assert c.cmd("object-add", {"qom-type": "secret", "id": "s0", "data": "x"}) == {"return": {}}
    c.cmd("blockdev-add", {"driver": "file", "node-name": "f0", "filename": str(image)})
    c.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(tmp_path / "n")}}})
    export = {"type": "nbd", "id": "e0", "node-name": "f0"}
    # As QSD: only an iothread will do.
    for name in ("nosuch", "s0"):
        reply = c.cmd("block-export-add", {**export, "iothread": name})
        assert reply["error"]["desc"] == f'iothread "{name}" not found'
    assert c.cmd("block-export-add", {**export, "iothread": "io0"}) == {"return": {}}
    # QSD 7.2 aborts here; qmpd refuses as for any object in use.
    assert c.cmd("object-del", {"id": "io0"})["error"]["desc"] == (
        "object 'io0' is in use, can not be deleted")
    assert c.cmd("block-export-del", {"id": "e0"}) == {"return": {}}
    assert _wait_object_del(c, "io0") == {"return": {}}


def test_secret_never_leaks(qmpd_factory: Any, tmp_path: Path) -> None:
    secret_file = tmp_path / "key"
    secret_file.write_text(SECRET + "-file")
    proc = qmpd_factory("--log-level", "debug")
    c = proc.client()
    c.negotiate()
    seen: list[str] = []
    for args in (
        {"qom-type": "secret", "id": "s0", "data": SECRET},
        {"qom-type": "secret", "id": "s1", "file": str(secret_file)},
        {"qom-type": "secret", "id": "s0", "data": SECRET},
        {"qom-type": "secret", "id": "s2", "data": SECRET, "format": "base64"},
        {"qom-type": "secret", "id": "s3", "data": SECRET, "bogus": 1},
        {"qom-type": "secret", "id": "s4", "data": SECRET, "file": str(secret_file)},
    ):
        seen.append(json.dumps(c.cmd("object-add", args)))
    for execute in ("query-named-block-nodes", "query-block-exports", "query-commands"):
        seen.append(json.dumps(c.cmd(execute)))
    seen.append(json.dumps(c.cmd("human-monitor-command", {"command-line": "info qom-tree"})))
    c.close()
    proc.stop()
    log = proc.stderr_path.read_text()
    assert "object s0 (secret) added" in log  # debug logging was on
    for text in (*seen, log, proc.stdout_path.read_text()):
        assert SECRET not in text


@pytest.mark.parametrize("limits", [
    {"x-bps-total": 1 << 20, "x-bps-total-max": 2 << 20, "x-bps-total-max-length": 3},
    {"limits": {"iops-write": 10, "iops-write-max": 20, "iops-size": 4096}},
])
def test_throttle_group_accepted_like_qsd(qmpd: QmpdProcess, limits: dict[str, Any]) -> None:
    c = qmpd.client()
    c.negotiate()
    args = {"qom-type": "throttle-group", "id": "tg", **limits}
    assert c.cmd("object-add", args) == {"return": {}}
    assert c.cmd("object-add", args)["error"]["desc"] == (
        "attempt to add duplicate property 'tg' to object (type 'container')")
