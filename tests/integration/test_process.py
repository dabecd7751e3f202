"""The daemon as a process: signals, pidfile, daemonize, sd_notify, sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QmpdProcess, RawClient


def test_sigterm_sends_shutdown_and_cleans_up(qmpd_factory: Any, tmp_path: Path) -> None:
    pidfile = tmp_path / "qmpd.pid"
    proc: QmpdProcess = qmpd_factory("--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == proc.proc.pid
    client = proc.client()
    client.negotiate()
    proc.signal(signal.SIGTERM)
    event = client.recv()
    assert event["event"] == "SHUTDOWN"
    assert event["data"] == {"guest": False, "reason": "host-signal"}
    with pytest.raises(EOFError):
        client.recv()
    assert proc.wait() == 0
    assert not Path(proc.sock).exists()
    assert not pidfile.exists()
    # Quiet as QSD while all is well: nothing at all on stderr or stdout.
    assert proc.read_stderr() == ""
    assert proc.read_stdout() == ""


def test_sigint_is_a_graceful_shutdown_too(qmpd: QmpdProcess) -> None:
    qmpd.signal(signal.SIGINT)
    assert qmpd.wait() == 0
    assert not Path(qmpd.sock).exists()


def test_quit_over_the_wire(qmpd: QmpdProcess) -> None:
    client = qmpd.client()
    client.negotiate()
    client.send('{"execute": "quit", "id": "q"}\n')
    event = client.recv()
    assert event["event"] == "SHUTDOWN"
    assert event["data"]["reason"] == "host-qmp-quit"
    assert client.recv() == {"return": {}, "id": "q"}
    with pytest.raises(EOFError):
        client.recv()
    assert qmpd.wait() == 0


def test_unnegotiated_client_gets_no_shutdown_event(qmpd: QmpdProcess) -> None:
    quiet = qmpd.client()
    talker = qmpd.client()
    talker.negotiate()
    talker.cmd("quit")
    # The negotiating client only sees the connection close.
    with pytest.raises(EOFError):
        quiet.recv()


def test_unix_socket_is_private(qmpd: QmpdProcess) -> None:
    mode = stat.S_IMODE(os.stat(qmpd.sock).st_mode)
    assert mode == 0o600


def test_tcp_monitor_binds_loopback_and_chardev_spelling(qmpd_factory: Any, tmp_path: Path) -> None:
    sock2 = tmp_path / "pretty.sock"
    proc = qmpd_factory(
        "--qmp", "tcp::0", "--log-level", "info",
        "--chardev", f"socket,id=m1,path={sock2},server=on,wait=off",
        "--monitor", "chardev=m1,mode=control,pretty=on",
    )
    tcp = next(p for p in proc.banner.split(", ") if "tcp:" in p)
    host, port = tcp.split("tcp:", 1)[1].rsplit(":", 1)
    assert host == "127.0.0.1"
    client = RawClient((host, int(port)))
    client.negotiate()
    pretty = socket.socket(socket.AF_UNIX)
    pretty.connect(str(sock2))
    data = b""
    while not data.endswith(b"}\r\n"):
        data += pretty.recv(4096)
    assert data.startswith(b'{\r\n    "QMP": {\r\n')
    assert json.loads(data) == client.greeting
    pretty.close()


def test_daemonize_reports_ready_and_detaches(tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    pidfile = tmp_path / "d.pid"
    result = subprocess.run(
        [sys.executable, "-m", "qmpd", "--daemonize", "--qmp", f"unix:{sock}",
         "--pidfile", str(pidfile), "--log-level", "error"],
        capture_output=True, timeout=20, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # The parent returned only once the daemon was ready.
    assert sock.exists() and pidfile.exists()
    pid = int(pidfile.read_text())
    assert pid != os.getpid()
    client = RawClient(str(sock))
    client.negotiate()
    assert client.cmd("query-status")["return"]["status"] == "running"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pidfile.exists() and not sock.exists()


def test_daemonize_failure_is_reported_by_the_parent(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmpd", "--daemonize", "--qmp", f"unix:{tmp_path}/no/such/dir.sock"],
        capture_output=True, timeout=20, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert b"cannot listen on unix:" in result.stderr


def test_sd_notify_ready(tmp_path: Path, qmpd_factory: Any) -> None:
    path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(10)
    proc = qmpd_factory(env={"NOTIFY_SOCKET": path})
    assert notify.recv(100) == b"READY=1"
    proc.signal(signal.SIGTERM)
    assert notify.recv(100) == b"STOPPING=1"
    notify.close()


def test_bad_option_exits_1(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "qmpd", "--monitor", "chardev=nope"],
        capture_output=True, timeout=20, cwd=tmp_path,
    )
    assert result.returncode == 1
    assert b'chardev "nope" not found' in result.stderr


def test_python_dash_m_and_console_script_agree(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "qmpd", "--version"], capture_output=True,
                         timeout=20)
    assert out.returncode == 0 and out.stdout.startswith(b"qmpd ")


def test_installed_package_ships_its_schema(tmp_path: Path) -> None:
    # Run outside the checkout so the installed qmpd is the one imported.
    out = subprocess.run(
        [sys.executable, "-c", "from qmpd.schema import schema_dir; print(schema_dir())"],
        capture_output=True, timeout=20, cwd=tmp_path, text=True,
    )
    assert out.returncode == 0, out.stderr
    root = Path(out.stdout.strip())
    assert (root / "types.json").is_file()
    assert (root / "commands" / "query-status.json").is_file()
    assert (root / "events" / "SHUTDOWN.json").is_file()


def _start_plain(*args: str, umask: int = 0o022) -> subprocess.CompletedProcess[str]:
    """A qmpd that is expected to refuse to start."""
    return subprocess.run([sys.executable, "-m", "qmpd", *args], capture_output=True,
                          text=True, timeout=30, preexec_fn=lambda: os.umask(umask))


def test_pidfile_is_locked_and_private(qmpd_factory: Any, tmp_path: Path) -> None:
    """QEMU's pidfile rules: 0600 whatever the umask, and a second daemon refused."""
    pidfile = tmp_path / "qmpd.pid"
    old = os.umask(0o002)
    try:
        first: QmpdProcess = qmpd_factory("--pidfile", str(pidfile))
    finally:
        os.umask(old)
    assert stat.S_IMODE(pidfile.stat().st_mode) == 0o600
    second_sock = tmp_path / "second.sock"
    second = _start_plain("--pidfile", str(pidfile), "--qmp", f"unix:{second_sock}")
    assert second.returncode == 1
    assert second.stderr == ("qmpd: cannot create PID file: Cannot lock pid file: "
                             "Resource temporarily unavailable\n")
    # The loser touched nothing: no socket, and the winner's pidfile intact.
    assert not second_sock.exists()
    assert int(pidfile.read_text()) == first.proc.pid
    assert first.client().greeting["QMP"]


