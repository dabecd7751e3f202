"""Start-up (issue 10): what a daemon imports, and when.

The daemon runs under a small wrapper that notes which thread imported each
module and writes the list when the process exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmpd.cli import parse_args
from qmpd.daemon import WARM_CHECKS, Daemon
from tests.conftest import RawClient, require_tool

_RECORD = r"""
import atexit, gc, os, sys, threading

imported_on = {}
collecting = {}


class _Spy:
    def find_spec(self, name, path=None, target=None):
        main = threading.current_thread() is threading.main_thread()
        imported_on.setdefault(name, "main" if main else "worker")
        collecting.setdefault(name, "gc-on" if gc.isenabled() else "gc-off")
        return None


def _write():
    with open(os.environ["QMPD_TEST_MODULES"], "w") as f:
        for name in sorted(sys.modules):
            f.write(f"{name} {imported_on.get(name, 'before')} {collecting.get(name, '-')}\n")


sys.meta_path.insert(0, _Spy())
atexit.register(_write)
from qmpd.__main__ import main

sys.exit(main())
"""

#: Imported only by what uses them: migration, NBD, and --http (metrics, aiohttp).
ON_DEMAND = ("qmpd.migration", "qmpd.nbd.exports", "qmpd.nbd.server", "qmpd.nbd.protocol",
             "qmpd.metrics", "prometheus_client", "aiohttp")

WARMED = "qmpd: debug: warmed up: block drivers imported, I/O threads started"


#: Every Recorded daemon of the running test (killed after it, if still up).
_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_daemon_left() -> Iterator[None]:
    """A test that fails before it quits its daemons leaves none running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Recorded:
    """A qmpd under the recording wrapper."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.sock = str(tmp / f"qmp-{time.monotonic_ns()}.sock")
        self.out = tmp / f"modules-{time.monotonic_ns()}.txt"
        self.stderr = tmp / f"stderr-{time.monotonic_ns()}.txt"
        env = dict(os.environ, QMPD_TEST_MODULES=str(self.out))
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _RECORD, "--qmp", f"unix:{self.sock}", *args],
                env=env, cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)
        _STARTED.append(self.proc)
        self.client = RawClient(self.sock, wait=30, proc=self.proc)
        self.client.negotiate()

    def wait_stderr(self, line: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.stderr.read_text(errors="replace").splitlines():
            assert time.monotonic() < deadline, self.stderr.read_text(errors="replace")
            time.sleep(0.01)

    def quit(self) -> dict[str, str]:
        """Quit; every module loaded at exit, with the thread that imported it."""
        return {name: thread for name, (thread, _gc) in self.quit_with_gc().items()}

    def quit_with_gc(self) -> dict[str, tuple[str, str]]:
        """Quit; every module loaded at exit: the thread that imported it, and
        whether the garbage collector was on then."""
        try:
            self.client.cmd("quit")
            assert self.proc.wait(30) == 0
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        rows = [line.split() for line in self.out.read_text().splitlines()]
        return {name: (thread, gc) for name, thread, gc in rows}


def _on_demand(modules: dict[str, str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in ON_DEMAND))


def test_a_default_start_imports_no_migration_nbd_or_metrics(tmp_path: Path) -> None:
    plain = Recorded(tmp_path)
    assert plain.client.ok("query-status")["status"] == "running"
    plain.client.ok("query-named-block-nodes")
    plain.client.ok("blockdev-add", {"driver": "null-co", "node-name": "n0"})
    assert _on_demand(plain.quit()) == []
    # The control: using them imports them, and the wrapper sees it.
    used = Recorded(tmp_path, "--http", "127.0.0.1:0")
    assert used.client.ok("query-migrate") == {}
    assert used.client.ok("query-block-exports") == []
    modules = used.quit()
    for prefix in ON_DEMAND:
        assert any(m == prefix or m.startswith(prefix + ".") for m in modules), prefix


def test_migration_without_http_imports_no_metrics(tmp_path: Path) -> None:
    """Without --http nobody reads the migration's series: using migration
    loads the migration code but neither qmpd.metrics nor prometheus_client."""
    plain = Recorded(tmp_path)
    plain.client.ok("migrate-set-capabilities",
                    {"capabilities": [{"capability": "events", "state": True}]})
    assert plain.client.ok("query-migrate") == {}
    modules = plain.quit()
    assert "qmpd.migration.manager" in modules
    assert [m for m in _on_demand(modules) if not m.startswith("qmpd.migration")] == []


def test_the_first_blockdev_add_imports_nothing_on_the_main_thread(tmp_path: Path) -> None:
    """Once QMP listens, the block drivers are imported on a worker thread, so
    neither a client nor the first blockdev-add waits for them."""
    image = tmp_path / "a.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    daemon = Recorded(tmp_path, "--log-level", "debug")
    daemon.wait_stderr(WARMED)
    daemon.client.ok("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": {
        "driver": "file", "node-name": "f0", "filename": str(image)}})
    modules = daemon.quit()
    drivers = {m: t for m, t in modules.items()
               if m in ("qmpd.block.file", "qmpd.block.raw", "qmpd.block.qcow2.driver")}
    assert drivers == dict.fromkeys(drivers, "worker") and len(drivers) == 3


def test_metrics_show_the_nbd_series_before_nbd_is_used(qmpd_factory: Any) -> None:
    """NBD is built when HTTP starts, so /metrics lists its series from the start."""
    proc = qmpd_factory("--http", "127.0.0.1:0", "--log-level", "info")
    with urllib.request.urlopen(proc.http_url() + "/metrics", timeout=10) as resp:
        body = resp.read().decode()
    assert "qmpd_nbd_server_running 0.0" in body.splitlines()
    assert "qmpd_nbd_protocol_errors_total 0.0" in body.splitlines()


def test_the_collector_is_off_while_modules_load_and_on_once_serving(tmp_path: Path) -> None:
    """Start-up allocates much and frees little: the collector waits until it is over."""
    daemon = Recorded(tmp_path, "--log-level", "debug")
    daemon.wait_stderr(WARMED)
    modules = daemon.quit_with_gc()
    assert modules["qmpd.daemon"][1] == "gc-off"
    assert modules["qmpd.schema"][1] == "gc-off"
    # The drivers are imported after the monitors greet.
    assert modules["qmpd.block.qcow2.driver"] == ("worker", "gc-on")


#: Not imported by a default start, warm-up included: importlib.resources and
#: pathlib (the schema is found and read with os.path).
NOT_AT_START = ("importlib.resources", "pathlib", "urllib.parse")


def test_a_default_start_imports_no_importlib_resources_or_pathlib(tmp_path: Path) -> None:
    plain = Recorded(tmp_path, "--log-level", "debug")
    plain.wait_stderr(WARMED)
    assert plain.client.ok("query-status")["status"] == "running"
    assert len(plain.client.ok("query-qmp-schema")) > 100
    assert [m for m in plain.quit() if m in NOT_AT_START] == []
    # The control: aiohttp brings pathlib with it.
    used = Recorded(tmp_path, "--http", "127.0.0.1:0", "--log-level", "info")
    assert used.client.ok("query-status")["status"] == "running"
    assert "pathlib" in used.quit()


async def test_the_warm_up_compiles_blockdev_add_s_check(tmp_path: Path) -> None:
    """The first blockdev-add finds its argument check compiled already."""
    daemon = Daemon(parse_args(["--qmp", f"unix:{tmp_path / 'qmp.sock'}"]))
    try:
        assert "blockdev-add" in WARM_CHECKS
        assert not any(daemon.schema.compiled("arguments", name) for name in WARM_CHECKS)
        await daemon.start()
        assert daemon._warm_up is not None
        await daemon._warm_up
        assert all(daemon.schema.compiled("arguments", name) for name in WARM_CHECKS)
        assert not daemon.schema.compiled("arguments", "block-export-add")
    finally:
        await daemon.shutdown()


_REGEX_COMPILERS = r"""
import re, sys
compiled_by = set()
_compile = re.compile
def compile(pattern, flags=0):
    compiled_by.add(sys._getframe(1).f_globals.get("__name__"))
    return _compile(pattern, flags)
re.compile = compile
import qmpd.commands.hmp
print(" ".join(sorted(m for m in compiled_by if m and m.startswith("qmpd."))))
"""


def test_hmp_compiles_no_regex_when_imported() -> None:
    """The HMP size parser's pattern is compiled on first use, not at start-up."""
    out = subprocess.run([sys.executable, "-c", _REGEX_COMPILERS], capture_output=True,
                         text=True, timeout=30, check=True)
    assert "qmpd.commands.hmp" not in out.stdout.split(), out.stdout
