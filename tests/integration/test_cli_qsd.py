"""qmpd started with qemu-storage-daemon's own command-line forms, side by side with QSD 7.2.

Each case runs both daemons the same way (only the program differs) and
compares what a user or a harness sees: exit status and error line, QMP
replies, exported names, and silence on stdout and stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.qmp import QmpClient
from tests.support.tools import QSD, REPO, require_tool

IMPLS = ("qsd", "qmpd")


def argv0(impl: str) -> list[str]:
    if impl == "qsd":
        require_tool(QSD)
        return [QSD]  # by name: getopt's messages start with argv[0]
    return [sys.executable, "-m", "qmpd"]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def one_line(impl: str, text: str) -> str:
    """The error with the program's name taken off."""
    prefix = "qemu-storage-daemon: " if impl == "qsd" else "qmpd: "
    assert text.endswith("\n") and text.count("\n") == 1, text
    assert text.startswith(prefix), text
    return text[len(prefix):-1]


class Daemon:
    def __init__(self, impl: str, workdir: Path, *args: str, stdin: Any = subprocess.DEVNULL
                 ) -> None:
        self.impl = impl
        self.out = open(workdir / f"{impl}.out", "w+b")
        self.err = open(workdir / f"{impl}.err", "w+b")
        self.proc = subprocess.Popen([*argv0(impl), *args], stdin=stdin, stdout=self.out,
                                     stderr=self.err, env=env(), cwd=workdir)

    def stop(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        out = Path(self.out.name).read_text(errors="replace")
        err = Path(self.err.name).read_text(errors="replace")
        self.out.close()
        self.err.close()
        return rc, out, err


def connect(path: Path, proc: subprocess.Popen[bytes] | None = None) -> QmpClient:
    """The shared client, waiting for the socket (QSD's replies are outside qmpd's schema)."""
    return QmpClient(path, 20, wait=30, proc=proc, check_schema=False)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "16M"],
                   check=True)
    return path


