"""Helpers for the migration tests: real qmpd and QEMU processes, locks, proxies.

A :class:`Peer` is one process speaking QMP, either a qmpd (``python -m
qmpd``) or a ``qemu-system-x86_64 -M none -nodefaults``, driven through the
same blocking client (:class:`Qmp`), which keeps every event and reply in
arrival order so that the tests can compare sequences between the two.

Lock checks look at the image's open file descriptions in ``/proc/PID/fd``
and their ``lock:`` lines in ``/proc/PID/fdinfo`` (QEMU's image locks are
OFD locks, listed there per open file description), and at what
``qemu-img info`` (without ``-U``) says.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.support.qmp import QmpClient, wait_greeting
from tests.support.qsd import QsdMonitor
from tests.support.tools import QEMU_SYSTEM, REPO, qemu_img, require_tool

QEMU = QEMU_SYSTEM
QEMU_ARGS = ["-M", "none", "-nodefaults", "-display", "none"]
MIG_EVENTS = frozenset({"MIGRATION", "MIGRATION_PASS", "STOP", "RESUME"})
FINISHED = ("completed", "failed", "cancelled")
#: QEMU's lock bytes: 100 + permission bit while holding it (0 consistent
#: read, 1 write, 2 write unchanged, 3 resize), 200 + bit while not sharing it.
WRITE_LOCK = 101
SLOW = os.environ.get("QMPD_SLOW") == "1"


def create_qcow2(path: Path, size: str = "1G", *extra: str) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *extra, str(path), size)
    return path


def image_check(path: Path) -> str:
    """``qemu-img check``; asserts it is clean and returns its report."""
    res = qemu_img("check", str(path), check=False)
    assert res.returncode == 0, f"qemu-img check {path}: rc {res.returncode}\n{res.stdout}{res.stderr}"
    assert "No errors were found" in res.stdout, res.stdout
    return res.stdout


def info_is_locked(path: Path) -> bool:
    """True while some process holds the image's write lock (qemu-img info fails)."""
    res = qemu_img("info", str(path), check=False)
    if res.returncode == 0:
        return False
    assert 'Failed to get shared "write" lock' in res.stderr, res.stderr
    return True


# ---------------------------------------------------------------------------
# QMP client
# ---------------------------------------------------------------------------


class Qmp(QmpClient):
    """The shared QMP client, numbering its requests and keeping a transcript,
    with the migration tests' digest of what it saw (:meth:`names`)."""

    def __init__(self, path: str | socket.socket, timeout: float = 15.0,
                 check_schema: bool = False) -> None:
        super().__init__(path, timeout, wait=timeout, check_schema=check_schema, ids=True,
                         trace=True, negotiate=True)

    def names(self, keep: Iterable[str] = MIG_EVENTS, replies: bool = False) -> list[str]:
        """The event sequence as short strings: ``MIGRATION:setup``, ``MIGRATION_PASS:1``, ``STOP``."""
        out = []
        for item in self.log:
            if item[0] == "event":
                out.extend(_short(item[1], keep))
            elif replies and item[1] not in ("query-migrate", "query-status"):
                out.append(f"<{item[1]}>")
        return out


def _short(ev: dict[str, Any], keep: Iterable[str]) -> list[str]:
    name = ev["event"]
    if name not in keep:
        return []
    data = ev.get("data") or {}
    if name == "MIGRATION":
        return [f"MIGRATION:{data['status']}"]
    if name == "MIGRATION_PASS":
        return [f"MIGRATION_PASS:{data['pass']}"]
    return [name]


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------

