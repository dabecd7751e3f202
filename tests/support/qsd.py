"""qemu-storage-daemon 7.2 and qmpd side by side: the same command line and the
same conversation with each, in its own directory."""

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


@contextmanager
def daemon(impl: str, work: Path, args: list[str]) -> Iterator[QmpClient]:
    """A negotiated QMP client of qemu-storage-daemon or qmpd started in ``work``
    with ``args``; the daemon is stopped afterwards."""
    if impl == "qsd":
        sock = work / "qmp.sock"
        # A file, not a pipe: what QSD reports (error_report) never blocks it.
        with open(work / "qsd.stderr", "wb") as stderr:
            proc = subprocess.Popen(
                [require_tool(QSD), "--chardev", f"socket,id=c,path={sock},server=on,wait=off",
                 "--monitor", "chardev=c", *args],
                stdout=subprocess.DEVNULL, stderr=stderr, cwd=work)
        try:
            try:
                wait_for_socket(proc, sock)
            except AssertionError as exc:
                said = (work / "qsd.stderr").read_text(errors="replace")
                raise AssertionError(f"{exc}: {said}") from None
            client = QmpClient(sock, 20, check_schema=False, negotiate=True)
            try:
                yield client
            finally:
                client.close()
        finally:
            proc.terminate()
            proc.wait(10)
        return
    from tests.conftest import QmpdProcess  # the fixtures' module imports this one's siblings

    qmpd = QmpdProcess(work, *args)
    try:
        client = QmpClient(qmpd.sock, 20, negotiate=True)
        try:
            yield client
        finally:
            client.close()
    finally:
        qmpd.stop()


def side_by_side_run(tmp_path: Path, make_nodes: Callable[[Path], list[str]],
                     scenario: Callable[[QmpClient, Path], T]) -> dict[str, T]:
    """``scenario(client, its dir)``'s result with QSD and with qmpd, each started
    with ``make_nodes(its dir)`` in a directory of its own under ``tmp_path``."""
    require_tool(QSD)
    out: dict[str, T] = {}
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        with daemon(impl, work, make_nodes(work)) as client:
            out[impl] = scenario(client, work)
    return out


def side_by_side(tmp_path: Path, make_nodes: Callable[[Path], list[str]],
                 steps: list[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The replies of QSD and of qmpd, each started with ``make_nodes(its dir)``,
    to the same commands."""
    return side_by_side_run(tmp_path, make_nodes,
                            lambda client, _work: [client.cmd(e, a) for e, a in steps])