def each(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        yield impl, work


@pytest.mark.parametrize(("name", "args"), [
    ("unknown", ["--bogus"]),
    ("missing-argument", ["--blockdev"]),
    ("unknown-short", ["-x"]),
    ("no-such-chardev", ["--monitor", "nonexist"]),
    ("readline", ["--chardev", "socket,id=c,path={w}/m.sock,server=on,wait=off",
                  "--monitor", "c,mode=readline"]),
    ("chardev-twice", ["--chardev", "socket,id=c,path={w}/m.sock,server=on,wait=off",
                       "--monitor", "c", "--monitor", "c"]),
    ("client-nobody-listening", ["--chardev", "socket,id=c,path={w}/none.sock",
                                 "--monitor", "c"]),
    ("secret-without-data", ["--object", "secret,id=s"]),
    ("unknown-object", ["--object", "bogus,id=x"]),
    ("object-bad-number", ["--object", "throttle-group,id=t,x-bps-total=abc"]),
    ("blockdev-unknown-key", ["--blockdev", "null-co,node-name=n,bogus=1"]),
    ("export-no-node", ["--export", "nbd,id=e,node-name=nope"]),
])
def test_errors_are_qsd_one_liners(tmp_path: Path, name: str, args: list[str]) -> None:
    seen = {}
    for impl, work in each(tmp_path):
        d = Daemon(impl, work, *[a.replace("{w}", str(work)) for a in args])
        d.proc.wait(20)
        rc, out, err = d.stop()
        seen[impl] = (rc, out, one_line(impl, err.replace(str(work), "W")))
    assert seen["qmpd"] == seen["qsd"], name


def test_documented_command_line_with_implied_keys(tmp_path: Path, image: Path) -> None:
    """QSD's documented NBD example, in its implied-key spelling, then silence."""
    seen = {}
    for impl, work in each(tmp_path):
        d = Daemon(
            impl, work,
            "--blockdev", f"file,node-name=file,filename={image}",
            "--blockdev", "qcow2,node-name=qcow2,file=file",
            "--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
            "--export", "nbd,id=export,node-name=qcow2,name=disk,writable=on",
            "--chardev", f"socket,path={work}/qmp.sock,server=on,wait=off,id=char1",
            "--monitor", "char1",
        )
        qmp = connect(work / "qmp.sock", d.proc)
        qmp.cmd("qmp_capabilities")
        nodes = sorted(n["node-name"] for n in
                       qmp.cmd("query-named-block-nodes", {"flat": True})["return"])
        listed = subprocess.run(
            [require_tool("nbdinfo"), "--list", "--json", f"nbd+unix:///?socket={work}/nbd.sock"],
            capture_output=True, text=True, timeout=30, check=True)
        names = [e["export-name"] for e in json.loads(listed.stdout)["exports"]]
        qmp.close()
        rc, out, err = d.stop()
        seen[impl] = (nodes, names, rc, out, err)
    assert seen["qmpd"] == seen["qsd"]
    assert seen["qmpd"] == (["file", "qcow2"], ["disk"], 0, "", "")


def test_client_mode_monitor_connects_to_the_harness(tmp_path: Path) -> None:
    seen = {}
    for impl, work in each(tmp_path):
        path = work / "harness.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(1)
        listener.settimeout(30)
        d = Daemon(impl, work, "--chardev", f"socket,id=c,path={path}", "--monitor", "c",
                   "--blockdev", "null-co,node-name=n0")
        conn, _ = listener.accept()
        qmp = QmpClient(conn, 20, check_schema=False)
        caps = qmp.greeting["QMP"]["capabilities"]
        replies = [qmp.cmd("qmp_capabilities"),
                   [n["node-name"] for n in qmp.cmd("query-named-block-nodes")["return"]],
                   qmp.cmd("quit")]
        qmp.close()
        listener.close()
        rc, out, err = d.stop()
        seen[impl] = (caps, replies, rc, out, err)
    assert seen["qmpd"] == seen["qsd"]
    assert seen["qmpd"][1][1] == ["n0"]


def test_server_without_wait_off_waits_for_a_client(tmp_path: Path) -> None:
    """server=on alone holds start-up (later options) until a client connects."""
    seen = {}
    for impl, work in each(tmp_path):
        qmp_path, nbd_path = work / "qmp.sock", work / "nbd.sock"
        d = Daemon(impl, work, "--chardev", f"socket,id=c,path={qmp_path},server=on",
                   "--monitor", "c", "--blockdev", "null-co,node-name=n0",
                   "--nbd-server", f"addr.type=unix,addr.path={nbd_path}")
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert d.proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)  # would be long enough for the later options to run
        before = nbd_path.exists()
        qmp = connect(qmp_path, d.proc)
        qmp.cmd("qmp_capabilities")
        after = nbd_path.exists()
        qmp.cmd("quit")
        qmp.close()
        rc, out, err = d.stop()
        waiting = err.replace(str(work), "W").splitlines()
        seen[impl] = (before, after, rc, out, len(waiting))
        assert "waiting for connection on: disconnected:unix:" in err
    assert seen["qmpd"] == seen["qsd"] == (False, True, 0, "", 1)


def test_stdio_monitor(tmp_path: Path) -> None:
    seen = {}
    for impl, work in each(tmp_path):
        commands = work / "in.json"
        commands.write_text('{"execute": "qmp_capabilities"}\n'
                            '{"execute": "query-named-block-nodes"}\n{"execute": "quit"}\n')
        with open(commands, "rb") as stdin:
            d = Daemon(impl, work, "--chardev", "stdio,id=s", "--monitor", "s", stdin=stdin)
            d.proc.wait(20)
        rc, out, err = d.stop()
        lines = [json.loads(line) for line in out.splitlines()]
        replies = [m for m in lines[1:] if "event" not in m]
        # Events differ by design: qmpd has QEMU's run state (SHUTDOWN on quit).
        seen[impl] = ("QMP" in lines[0], replies, rc, err)
    assert seen["qmpd"] == seen["qsd"]
    assert seen["qmpd"][1] == [{"return": {}}, {"return": []}, {"return": {}}]


def test_two_daemons_with_the_same_options_never_share_a_socket(tmp_path: Path) -> None:
    args = ["--chardev", f"socket,id=c,path={tmp_path}/qmp.sock,server=on,wait=off",
            "--monitor", "c"]
    first = Daemon("qmpd", tmp_path, *args)
    try:
        qmp = connect(tmp_path / "qmp.sock", first.proc)
        second = subprocess.run([*argv0("qmpd"), *args], capture_output=True, text=True,
                                env=env(), timeout=30)
        assert second.returncode == 1
        assert "Address already in use" in second.stderr
        assert qmp.cmd("qmp_capabilities") == {"return": {}}
        qmp.close()
    finally:
        first.stop()


