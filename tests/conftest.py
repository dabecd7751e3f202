"""Shared fixtures: real qmpd processes on real sockets, raw and qemu.qmp clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from qmpd.schema import Schema

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI") == "true"

# CI runs property tests derandomized, with a fixed example budget (tests that
# set max_examples keep theirs) and no deadline: a failure there is
# reproducible, never luck or a slow runner.
settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=100, deadline=None, print_blob=True
)
if IN_CI:
    settings.load_profile("ci")

_SCHEMA: Schema | None = None


def schema() -> Schema:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = Schema()
    return _SCHEMA


def require_tool(name: str) -> str:
    """Path of a QEMU tool; skip without it, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not installed")
        pytest.skip(f"{name} is not installed")
    return path


def check_message(msg: dict[str, Any], command: str | None = None) -> None:
    """Validate a return value or event against the schema the daemon ships."""
    if "event" in msg:
        problems = schema().validate_event(msg["event"], msg.get("data"))
        assert not problems, f"event {msg['event']} outside its schema: {problems}"
    elif "return" in msg and command is not None:
        problems = schema().validate_returns(command, msg["return"])
        assert not problems, f"{command} returned data outside its schema: {problems}"


class RawClient:
    """A blocking line-oriented QMP client on a real socket, for exact wire checks."""

    def __init__(self, path: str | tuple[str, int], timeout: float = 10.0) -> None:
        if isinstance(path, tuple):
            self.sock = socket.create_connection(path, timeout=timeout)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
        self.buf = b""
        self.greeting = self.recv()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def recv_line(self) -> bytes:
        buf = bytearray(self.buf)
        searched = 0
        while True:
            end = buf.find(b"\r\n", max(0, searched - 1))
            if end >= 0:
                break
            searched = len(buf)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        self.buf = bytes(buf[end + 2 :])
        return bytes(buf[:end])

    def recv(self) -> dict[str, Any]:
        msg = json.loads(self.recv_line())
        assert isinstance(msg, dict)
        return msg

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """Send a command; return its reply (events before it are checked and dropped)."""
        req: dict[str, Any] = {"execute": execute, **extra}
        if arguments is not None:
            req["arguments"] = arguments
        self.send(json.dumps(req) + "\n")
        while True:
            msg = self.recv()
            check_message(msg, execute)
            if "return" in msg or "error" in msg:
                return msg

    def negotiate(self) -> None:
        assert self.cmd("qmp_capabilities") == {"return": {}}

    def close(self) -> None:
        self.sock.close()


LISTENING = "qmpd: info: listening: "


def _logs_info(args: tuple[str, ...]) -> bool:
    levels = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--log-level"]
    return bool(levels) and levels[-1] in ("info", "debug")


def wait_for_socket(proc: subprocess.Popen[Any], path: Path, timeout: float = 30.0) -> None:
    """Wait until the socket file at ``path`` exists (QEMU's tools create it listening)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            said = proc.stderr.read() if proc.stderr is not None else ""
            raise AssertionError(f"{proc.args[0]} exited with status {proc.returncode}: {said!r}")
        assert time.monotonic() < deadline, f"{proc.args[0]} did not start"
        time.sleep(0.02)


def wait_greeting(path: str, timeout: float = 10.0) -> bool:
    """Whether the QMP socket at ``path`` accepts a client and greets it."""
    if not os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
        data = b""
        while not data.endswith(b"\n"):
            chunk = probe.recv(4096)
            if not chunk:
                return False
            data += chunk
        return b'"QMP"' in data
    except OSError:
        return False
    finally:
        probe.close()


class QmpdProcess:
    """A qmpd started as a real process, stopped at teardown."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 default_qmp: bool = True) -> None:
        self.tmp = tmp
        self.sock = str(tmp / "qmp.sock")
        argv = [sys.executable, "-m", "qmpd", "--log-level", "warning"]
        if default_qmp:
            argv += ["--qmp", f"unix:{self.sock}"]
        if not default_qmp and not _logs_info(args):
            args = (*args, "--log-level", "info")  # to see the listening line
        argv += list(args)
        full_env = dict(os.environ)
        full_env["QMPD_CHECK_SCHEMA"] = "1"
        full_env.update(env or {})
        stamp = time.monotonic_ns()
        self.stderr_path = tmp / f"qmpd-{stamp}.stderr"
        self.stdout_path = tmp / f"qmpd-{stamp}.stdout"
        self.stderr = open(self.stderr_path, "wb")
        self.stdout = open(self.stdout_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self.stdout, stderr=self.stderr, env=full_env, cwd=tmp
        )
        self.banner = ""
        deadline = time.monotonic() + 30
        if default_qmp:
            # As QEMU's own test harnesses do: the socket file appears only once
            # it listens, and the greeting comes only once start-up is over.
            while not wait_greeting(self.sock):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"qmpd did not start: {self.read_stderr()}")
                time.sleep(0.01)
        if default_qmp and not _logs_info(args):
            return
        # Quiet daemons print nothing: tests that want the listening line ask
        # for --log-level info, and wait for it on stderr.
        while True:
            for line in self.stderr_path.read_text(errors="replace").splitlines():
                if line.startswith(LISTENING):
                    self.banner = line[len(LISTENING):].strip()
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qmpd did not start: {self.read_stderr()}")
            time.sleep(0.01)

    def read_stdout(self) -> str:
        """What the daemon printed on stdout (qemu-io output, for one)."""
        return self.stdout_path.read_text(errors="replace")

    def read_stderr(self) -> str:
        self.stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def http_url(self) -> str:
        for part in self.banner.split(", "):
            if "HTTP on " in part:
                return part.split("HTTP on ", 1)[1]
        raise AssertionError(f"no HTTP listener in {self.banner!r}")

    def client(self) -> RawClient:
        return RawClient(self.sock)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        self.stdout.close()
        log = self.stderr_path.read_text(errors="replace")
        assert "outside its schema" not in log, log
        assert "Traceback" not in log, log


@pytest.fixture
def qmpd_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[QmpdProcess] = []

    def start(*args: str, **kw: Any) -> QmpdProcess:
        proc = QmpdProcess(tmp_path, *args, **kw)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def qmpd(qmpd_factory: Any) -> QmpdProcess:
    return qmpd_factory()  # type: ignore[no-any-return]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long randomized and soak variants run only with QMPD_SLOW=1."""
    if os.environ.get("QMPD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow variant: set QMPD_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