#: A destination whose qcow2 invalidate_cache (with its one-job form,
#: begin_reload) and refresh_inactive do nothing
#: (caches filled while inactive are kept): the negative control of the
#: stale-cache test (a test-run process, not a product option).
NO_INVALIDATE = (
    "import sys\n"
    "import qmpd.block.qcow2.driver as d\n"
    "async def _skip(self):\n"
    "    pass\n"
    "d.Qcow2Driver.invalidate_cache = _skip\n"
    "d.Qcow2Driver.begin_reload = lambda self: None\n"
    "d.Qcow2Driver.refresh_inactive = _skip\n"
    "from qmpd.__main__ import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


#: A destination that does not invalidate nodes activated early when its
#: migration completes (QEMU 7.2's behaviour): the early-activation control.
NO_REINVALIDATE = (
    "import sys\n"
    "import qmpd.block.graph as g\n"
    "async def _skip(self, nodes):\n"
    "    pass\n"
    "g.BlockGraph.reload_active = _skip\n"
    "from qmpd.__main__ import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)


class Peer:
    """One qmpd or qemu-system-x86_64 -M none process with a QMP socket."""

    def __init__(self, kind: str, workdir: Path, name: str, *, incoming: str | None = None,
                 paused: bool = False, extra: Sequence[str] = (), code: str | None = None,
                 netns: str | None = None) -> None:
        assert kind in ("qmpd", "qemu")
        self.kind = kind
        self.name = name
        self.paused = paused
        self.incoming = incoming
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = str(self.dir / "qmp.sock")
        self.stdout_path = self.dir / "stdout"
        self.stderr_path = self.dir / "stderr"
        #: QEMU's QMP monitor (a qmpd's is at ``qmp_path``).
        self._monitor: QsdMonitor | None = None
        env = dict(os.environ)
        if kind == "qmpd":
            env["QMPD_CHECK_SCHEMA"] = "1"
            env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
            head = [sys.executable, "-c", code] if code else [sys.executable, "-m", "qmpd"]
            argv = [*head, "--log-level", "warning", "--qmp", f"unix:{self.qmp_path}"]
            if incoming:
                argv += ["--incoming", incoming]
            if paused:
                argv += ["-S"]
        else:
            self._monitor = QsdMonitor("qmp")
            argv = [require_tool(QEMU), *QEMU_ARGS, *self._monitor.qemu_args]
            if incoming:
                argv += ["-incoming", incoming]
            if paused:
                argv += ["-S"]
        argv += list(extra)
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        spawn = self._monitor.popen if self._monitor is not None else subprocess.Popen
        self.proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                          stderr=self._err, env=env, cwd=self.dir)
        self.pid = self.proc.pid
        self._qmp: Qmp | None = None

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name} pid {self.pid}>"

    def ready(self, timeout: float = 30.0) -> Peer:
        """Wait for the QMP socket (qmpd: its banner) and negotiate."""
        deadline = time.monotonic() + timeout
        if self.kind == "qmpd":
            while not wait_greeting(self.qmp_path):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self} did not start: {self.stderr()}")
                time.sleep(0.005)
            self._qmp = Qmp(self.qmp_path, check_schema=True)
        else:
            assert self._monitor is not None
            try:
                self._qmp = Qmp(self._monitor.sock)
            except (EOFError, ConnectionError):
                raise RuntimeError(f"{self} did not start: {self.stderr()}") from None
        if self.kind == "qemu" and not self.paused and not self.incoming:
            # QEMU's QMP accepts from its own thread, so under load a client
            # can connect before vm_start and see its start-up RESUME.
            while self.status() != "running":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self} did not start running")
                time.sleep(0.002)
            log = self._qmp.log
            log[:] = [item for item in log
                      if not (item[0] == "event" and item[1]["event"] == "RESUME")]
        return self

    @property
    def qmp(self) -> Qmp:
        assert self._qmp is not None, "call ready() first"
        return self._qmp

    # --- shortcuts ---------------------------------------------------------------

    def ok(self, execute: str, arguments: dict[str, Any] | None = None, **kw: Any) -> Any:
        return self.qmp.ok(execute, arguments, **kw)

    def err(self, execute: str, arguments: dict[str, Any] | None = None, **kw: Any) -> str:
        return self.qmp.err(execute, arguments, **kw)

    def status(self) -> str:
        return str(self.ok("query-status")["status"])

    def caps(self, **caps: bool) -> None:
        items = [{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()]
        self.ok("migrate-set-capabilities", {"capabilities": items})

    def params(self, **params: Any) -> None:
        self.ok("migrate-set-parameters", {k.replace("_", "-"): v for k, v in params.items()})

    def add_disk(self, image: Path, node: str = "disk") -> None:
        self.ok("blockdev-add", {"driver": "qcow2", "node-name": node,
                                 "file": {"driver": "file", "filename": str(image)}})

    def hmp(self, line: str) -> str:
        return str(self.ok("human-monitor-command", {"command-line": line}))

    def qemu_io(self, node: str, command: str) -> str:
        """HMP qemu-io: the reply text (errors the monitor reports, else empty)."""
        return self.hmp(f'qemu-io {node} "{command}"')

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def lock_bytes(self, image: Path) -> set[int]:
        return lock_bytes(self.pid, image)

    def holds_write(self, image: Path) -> bool:
        return WRITE_LOCK in self.lock_bytes(image)

    def migrate_info(self) -> dict[str, Any]:
        return dict(self.ok("query-migrate"))

    def wait_migration(self, timeout: float = 20.0, states: Sequence[str] = FINISHED
                       ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.migrate_info()
            if info.get("status") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self}: migration did not finish: {info}")
            self.qmp.pump(0.005)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def quit(self) -> int:
        if self.alive():
            try:
                self.qmp.cmd("quit")
            except (OSError, EOFError, ValueError, AssertionError):
                pass
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def close(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._qmp is not None:
            self._qmp.close()
        self._out.close()
        self._err.close()


def start(*peers: Peer) -> None:
    """Wait for peers launched together (their start-ups overlap)."""
    for peer in peers:
        peer.ready()


class Cluster:
    """The processes of one test, stopped and checked at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.peers: list[Peer] = []

    def spawn(self, kind: str, name: str, **kw: Any) -> Peer:
        peer = Peer(kind, self.dir, name, **kw)
        self.peers.append(peer)
        return peer

    def __call__(self, kind: str, name: str, **kw: Any) -> Peer:
        return self.spawn(kind, name, **kw).ready()

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        problems = []
        for peer in self.peers:
            if peer.kind == "qmpd":
                log = peer.stderr_path.read_text(errors="replace")
                if "Traceback" in log or "outside its schema" in log:
                    problems.append(f"{peer}: {log}")
                if peer._qmp is not None and peer._qmp.stray:
                    problems.append(f"{peer}: replies to no command: {peer._qmp.stray}")
        assert not problems, "\n".join(problems)


@contextmanager
def short_dir() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="qmig", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def need_qemu() -> None:
    require_tool(QEMU)


# ---------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------


def lock_bytes(pid: int, image: Path) -> set[int]:
    """Lock bytes held by ``pid`` on ``image`` (OFD locks, from /proc/PID/fdinfo)."""
    target = os.path.realpath(image)
    held: set[int] = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return held
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if not line.startswith("lock:"):
                continue
            fields = line.split()
            start, end = fields[-2], fields[-1]
            last = int(start) if end == "EOF" else int(end)
            held.update(range(int(start), last + 1))
    return held


def locks_in_proc_locks(image: Path) -> set[int]:
    """Every lock byte on the image's inode, whoever holds it (/proc/locks)."""
    ino = os.stat(image).st_ino
    held: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            try:
                dev_ino = next(x for x in fields if x.count(":") == 2)
            except StopIteration:
                continue
            if int(dev_ino.rsplit(":", 1)[1]) != ino:
                continue
            start, end = fields[-2], fields[-1]
            last = int(start) if end == "EOF" else int(end)
            held.update(range(int(start), last + 1))
    return held


def writers(image: Path, peers: Iterable[Peer]) -> list[str]:
    """Names of the peers holding the image's write lock."""
    return [p.name for p in peers if p.alive() and p.holds_write(image)]


def assert_one_writer(image: Path, peers: Iterable[Peer], holder: Peer | None) -> None:
    """Exactly ``holder`` holds the write lock (nobody if None), and qemu-img agrees."""
    peers = list(peers)
    expected = [holder.name] if holder is not None else []
    assert writers(image, peers) == expected, (writers(image, peers), expected)
    assert info_is_locked(image) == (holder is not None)
    if holder is None:
        assert WRITE_LOCK not in locks_in_proc_locks(image)


# ---------------------------------------------------------------------------
# A unix-socket proxy that can cut or stall a stream
# ---------------------------------------------------------------------------


class Proxy:
    """Forward one connection from ``listen`` to ``target``.

    Source to destination bytes pass until ``limit`` have gone through; then
    the proxy either cuts both connections (``mode="cut"``) or stops
    forwarding and holds them open (``mode="stall"``) until :meth:`release`
    (forward the rest) or :meth:`cut`.  The other direction (the return
    path) always passes.
    """

    def __init__(self, listen: str, target: str, limit: int | None = None,
                 mode: str = "cut") -> None:
        self.listen_path = listen
        self.target = target
        self.limit = limit
        self.mode = mode
        self.forwarded = 0
        self.received = bytearray()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(listen)
        self.server.listen(1)
        self.limit_reached = threading.Event()
        self.done = threading.Event()
        self._go = threading.Event()
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            client, _ = self.server.accept()
        except OSError:
            self.done.set()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.connect(self.target)
        self._conns = [client, upstream]
        back = threading.Thread(target=self._backward, args=(upstream, client), daemon=True)
        back.start()
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    upstream.shutdown(socket.SHUT_WR)
                    break
                self.received += data
                if self.limit is not None and self.forwarded + len(data) >= self.limit:
                    part = data[: self.limit - self.forwarded]
                    if part:
                        upstream.sendall(part)
                        self.forwarded += len(part)
                    self.limit_reached.set()
                    if self.mode == "cut":
                        self._close()
                        break
                    # Stall: hold everything until released or cut.
                    self._go.wait()
                    if self.mode == "cut":
                        break
                    upstream.sendall(data[len(part):])
                    self.forwarded += len(data) - len(part)
                    self.limit = None
                    continue
                upstream.sendall(data)
                self.forwarded += len(data)
        except OSError:
            pass
        finally:
            self.done.set()

    def _backward(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    client.shutdown(socket.SHUT_WR)
                    return
                client.sendall(data)
        except OSError:
            pass

    def _close(self) -> None:
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def release(self) -> None:
        self.mode = "release"
        self._go.set()

    def cut(self) -> None:
        self.mode = "cut"
        self._close()
        self._go.set()

    def close(self) -> None:
        self._close()
        self._go.set()
        self.server.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(0.005)


class LockWatcher:
    """Samples who holds an image's write lock, all the time, in a thread.

    Each round reads A, then B, then A again: both are counted as holding
    the lock at once only if A held it in both of its reads and B in
    between (a handover from A to B between two reads is not an overlap).
    """

    def __init__(self, image: Path, a: Peer, b: Peer) -> None:
        self.image = image
        self.a, self.b = a, b
        self.overlaps = 0
        self.samples = 0
        self.seen: set[tuple[bool, bool]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        a1 = WRITE_LOCK in lock_bytes(self.a.pid, self.image)
        b = WRITE_LOCK in lock_bytes(self.b.pid, self.image)
        a2 = WRITE_LOCK in lock_bytes(self.a.pid, self.image)
        self.samples += 1
        if a1 == a2:
            self.seen.add((a1, b))
        if a1 and a2 and b:
            self.overlaps += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()

    def __enter__(self) -> LockWatcher:
        self._sample()  # the state the block starts in, before anything can move
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the state the block ended in, however busy the machine was
        assert self.samples > 0
        assert self.overlaps == 0, f"both sides held the write lock in {self.overlaps} samples"


def write_pattern_raw(path: Path, size: int, writes: Sequence[tuple[int, int, int]]) -> None:
    """A raw reference image: ``writes`` are (offset, length, pattern byte)."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length, pattern in writes:
            f.seek(offset)
            f.write(bytes([pattern]) * length)


def images_equal(image: Path, reference: Path) -> None:
    res = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(image), str(reference), check=False)
    assert res.returncode == 0, f"qemu-img compare: {res.stdout}{res.stderr}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_peer(mig: Cluster, name: str, **kw: Any) -> tuple[Peer, int]:
    """A qmpd peer serving HTTP on 127.0.0.1, and its port."""
    port = free_port()
    return mig.spawn("qmpd", name, extra=["--http", f"127.0.0.1:{port}"], **kw), port