def test_pidfile_in_missing_directory(tmp_path: Path) -> None:
    sock = tmp_path / "m.sock"
    missing = tmp_path / "nodir" / "qmpd.pid"
    proc = _start_plain("--pidfile", str(missing), "--qmp", f"unix:{sock}")
    assert proc.returncode == 1
    assert proc.stderr == (f"qmpd: cannot create PID file: Could not create '{missing}': "
                           "No such file or directory\n")
    assert not sock.exists() and not missing.parent.exists()


def _blocks_sigterm(pid: int, tid: int) -> bool:
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1],
               16)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


def test_only_the_main_thread_takes_signals(qmpd_factory: Any, tmp_path: Path) -> None:
    """As QEMU's worker threads: a signal never lands on an I/O thread, whose
    default action would end the process while the main thread is exiting."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * 65536)
    proc: QmpdProcess = qmpd_factory(
        "--blockdev", f"driver=file,node-name=n0,filename={image}")
    client = proc.client()
    client.negotiate()
    reply = client.cmd("human-monitor-command",
                       {"command-line": "qemu-io n0 \"write -P 7 0 4096\""})
    assert reply == {"return": ""}
    assert image.read_bytes()[:4096] == b"\7" * 4096  # through the I/O threads
    pid = proc.proc.pid
    threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    assert len(threads) > 1
    assert {tid: _blocks_sigterm(pid, tid) for tid in threads} == {
        tid: tid != pid for tid in threads}


def _maps_aiohttp(pid: int) -> bool:
    return "aiohttp" in Path(f"/proc/{pid}/maps").read_text()


def test_aiohttp_is_loaded_only_for_http(qmpd_factory: Any) -> None:
    """Start-up time (issue 10): importing aiohttp costs about 250 ms, so a daemon
    without --http never loads it; one with --http does, and serves."""
    plain: QmpdProcess = qmpd_factory()
    client = plain.client()
    client.negotiate()
    assert client.cmd("query-status")["return"]["status"] == "running"
    assert not _maps_aiohttp(plain.proc.pid)
    plain.stop()
    served: QmpdProcess = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    client = served.client()
    client.negotiate()
    assert _maps_aiohttp(served.proc.pid)
