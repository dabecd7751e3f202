"""Shared fixtures: real qmpd processes on real sockets (helpers live in tests/support)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from tests.support.ceph import CephCluster, start_ceph
from tests.support.certs import Pki, make_pki
from tests.support.qmp import QmpClient, check_message, wait_greeting
from tests.support.tools import IN_CI, REPO, require_tool, wait_for_socket

#: The shared client under the name the tests have always imported from here.
RawClient = QmpClient

__all__ = ["IN_CI", "REPO", "QmpdProcess", "RawClient", "check_message", "require_tool",
           "wait_for_socket", "wait_greeting"]

# CI runs property tests derandomized, with a fixed example budget (tests that
# set max_examples keep theirs) and no deadline: a failure there is
# reproducible, never luck or a slow runner.
settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=100, deadline=None, print_blob=True
)
if IN_CI:
    settings.load_profile("ci")

LISTENING = "qmpd: info: listening: "


def _logs_info(args: tuple[str, ...]) -> bool:
    levels = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--log-level"]
    return bool(levels) and levels[-1] in ("info", "debug")


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

    def client(self) -> QmpClient:
        return QmpClient(self.sock)

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


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """x509 credentials for TLS tests, made with openssl (see tests/support/certs.py)."""
    require_tool("openssl")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def ceph_session() -> Iterator[CephCluster]:
    """One throw-away Ceph cluster (mon + bluestore OSD) for the whole session,
    started at the first test that asks for it; every process it started is
    stopped at the end (see tests/support/ceph.py)."""
    with start_ceph() as cluster:
        yield cluster


@pytest.fixture
def ceph(ceph_session: CephCluster) -> CephCluster:
    """The session's Ceph cluster, with whatever a previous fault test stopped
    started again."""
    ceph_session.ensure_running()
    return ceph_session


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.qemu(TOOL, ...)``: skip without the tools, fail instead under CI=true."""
    for mark in item.iter_markers("qemu"):
        for tool in mark.args:
            require_tool(tool)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long randomized and soak variants run only with QMPD_SLOW=1."""
    if os.environ.get("QMPD_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow variant: set QMPD_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def nfs_server() -> Iterator[Any]:
    """A throw-away NFS server (rpcbind + nfs-ganesha) on 127.0.0.1, for the
    whole session; skips without its packages, fails in CI."""
    import shutil
    import tempfile

    from tests.support.nfs import NfsServer, require_nfs

    require_nfs()
    workdir = Path(tempfile.mkdtemp(prefix="qnfs", dir="/tmp"))
    server = NfsServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
