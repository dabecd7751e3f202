"""The same QMP conversation with qemu-storage-daemon 7.2 and with qmpd, as transcripts.

A conversation is a function of a :class:`Peer`: it sends commands
(:meth:`Peer.cmd`) and waits for events (:meth:`Peer.wait`).  It runs once
against each daemon, each started in its own directory with the same
arguments; the string ``$DIR`` in arguments stands for that directory.
:meth:`Peer.transcript` is everything the daemon said, replies and events in
arrival order, with timestamps dropped and the directory written ``$DIR``
again, so that the two transcripts compare equal when the daemons behave
alike.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.conftest import QmpdProcess
from tests.support.qmp import QmpClient
from tests.support.tools import QSD, require_tool

T = TypeVar("T")
Conversation = Callable[["Peer"], None]
#: The member QEMU 10 added to query-named-block-nodes, which qmpd reports.
_ACTIVE = re.compile(rb'"active": (?:true|false), ')
_TIMESTAMP = re.compile(rb'"timestamp": \{"seconds": \d+, "microseconds": \d+\}, ')
IMPLS = ("qsd", "qmpd")


def _subst(value: Any, old: str, new: str) -> Any:
    """``value`` with ``old`` replaced by ``new`` in every string inside it."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_subst(v, old, new) for v in value]
    if isinstance(value, tuple):
        return tuple(_subst(v, old, new) for v in value)
    if isinstance(value, dict):
        return {_subst(k, old, new): _subst(v, old, new) for k, v in value.items()}
    return value