def test_log_lines_and_log_file(tmp_path: Path) -> None:
    info = Daemon("qmpd", tmp_path, "--qmp", f"unix:{tmp_path}/a.sock", "--log-level", "info",
                  "--qmp", f"unix:{tmp_path}/b.sock")
    connect(tmp_path / "b.sock", info.proc).close()
    rc, out, err = info.stop()
    assert rc == 0 and out == ""
    lines = err.splitlines()
    assert all(re.match(r"qmpd: (debug|info|warning|error): \S", line) for line in lines), err
    assert not any("qmpd: qmpd" in line or "INFO" in line for line in lines), err
    assert f"qmpd: info: listening: QMP on unix:{tmp_path}/a.sock, QMP on unix:{tmp_path}/b.sock" \
        in lines
    assert any(re.match(r"qmpd: info: QMP monitor qmp0 on unix:.*/a\.sock$", x) for x in lines)
    assert "qmpd: info: terminating on signal 15" in lines

    # Daemonized with -D: the parent prints the listening line, the daemon's
    # later messages (and HMP qemu-io output) land in the file.
    log = tmp_path / "qmpd.log"
    parent = subprocess.run(
        [*argv0("qmpd"), "--daemonize", "-D", str(log), "--log-level", "info",
         "--qmp", f"unix:{tmp_path}/d.sock", "--pidfile", str(tmp_path / "d.pid"),
         "--blockdev", "null-co,node-name=n0,read-zeroes=on"],
        capture_output=True, text=True, env=env(), timeout=30)
    assert parent.returncode == 0, parent.stderr
    assert parent.stdout.startswith("qmpd: info: listening: QMP on unix:")
    pid = int((tmp_path / "d.pid").read_text())
    qmp = connect(tmp_path / "d.sock")
    qmp.cmd("qmp_capabilities")
    qmp.cmd("human-monitor-command", {"command-line": 'qemu-io n0 "read 0 512"'})
    qmp.close()
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (tmp_path / "d.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    text = log.read_text()
    assert "read 512/512 bytes at offset 0" in text
    assert "qmpd: info: terminating on signal 15" in text


def test_objects_from_the_command_line(tmp_path: Path) -> None:
    seen = {}
    for impl, work in each(tmp_path):
        d = Daemon(impl, work,
                   "--object", "throttle-group,id=tg,x-iops-total=1000",
                   "--object", "secret,id=sec0,data=letmein",
                   "--blockdev", "null-co,node-name=n0",
                   "--blockdev", "throttle,node-name=t0,throttle-group=tg,file=n0",
                   "--chardev", f"socket,id=c,path={work}/qmp.sock,server=on,wait=off",
                   "--monitor", "c")
        qmp = connect(work / "qmp.sock", d.proc)
        qmp.cmd("qmp_capabilities")
        nodes = sorted(n["node-name"] for n in qmp.cmd("query-named-block-nodes")["return"])
        in_use = qmp.cmd("object-del", {"id": "tg"})
        dup = qmp.cmd("object-add", {"qom-type": "secret", "id": "sec0", "data": "x"})
        qmp.close()
        rc, out, err = d.stop()
        seen[impl] = (nodes, in_use, dup, rc, out, err)
    assert seen["qmpd"] == seen["qsd"]
    assert seen["qmpd"][0] == ["n0", "t0"]
    assert "letmein" not in json.dumps(seen["qmpd"])


def test_signal_while_waiting_for_the_first_client(tmp_path: Path) -> None:
    """server=on holds start-up; SIGTERM then still ends the daemon, leaving nothing."""
    path = tmp_path / "qmp.sock"
    d = Daemon("qmpd", tmp_path, "--chardev", f"socket,id=c,path={path},server=on",
               "--monitor", "c", "--pidfile", str(tmp_path / "q.pid"))
    deadline = time.monotonic() + 30
    while not path.exists():
        assert d.proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    d.proc.send_signal(signal.SIGTERM)
    # One signal only: stop() would send a second if the exit is slow, and a
    # second signal means "exit at once" (status 1).
    d.proc.wait(30)
    rc, out, err = d.stop()
    assert (rc, out) == (0, "")
    assert "waiting for connection on: disconnected:unix:" in err
    assert not path.exists() and not (tmp_path / "q.pid").exists()
