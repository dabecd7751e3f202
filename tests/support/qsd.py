"""qemu-storage-daemon 7.2 and qmpd side by side: each started with the same
command line in a directory of its own, each given the same commands."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.support.qmp import QmpClient
from tests.support.tools import QSD, require_tool, wait_for_socket

T = TypeVar("T")

IMPLS = ("qsd", "qmpd")


class Peer:
    """One daemon: which one, its QMP client and its directory."""

    def __init__(self, name: str, qmp: QmpClient, work: Path) -> None:
        self.name = name
        self.qmp = qmp
        self.work = work

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.qmp.cmd(execute, arguments)

    def ok(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.qmp.ok(execute, arguments)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The events so far, without their timestamps."""
        return [{k: v for k, v in ev.items() if k != "timestamp"}
                for ev in self.qmp.events[since:]]


@contextmanager
def started(impl: str, work: Path, args: list[str]) -> Iterator[Peer]:
    """Start ``impl`` ("qsd" or "qmpd") with ``args`` in ``work``."""
    from tests.conftest import QmpdProcess  # the test suite's qmpd launcher

    if impl == "qsd":
        require_tool(QSD)
        sock = work / "qmp.sock"
        proc = subprocess.Popen(
            [QSD, "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
             "--monitor", "chardev=c", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_socket(proc, sock)
            client = QmpClient(sock, 30, check_schema=False, negotiate=True)
            try:
                yield Peer(impl, client, work)
            finally:
                client.close()
        finally:
            proc.terminate()
            proc.wait(10)
    else:
        daemon = QmpdProcess(work, *args)
        try:
            client = QmpClient(daemon.sock, 30, negotiate=True)
            try:
                yield Peer(impl, client, work)
            finally:
                client.close()
        finally:
            daemon.stop()


def run_both(tmp_path: Path, make_args: Callable[[Path], list[str]],
             script: Callable[[Peer], T]) -> dict[str, T]:
    """``script``'s result with QSD, then with qmpd, each started with
    ``make_args(its own directory)``."""
    require_tool(QSD)
    out: dict[str, T] = {}
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        args = make_args(work)
        with started(impl, work, args) as peer:
            out[impl] = script(peer)
    return out


def side_by_side(tmp_path: Path, make_nodes: Callable[[Path], list[str]],
                 steps: list[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The replies of QSD and of qmpd, each started with ``make_nodes(its dir)``,
    to the same commands."""
    return run_both(tmp_path, make_nodes, lambda peer: [peer.cmd(e, a) for e, a in steps])