class Peer:
    """One daemon in a conversation."""

    def __init__(self, name: str, client: QmpClient, work: Path,
                 proc: subprocess.Popen[Any] | None = None) -> None:
        self.name = name
        self.qmp = client
        self.work = work
        self.proc = proc
        self._seen = 0  # events consumed by wait() and job()

    def ok(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.qmp.ok(execute, arguments)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The events so far, without their timestamps."""
        return [{k: v for k, v in ev.items() if k != "timestamp"}
                for ev in self.qmp.events[since:]]

    def path(self, name: str) -> str:
        return str(self.work / name)

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a command (``$DIR`` in its arguments is this daemon's directory)."""
        args = _subst(arguments, "$DIR", str(self.work)) if arguments is not None else None
        return _subst(self.qmp.cmd(execute, args), str(self.work), "$DIR")  # type: ignore[no-any-return]

    def _next(self, match: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        """Consume events up to the first one ``match`` accepts."""
        deadline = time.monotonic() + timeout
        events = self.qmp.events
        while True:
            while self._seen < len(events):
                self._seen += 1
                if match(events[self._seen - 1]):
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no such event; got {events[-5:]}")
            try:
                self.qmp.recv(left)
            except TimeoutError:
                pass

    def wait(self, event: str, status: str | None = None, timeout: float = 30.0) -> None:
        """Wait for an event (``status``: a JOB_STATUS_CHANGE status) not yet waited for."""
        self._next(lambda ev: ev["event"] == event and (
            status is None or ev.get("data", {}).get("status") == status), timeout)

    def job(self, job_id: str, status: str = "concluded", timeout: float = 60.0) -> None:
        """Wait until job ``job_id`` reaches ``status``."""
        self._next(lambda ev: ev["event"] == "JOB_STATUS_CHANGE"
                   and ev["data"] == {"status": status, "id": job_id}, timeout)

    def drain(self, timeout: float = 60.0) -> None:
        """Read until the daemon closes the connection (after ``quit``)."""
        try:
            while True:
                self.qmp.recv(timeout)
        except (EOFError, ConnectionError):
            pass
        if self.proc is not None:
            self.proc.wait(timeout)

    def transcript(self) -> list[Any]:
        """Replies and events in arrival order, without timestamps, ``$DIR`` for the directory."""
        out: list[Any] = []
        for entry in self.qmp.log:
            if entry[0] == "event":
                msg = entry[1]
                out.append(("event", msg["event"], msg.get("data")))
            else:
                out.append(("reply", entry[1], entry[2]))
        return _subst(out, str(self.work), "$DIR")  # type: ignore[no-any-return]

    def lines(self) -> list[bytes]:
        """Every line received after the greeting as sent (member order and all),
        without timestamps, ``$DIR`` for the directory."""
        work = str(self.work).encode()
        return [_TIMESTAMP.sub(b"", line[3:]).replace(work, b"$DIR")
                for line in self.qmp.transcript[1:] if line.startswith(b"<- ")]


class QsdMonitor:
    """A QMP monitor on one end of a socket pair (``fd=N``), for QSD or QEMU.

    QEMU 7.2 races on a listening monitor: a client that connects while the
    accept watch moves to the monitor's I/O thread can leave that thread blocked
    in accept(), so qmp_capabilities is never answered and SIGTERM hangs.  A
    chardev connected from the start never accepts."""

    def __init__(self, chardev: str = "mon") -> None:
        #: Our end, for :meth:`client`.
        self.sock, self._theirs = socket.socketpair()
        spec = f"socket,id={chardev},fd={self._theirs.fileno()}"
        #: The monitor's options for qemu-storage-daemon, and for qemu-system.
        self.args = ["--chardev", spec, "--monitor", f"chardev={chardev}"]
        self.qemu_args = ["-chardev", spec, "-mon", f"chardev={chardev},mode=control"]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen`` that passes the daemon its end, then closes ours of it."""
        try:
            return subprocess.Popen(argv, pass_fds=(self._theirs.fileno(),), **kwargs)
        finally:
            self._theirs.close()

    def client(self, proc: subprocess.Popen[Any], timeout: float = 30.0, *,
               log: Path | None = None, **kwargs: Any) -> QmpClient:
        """A :class:`QmpClient` on our end.  If ``proc`` exits instead of greeting,
        an AssertionError with what it said (on its stderr pipe, or in ``log``)."""
        try:
            return QmpClient(self.sock, timeout, **kwargs)
        except BaseException as exc:
            self.sock.close()
            if not isinstance(exc, (EOFError, ConnectionError)):
                raise
            try:
                status = proc.wait(10)
            except subprocess.TimeoutExpired:
                raise exc from None
            said: str | bytes = ""
            if proc.stderr is not None:
                said = proc.stderr.read()
            elif log is not None:
                said = log.read_text(errors="replace")
            if isinstance(said, bytes):
                said = said.decode(errors="replace")
            argv = proc.args
            name = os.fsdecode(argv if isinstance(argv, (str, bytes, os.PathLike)) else argv[0])
            raise AssertionError(f"{name} exited with status {status}: {said}") from None


@contextmanager
def qsd_peer(work: Path, *args: str) -> Iterator[Peer]:
    """qemu-storage-daemon with a QMP monitor (:class:`QsdMonitor`) and ``args``."""
    require_tool(QSD)
    args = tuple(_subst(list(args), "$DIR", str(work)))
    monitor = QsdMonitor("c")
    # A file, not a pipe: what QSD reports (error_report) never blocks it.
    with open(work / "qsd.stderr", "wb") as stderr:
        proc = monitor.popen([QSD, *monitor.args, *args],
                             stdout=subprocess.DEVNULL, stderr=stderr, cwd=work)
    try:
        client = monitor.client(proc, 30, log=work / "qsd.stderr", check_schema=False,
                                negotiate=True, trace=True)
        try:
            yield Peer("qsd", client, work, proc)
        finally:
            client.close()
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


@contextmanager
def qmpd_peer(work: Path, *args: str) -> Iterator[Peer]:
    """qmpd with its default QMP socket in ``work`` and ``args``."""
    daemon = QmpdProcess(work, *_subst(list(args), "$DIR", str(work)))
    try:
        client = QmpClient(daemon.sock, 30, negotiate=True, trace=True)
        try:
            yield Peer("qmpd", client, work, daemon.proc)
        finally:
            client.close()
    finally:
        daemon.stop()


@contextmanager
def peer(impl: str, work: Path, *args: str) -> Iterator[Peer]:
    with (qsd_peer if impl == "qsd" else qmpd_peer)(work, *args) as p:
        yield p


def transcripts(tmp_path: Path, conversation: Conversation, *args: str,
                prepare: Callable[[Path], None] | None = None) -> dict[str, list[Any]]:
    """Each daemon's transcript of ``conversation`` (started with ``args``); under
    ``lines-qsd`` and ``lines-qmpd``, the lines as received."""
    out = {}
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        if prepare is not None:
            prepare(work)
        with peer(impl, work, *args) as p:
            conversation(p)
            out[impl] = p.transcript()
            out[f"lines-{impl}"] = p.lines()  # type: ignore[assignment]
    return out


def assert_same(got: dict[str, list[Any]], raw: bool = True) -> list[Any]:
    """The two transcripts are equal; on a difference, show the first one.

    With ``raw``, the lines are compared too, byte for byte (member order
    counts), but for the ``active`` member of qmpd's node queries."""
    qsd, ours = got["qsd"], got["qmpd"]
    for i, (a, b) in enumerate(zip(qsd, ours, strict=False)):
        assert b == a, (f"entry {i} differs:\nqsd:  {json.dumps(a)}\nqmpd: {json.dumps(b)}\n"
                        f"before: {json.dumps(qsd[max(0, i - 3):i])}")
    assert len(ours) == len(qsd), f"qsd: {json.dumps(qsd[len(ours):])}\nqmpd: {json.dumps(ours[len(qsd):])}"
    if raw and "lines-qsd" in got:
        for a, b in zip(got["lines-qsd"], got["lines-qmpd"], strict=True):
            b = _ACTIVE.sub(b"", b)
            assert b == a, f"qsd:  {a!r}\nqmpd: {b!r}"
    return qsd


def run_both(tmp_path: Path, make_args: Callable[[Path], list[str]],
             script: Callable[[Peer], T]) -> dict[str, T]:
    """``script``'s result with QSD, then with qmpd, each started with
    ``make_args(its own directory)``."""
    require_tool(QSD)
    out: dict[str, T] = {}
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        with peer(impl, work, *make_args(work)) as p:
            out[impl] = script(p)
    return out


def side_by_side_run(tmp_path: Path, make_nodes: Callable[[Path], list[str]],
                     scenario: Callable[[QmpClient, Path], T]) -> dict[str, T]:
    """``scenario(client, its dir)``'s result with QSD and with qmpd, each started
    with ``make_nodes(its dir)`` in a directory of its own under ``tmp_path``."""
    return run_both(tmp_path, make_nodes, lambda p: scenario(p.qmp, p.work))


def side_by_side(tmp_path: Path, make_nodes: Callable[[Path], list[str]],
                 steps: list[tuple[str, dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The replies of QSD and of qmpd, each started with ``make_nodes(its dir)``,
    to the same commands."""
    replies = {}
    for impl in IMPLS:
        work = tmp_path / impl
        work.mkdir()
        with peer(impl, work, *make_nodes(work)) as p:
            replies[impl] = [p.qmp.cmd(e, a) for e, a in steps]
    return replies
