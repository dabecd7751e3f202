#!/usr/bin/env python3
"""Differential QMP conformance harness for qmpd (standard library only).

A *case* (``cases/<name>.json``) is a scripted conversation with one server.
The harness starts either real QEMU (``qemu-system-x86_64 -M none``) or qmpd
for it, each case in a fresh temporary directory, plays the steps over real
UNIX sockets and records a *transcript*: a list of JSON records, one per event
seen on the wire (message received, EOF, timeout, exit status ...).
Transcripts are normalized (timestamps, version block, temp dir, huge values)
so that two runs of two servers can be compared record by record.

Command line::

    harness.py capture [--slow] [CASE ...]      # QEMU -> golden/<case>.jsonl
    harness.py check [CASE ...]                 # QEMU again, diff against golden/
    harness.py compare [--golden] [CASE ...]    # qmpd against QEMU (or golden/)
    harness.py run CASE --impl qemu|qmpd [-o F] # one transcript
    harness.py diff A.jsonl B.jsonl             # diff two transcripts
    harness.py show FILE.jsonl                  # human-readable transcript

See README.md in this directory for the case format.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import difflib
import errno
import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
GOLDEN_DIR = HERE / "golden"
README = HERE / "README.md"
PROJECT_ROOT = HERE.parent.parent

QEMU_NAME = "qemu-system-x86_64"
DEFAULT_TIMEOUT = 10.0
CONNECT_TIMEOUT = 15.0
END_QUIET = 0.1
BARRIER_FMT = '{"execute": "query-version", "id": "barrier-%s"}\n'

# Values bigger than these are replaced by a length + sha256 token, so that
# huge or deep echoes stay exactly comparable while the golden files stay small.
MAX_STR = 1024
MAX_RAW = 4096
MAX_LIST = 100
MAX_DEPTH = 32

# query-commands / query-qmp-schema: qmpd implements fewer commands than QEMU,
# so these replies are compared by shape plus the presence of these names.
REQUIRED_COMMANDS = sorted(
    ["qmp_capabilities", "query-status", "stop", "cont", "quit", "query-version"]
)

WS = b" \t\r\n"

sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))


# --------------------------------------------------------------------------
# small helpers


def canon(value: Any) -> str:
    """Canonical JSON text: member order ignored, JSON types kept (1 != 1.0)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=True, allow_nan=True)


def sha(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:16]


def load_case(path_or_name: str | Path) -> dict[str, Any]:
    p = Path(path_or_name)
    if not p.suffix:
        p = CASES_DIR / f"{p}.json"
    case: dict[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    case["name"] = p.stem
    return case


def all_case_names() -> list[str]:
    return sorted(p.stem for p in CASES_DIR.glob("*.json"))


def qemu_binary() -> str | None:
    """The QEMU binary, or None.  QMPD_CONFORMANCE_QEMU overrides (empty: no QEMU)."""
    override = os.environ.get("QMPD_CONFORMANCE_QEMU")
    if override is not None:
        return shutil.which(override) if override else None
    return shutil.which(QEMU_NAME)


def step_label(case: dict[str, Any], index: int | str) -> str:
    steps = case.get("steps", [])
    if isinstance(index, int) and 0 <= index < len(steps):
        return str(steps[index].get("label", steps[index].get("op")))
    return "end of case"


def _payload(spec: Any) -> bytes:
    """Bytes of one payload part: {"data"}, {"hex"}, {"json"}, {"repeat","count"}, {"parts"}."""
    if isinstance(spec, str):
        return spec.encode("utf-8")
    if "data" in spec:
        return str(spec["data"]).encode("utf-8")
    if "hex" in spec:
        return bytes.fromhex(spec["hex"].replace(" ", ""))
    if "json" in spec:
        return (json.dumps(spec["json"], ensure_ascii=False) + "\n").encode("utf-8")
    if "repeat" in spec:
        return _payload(spec["repeat"]) * int(spec["count"])
    if "parts" in spec:
        return b"".join(_payload(p) for p in spec["parts"])
    raise ValueError(f"bad payload part: {spec!r}")


def describe_bytes(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_RAW:
        return {"len": len(data), "sha256": sha(data),
                "head": data[:64].decode("utf-8", "backslashreplace"),
                "tail": data[-64:].decode("utf-8", "backslashreplace")}
    try:
        return {"data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"hex": data.hex()}


# --------------------------------------------------------------------------
# connections


class Conn:
    """A client socket plus a byte-level splitter for server messages.

    Every server message is a JSON object followed by a line end.  The raw
    text of a message runs from the end of the previous message up to and
    including the newline after the closing brace, so framing differences
    (missing or extra line ends, leading junk) show up in the raw text.
    """

    def __init__(self, name: str, sock: socket.socket, runner: Runner) -> None:
        self.name = name
        self.sock = sock
        self.runner = runner
        self.buf = bytearray()
        self.eof = False
        self.closed = False
        self._reset_scan()
        # messages of the current step (for wait conditions)
        self.step_msgs: list[dict[str, Any]] = []

    def _reset_scan(self) -> None:
        self.pos = 0
        self.started = False
        self.depth = 0
        self.in_str = False
        self.esc = False
        self.closed_at: int | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def feed(self, data: bytes) -> None:
        self.buf += data
        self._scan()

    def _scan(self) -> None:
        buf = self.buf
        i = self.pos
        while i < len(buf):
            c = buf[i]
            if self.closed_at is not None:
                if c == 0x0A:
                    self._emit(i + 1)
                    i = 0
                    continue
                if c in WS:
                    i += 1
                    continue
                self._emit(i)
                i = 0
                continue
            if not self.started:
                if c in WS:
                    i += 1
                    continue
                if c in b"{[":
                    self.started = True
                    self.depth = 1
                    i += 1
                    continue
                nl = buf.find(b"\n", i)
                if nl < 0:
                    break
                self._emit(nl + 1)
                i = 0
                continue
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == 0x5C:
                    self.esc = True
                elif c == 0x22:
                    self.in_str = False
            elif c == 0x22:
                self.in_str = True
            elif c in b"{[":
                self.depth += 1
            elif c in b"}]":
                self.depth -= 1
                if self.depth == 0:
                    self.closed_at = i
            i += 1
        self.pos = i

    def flush(self) -> None:
        """Emit whatever is buffered (at EOF or timeout)."""
        if self.closed_at is not None:
            self._emit(self.closed_at + 1)
        if self.buf.strip(WS):
            self._emit(len(self.buf))
        else:
            self.buf.clear()
            self._reset_scan()

    def _emit(self, end: int) -> None:
        raw = bytes(self.buf[:end])
        del self.buf[:end]
        self._reset_scan()
        text = raw.decode("utf-8", "surrogateescape")
        try:
            msg = json.loads(text)
        except ValueError:
            self.runner.record("recv-raw", conn=self.name, raw=text)
            return
        if not isinstance(msg, dict):
            self.runner.record("recv-raw", conn=self.name, raw=text)
            return
        self.step_msgs.append(msg)
        self.runner.record("recv", conn=self.name, msg=msg, raw=text)


class _Sink:
    """Stands in for a Runner where a Conn's messages are not recorded."""

    def __init__(self) -> None:
        self.msgs: list[dict[str, Any]] = []

    def record(self, kind: str, **fields: Any) -> None:
        if kind == "recv":
            self.msgs.append(fields["msg"])


# --------------------------------------------------------------------------
# servers


class ServerSpec:
    """Builds the command line of one implementation for one case."""

    def __init__(self, case: dict[str, Any], impl: str, tmp: str) -> None:
        self.case = case
        self.impl = impl
        self.tmp = tmp
        srv = case.get("server", {})
        self.paused = bool(srv.get("paused", False))
        self.incoming = srv.get("incoming")
        monitors = srv.get("monitors") or [{"name": "qmp"}]
        self.monitors = [dict(m) for m in monitors]
        for m in self.monitors:
            m.setdefault("via", "qmp" if m["name"] == "qmp" else "chardev")
            m["path"] = os.path.join(tmp, f"{m['name']}.sock")

    def socket_path(self, monitor: str | None) -> str:
        if monitor is None:
            return str(self.monitors[0]["path"])
        for m in self.monitors:
            if m["name"] == monitor:
                return str(m["path"])
        raise KeyError(f"unknown monitor {monitor!r}")

    def argv(self) -> list[str]:
        if self.impl == "qemu":
            binary = qemu_binary()
            if not binary:
                raise RuntimeError(f"{QEMU_NAME} not found")
            argv = [binary, "-M", "none", "-nodefaults", "-display", "none"]
            for m in self.monitors:
                if m["via"] == "qmp":
                    if m.get("pretty"):
                        argv += ["-qmp-pretty", f"unix:{m['path']},server=on,wait=off"]
                    else:
                        argv += ["-qmp", f"unix:{m['path']},server=on,wait=off"]
                else:
                    argv += ["-chardev", f"socket,id={m['name']},path={m['path']},"
                             "server=on,wait=off"]
                    mon = f"chardev={m['name']},mode=control"
                    if m.get("pretty"):
                        mon += ",pretty=on"
                    argv += ["-mon", mon]
            if self.paused:
                argv.append("-S")
            if self.incoming:
                argv += ["-incoming", self.incoming]
            return argv
        if self.impl == "qmpd":
            argv = [os.environ.get("QMPD_CONFORMANCE_PYTHON", sys.executable), "-m", "qmpd"]
            for m in self.monitors:
                if m["via"] == "qmp" and not m.get("pretty"):
                    argv += ["--qmp", f"unix:{m['path']}"]
                else:
                    argv += ["--chardev", f"socket,id={m['name']},path={m['path']},"
                             "server=on,wait=off"]
                    mon = f"chardev={m['name']}"
                    if m.get("pretty"):
                        mon += ",pretty=on"
                    argv += ["--monitor", mon]
            if self.paused:
                argv.append("--paused")
            if self.incoming:
                argv += ["--incoming", self.incoming]
            return argv
        raise ValueError(f"unknown implementation {self.impl!r}")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.impl == "qmpd":
            old = env.get("PYTHONPATH")
            env["PYTHONPATH"] = str(PROJECT_ROOT) + (os.pathsep + old if old else "")
        return env


# --------------------------------------------------------------------------
# the runner


class Runner:
    """Runs one case against one implementation and returns its transcript."""

    def __init__(self, case: dict[str, Any], impl: str) -> None:
        self.case = case
        self.impl = impl
        self.records: list[dict[str, Any]] = []
        self.conns: dict[str, Conn] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.step: int | str = -1
        self.label = ""
        self.tmp = ""
        self.timeout = float(case.get("timeout", DEFAULT_TIMEOUT))
        self.exit_recorded = False

    # -- recording

    def record(self, kind: str, **fields: Any) -> None:
        rec: dict[str, Any] = {"step": self.step, "kind": kind}
        if self.label:
            rec["label"] = self.label
        rec.update(fields)
        self.records.append(rec)

    # -- socket I/O

    def _open(self) -> list[Conn]:
        return [c for c in self.conns.values() if not c.eof and not c.closed]

    def _read_ready(self, timeout: float) -> bool:
        """Wait up to timeout for data on any open connection; read it. True if any."""
        conns = self._open()
        if not conns:
            if timeout > 0:
                time.sleep(min(timeout, 0.05))
            return False
        r, _, _ = select.select(conns, [], [], max(timeout, 0))
        for c in r:
            self._recv(c)
        return bool(r)

    def _recv(self, c: Conn) -> None:
        try:
            data = c.sock.recv(1 << 18)
        except BlockingIOError:
            return
        except ConnectionResetError:
            c.flush()
            c.eof = True
            self.record("eof", conn=c.name, reset=True)
            return
        if not data:
            c.flush()
            c.eof = True
            self.record("eof", conn=c.name)
            return
        c.feed(data)

    def _send(self, c: Conn, data: bytes) -> bool:
        """Write all of data while still reading every connection (no deadlock)."""
        view = memoryview(data)
        deadline = time.monotonic() + max(self.timeout, 60.0 + len(data) / 100000)
        while view:
            if c.closed:
                return False
            rl = self._open()
            try:
                r, w, _ = select.select(rl, [c.sock], [], 1.0)
            except ValueError:
                return False
            for rc in r:
                self._recv(rc)
            if w:
                try:
                    n = c.sock.send(view[: 1 << 18])
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                    self.record("send-failed", conn=c.name,
                                error=errno.errorcode.get(getattr(exc, "errno", 0) or 0, "?"))
                    return False
                view = view[n:]
            if time.monotonic() > deadline:
                self.record("send-failed", conn=c.name, error="timeout")
                return False
        return True

    def _drain(self) -> None:
        while self._read_ready(0):
            pass

    # -- waiting

    def _satisfied(self, conn: Conn, cond: dict[str, Any]) -> bool:
        msgs = conn.step_msgs
        if cond.get("greeting") and not any("QMP" in m for m in msgs):
            return False
        if "responses" in cond:
            n = sum(1 for m in msgs if "return" in m or "error" in m)
            if n < int(cond["responses"]):
                return False
        if "id" in cond:
            want = canon(cond["id"])
            if not any(("return" in m or "error" in m) and "id" in m and canon(m["id"]) == want
                       for m in msgs):
                return False
        if "events" in cond:
            seen = Counter(m.get("event") for m in msgs if "event" in m)
            need = Counter(cond["events"])
            if any(seen[k] < v for k, v in need.items()):
                return False
        if cond.get("eof") and not conn.eof:
            return False
        return True

    def wait(self, conn_name: str | None, cond: dict[str, Any]) -> None:
        timeout = float(cond.get("timeout", self.timeout))
        deadline = time.monotonic() + timeout
        targets: list[tuple[Conn, dict[str, Any]]] = []
        positive = {k: v for k, v in cond.items()
                    if k in ("greeting", "responses", "id", "events", "eof")}
        if conn_name is not None and positive:
            targets.append((self.conns[conn_name], positive))
        for other, ocond in (cond.get("also") or {}).items():
            targets.append((self.conns[other], ocond))
        pending = list(targets)
        while pending:
            pending = [(c, k) for c, k in pending if not self._satisfied(c, k)]
            if not pending:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                for c, _ in pending:
                    c.flush()
                    self.record("timeout", conn=c.name)
                break
            if not self._read_ready(min(left, 0.5)) and all(c.eof or c.closed for c, _ in pending):
                # nothing more can arrive on these connections
                for c, _ in pending:
                    self.record("timeout", conn=c.name)
                break
        if "settle" in cond:
            end = time.monotonic() + float(cond["settle"])
            while (left := end - time.monotonic()) > 0:
                self._read_ready(min(left, 0.5))
        if "quiet" in cond:
            q = float(cond["quiet"])
            hard = time.monotonic() + max(timeout, q * 4)
            while self._read_ready(q) and time.monotonic() < hard:
                pass
        self._drain()

    # -- steps

    def _start(self, spec: ServerSpec) -> None:
        argv = spec.argv()
        self.argv = argv
        self.stderr_path = os.path.join(self.tmp, f"{self.impl}.stderr")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=self.tmp, env=spec.env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def _stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _probe(self, spec: ServerSpec) -> str | None:
        """Wait until the server answers a request on its first monitor; None when it does.

        QEMU listens before it finishes starting: a client that connects during start-up
        may see the RESUME of the initial vm_start after its greeting although it never
        negotiated.  Any reply comes from the main loop, so once one arrives start-up is
        over.  The probe connection is closed again before step 0.
        """
        res = self._connect(spec.socket_path(None))
        if isinstance(res, str):
            return res
        res.setblocking(True)
        res.settimeout(CONNECT_TIMEOUT)
        sink = _Sink()
        reader = Conn("probe", res, sink)  # type: ignore[arg-type]
        try:
            res.sendall(b'{"execute": "query-status", "id": "harness-probe"}\n')
            # Read the whole reply: QEMU hands output still pending at a disconnect
            # to the next client of the monitor.
            while not any(m.get("id") == "harness-probe" for m in sink.msgs):
                data = res.recv(65536)
                if not data:
                    return "server closed the probe connection"
                reader.feed(data)
        except OSError as exc:
            return f"probe failed: {exc}"
        finally:
            res.close()
        return None

    def _connect(self, path: str) -> socket.socket | str:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                s.setblocking(False)
                return s
            except OSError as exc:
                s.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                    return errno.errorcode.get(exc.errno or 0, str(exc))
                if self.proc is not None and self.proc.poll() is not None:
                    return "server exited: " + self._stderr_tail()
                if time.monotonic() > deadline:
                    return errno.errorcode.get(exc.errno or 0, str(exc))
                time.sleep(0.01)

    def _do_step(self, spec: ServerSpec, st: dict[str, Any]) -> None:
        op = st["op"]
        conn = st.get("conn", "a")
        if op == "connect":
            res = self._connect(spec.socket_path(st.get("monitor")))
            if isinstance(res, str):
                self.record("connect-failed", conn=conn, error=res)
                return
            old = self.conns.get(conn)
            if old is not None and not old.closed:
                raise RuntimeError(f"connection {conn} is already open")
            self.conns[conn] = Conn(conn, res, self)
            self.record("connect", conn=conn)
            self.wait(conn, st.get("wait", {"greeting": True}))
        elif op in ("cmd", "send"):
            c = self.conns[conn]
            if op == "cmd":
                msg: dict[str, Any] = {}
                if "execute" in st:
                    msg["execute"] = st["execute"]
                if "exec-oob" in st:
                    msg["exec-oob"] = st["exec-oob"]
                if "arguments" in st:
                    msg["arguments"] = st["arguments"]
                if "id" in st:
                    msg["id"] = st["id"]
                msg.update(st.get("extra", {}))
                chunks = [(json.dumps(msg, ensure_ascii=False) + "\n").encode("utf-8")]
                default_wait: dict[str, Any] = {"responses": 1}
            else:
                if "chunks" in st:
                    chunks = [_payload(p) for p in st["chunks"]]
                elif st.get("bytewise"):
                    whole = _payload(st)
                    chunks = [whole[i:i + 1] for i in range(len(whole))]
                else:
                    chunks = [_payload(st)]
                default_wait = {}
            wait_keys = set(st.get("wait", {})) - {"timeout", "also", "settle"}
            barrier = st.get("barrier", op == "send" and not wait_keys)
            delay = float(st.get("delay", 0.02))
            sent = bytearray()
            ok = True
            for i, chunk in enumerate(chunks):
                if i and delay:
                    end = time.monotonic() + delay
                    while (left := end - time.monotonic()) > 0:
                        self._read_ready(left)
                ok = self._send(c, chunk)
                sent += chunk
                if not ok:
                    break
            self.record("send", conn=conn, **describe_bytes(bytes(sent)),
                        **({"chunks": len(chunks)} if len(chunks) > 1 else {}))
            if ok and barrier:
                bid = f"barrier-{self.step}"
                self._send(c, (BARRIER_FMT % self.step).encode())
                self.record("send", conn=conn, barrier=True)
                wait = dict(st.get("wait", {}))
                wait["id"] = bid
                self.wait(conn, wait)
            else:
                self.wait(conn, st.get("wait", default_wait))
        elif op == "recv":
            self.wait(conn, st.get("wait", {"quiet": 0.2}))
        elif op == "close":
            c = self.conns[conn]
            self._drain()
            c.sock.close()
            c.closed = True
            self.record("close", conn=conn)
            self.wait(None, st.get("wait", {}))
        elif op == "sleep":
            self.wait(None, {"settle": float(st.get("seconds", 0.1))})
        elif op == "kill":
            sig = getattr(signal, st.get("signal", "SIGTERM"))
            assert self.proc is not None
            self.proc.send_signal(sig)
            self.record("kill", signal=signal.Signals(sig).name)
            # what the signal causes belongs to this step: wait for it here
            self.wait(conn, st.get("wait", {}))
        elif op == "wait_exit":
            assert self.proc is not None
            deadline = time.monotonic() + float(st.get("timeout", self.timeout))
            while self.proc.poll() is None and time.monotonic() < deadline:
                self._read_ready(0.02)
            rc = self.proc.poll()
            if rc is None:
                self.record("exit", status="timeout")
            elif rc < 0:
                self.record("exit", signal=signal.Signals(-rc).name)
                self.exit_recorded = True
            else:
                self.record("exit", status=rc)
                self.exit_recorded = True
            self._drain()
        elif op == "note":
            pass
        else:
            raise ValueError(f"unknown op {op!r}")

    def run(self) -> list[dict[str, Any]]:
        self.tmp = tempfile.mkdtemp(prefix="qmpconf-")
        spec = ServerSpec(self.case, self.impl, self.tmp)
        meta: dict[str, Any] = {"step": -1, "kind": "meta", "case": self.case["name"],
                                "impl": self.impl}
        self.records.append(meta)
        try:
            self._start(spec)
            meta["argv"] = [a.replace(self.tmp, "{tmp}") for a in self.argv]
            if self.impl == "qemu":
                meta["version"] = qemu_version_string()
            problem = self._probe(spec)
            if problem:
                self.record("harness-error", error=f"server did not start: {problem}")
                return normalize(self.records, self.tmp, self.case)
            for index, st in enumerate(self.case["steps"]):
                self.step = index
                self.label = st.get("label", "")
                for c in self.conns.values():
                    c.step_msgs = []
                try:
                    self._do_step(spec, st)
                except (KeyError, RuntimeError, ValueError, OSError) as exc:
                    self.record("harness-error", error=f"{type(exc).__name__}: {exc}")
            self.step = "end"
            self.label = ""
            for c in self.conns.values():
                c.step_msgs = []
            self.wait(None, {"quiet": END_QUIET})
            for c in self._open():
                c.flush()
        finally:
            self._teardown()
        return normalize(self.records, self.tmp, self.case)

    def _teardown(self) -> None:
        for c in self.conns.values():
            if not c.closed:
                try:
                    c.sock.close()
                except OSError:
                    pass
                c.closed = True
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


_QEMU_VERSION: str | None = None


def qemu_version_string() -> str:
    global _QEMU_VERSION
    if _QEMU_VERSION is None:
        binary = qemu_binary()
        try:
            out = subprocess.run([binary or QEMU_NAME, "--version"], capture_output=True,
                                 text=True, timeout=10).stdout
            _QEMU_VERSION = out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            _QEMU_VERSION = "?"
    return _QEMU_VERSION


def run_case(case: dict[str, Any] | str, impl: str) -> list[dict[str, Any]]:
    if not isinstance(case, dict):
        case = load_case(case)
    return Runner(case, impl).run()


# --------------------------------------------------------------------------
# normalization

_TS_RE = re.compile(r'("seconds":\s*)-?\d+(,\s*"microseconds":\s*)-?\d+')
_VERSION_RE = re.compile(
    r'("qemu":\s*\{\s*"micro":\s*)-?\d+(,\s*"minor":\s*)-?\d+(,\s*"major":\s*)-?\d+'
    r'(\s*\},\s*"package":\s*)"(?:[^"\\]|\\.)*"')


def _is_version_block(v: Any) -> bool:
    return (isinstance(v, dict) and set(v) == {"qemu", "package"}
            and isinstance(v["qemu"], dict)
            and set(v["qemu"]) == {"major", "minor", "micro"})


def _mask_version(v: dict[str, Any]) -> dict[str, Any]:
    return {"qemu": {k: "<VERSION>" for k in v["qemu"]}, "package": "<PACKAGE>"}


def _shrink(v: Any, tmp: str, top: bool = False) -> Any:
    """Replace the temp dir by {tmp}; huge/deep values by a stable token.

    The message object itself is kept, so only its oversized members
    become tokens.
    """
    if isinstance(v, str):
        if tmp and tmp in v:
            v = v.replace(tmp, "{tmp}")
        if len(v) > MAX_STR:
            return f"<STR len={len(v)} sha256={sha(v)}>"
        return v
    if not top:
        d = _depth(v)
        if d > MAX_DEPTH:
            return f"<DEEP {type(v).__name__} depth={d} sha256={sha(canon(v))}>"
    if isinstance(v, list):
        if len(v) > MAX_LIST:
            return f"<LIST len={len(v)} sha256={sha(canon(v))}>"
        return [_shrink(x, tmp) for x in v]
    if isinstance(v, dict):
        return {k: _shrink(x, tmp) for k, x in v.items()}
    return v


def _depth(v: Any) -> int:
    best = 0
    stack = [(v, 1)]
    while stack:
        x, d = stack.pop()
        if isinstance(x, dict):
            best = max(best, d)
            stack.extend((y, d + 1) for y in x.values())
        elif isinstance(x, list):
            best = max(best, d)
            stack.extend((y, d + 1) for y in x)
    return best


def _summarize(msg: dict[str, Any], how: str) -> dict[str, Any] | None:
    """Shape summary of a query-commands / query-qmp-schema reply."""
    ret = msg.get("return")
    if not isinstance(ret, list):
        return None
    if how == "commands":
        ok = all(isinstance(e, dict) and set(e) == {"name"} and isinstance(e["name"], str)
                 for e in ret)
        names = {e.get("name") for e in ret if isinstance(e, dict)}
    else:
        ok = all(isinstance(e, dict) and isinstance(e.get("name"), str)
                 and isinstance(e.get("meta-type"), str) for e in ret)
        names = {e.get("name") for e in ret
                 if isinstance(e, dict) and e.get("meta-type") == "command"}
    out = dict(msg)
    out["return"] = {"<summary>": how, "shape-ok": ok,
                     "contains": [n for n in REQUIRED_COMMANDS if n in names]}
    return out


def normalize(records: list[dict[str, Any]], tmp: str = "",
              case: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    steps = (case or {}).get("steps", [])
    for rec in records:
        rec = dict(rec)
        if rec["kind"] == "recv":
            msg = rec["msg"]
            raw = rec.get("raw")
            if isinstance(msg.get("event"), str) and isinstance(msg.get("timestamp"), dict):
                msg = dict(msg)
                msg["timestamp"] = {k: f"<{'SECONDS' if k == 'seconds' else 'USECONDS'}>"
                                    if k in ("seconds", "microseconds") else x
                                    for k, x in msg["timestamp"].items()}
                if raw is not None:
                    raw = _TS_RE.sub(r"\1<SECONDS>\2<USECONDS>", raw, count=1)
            if isinstance(msg.get("QMP"), dict) and _is_version_block(msg["QMP"].get("version")):
                msg = dict(msg)
                msg["QMP"] = dict(msg["QMP"])
                msg["QMP"]["version"] = _mask_version(msg["QMP"]["version"])
                if raw is not None:
                    raw = _VERSION_RE.sub(r'\1<VERSION>\2<VERSION>\3<VERSION>\4"<PACKAGE>"',
                                          raw, count=1)
            if _is_version_block(msg.get("return")):
                msg = dict(msg)
                msg["return"] = _mask_version(msg["return"])
                if raw is not None:
                    raw = _VERSION_RE.sub(r'\1<VERSION>\2<VERSION>\3<VERSION>\4"<PACKAGE>"',
                                          raw, count=1)
            how = None
            if isinstance(rec.get("step"), int) and 0 <= rec["step"] < len(steps):
                how = steps[rec["step"]].get("summary")
            if how:
                summary = _summarize(msg, how)
                if summary is not None:
                    msg = summary
                    raw = "<SUMMARY>"
            msg = _shrink(msg, tmp, top=True)
            if raw is not None:
                if tmp:
                    raw = raw.replace(tmp, "{tmp}")
                if len(raw) > MAX_RAW:
                    raw = f"<RAW len={len(raw)} sha256={sha(raw)}>"
            rec["msg"] = msg
            rec["raw"] = raw
        elif rec["kind"] == "recv-raw":
            raw = rec["raw"]
            if tmp:
                raw = raw.replace(tmp, "{tmp}")
            if len(raw) > MAX_RAW:
                raw = f"<RAW len={len(raw)} sha256={sha(raw)}>"
            rec["raw"] = raw
        elif tmp:
            for k in ("error", "data"):
                if isinstance(rec.get(k), str):
                    rec[k] = rec[k].replace(tmp, "{tmp}")
        # collapse runs of identical messages
        if out and rec["kind"] in ("recv", "recv-raw"):
            prev = out[-1]
            if (prev["kind"] == rec["kind"] and prev["step"] == rec["step"]
                    and prev.get("conn") == rec.get("conn")
                    and canon(prev.get("msg")) == canon(rec.get("msg"))
                    and prev.get("raw") == rec.get("raw")):
                prev["repeat"] = prev.get("repeat", 1) + rec.get("repeat", 1)
                continue
        out.append(rec)
    return out


# --------------------------------------------------------------------------
# transcripts on disk


def write_transcript(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=True) + "\n")


def read_transcript(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------
# comparison

COMPARED_KINDS = {"connect", "connect-failed", "recv", "recv-raw", "eof", "timeout",
                  "close", "exit", "send-failed", "harness-error"}


def _stream_key(rec: dict[str, Any]) -> str:
    return rec.get("conn") or "server"


def _item(rec: dict[str, Any], raw: bool) -> str:
    kind = rec["kind"]
    parts: list[Any] = [kind]
    if kind == "recv":
        parts.append(canon(rec["msg"]))
        if raw:
            parts.append(rec.get("raw"))
    elif kind == "recv-raw":
        parts.append(rec.get("raw"))
    elif kind == "exit":
        parts.append(rec.get("status", rec.get("signal")))
    elif kind in ("harness-error", "connect-failed", "send-failed"):
        parts.append(rec.get("error"))
    if rec.get("repeat", 1) != 1:
        parts.append(f"x{rec['repeat']}")
    return json.dumps(parts)


def _show(rec: dict[str, Any], raw: bool) -> str:
    kind = rec["kind"]
    rep = f" (x{rec['repeat']})" if rec.get("repeat", 1) != 1 else ""
    if kind == "recv":
        text = rec.get("raw") if raw else json.dumps(rec["msg"], ensure_ascii=False)
        if raw:
            text = json.dumps(text, ensure_ascii=False)
        return f"{text}{rep}"
    if kind == "recv-raw":
        return f"[unparseable] {json.dumps(rec.get('raw'), ensure_ascii=False)}{rep}"
    extra = {k: v for k, v in rec.items()
             if k not in ("step", "kind", "label", "conn", "repeat")}
    return f"<{kind}{' ' + json.dumps(extra) if extra else ''}>"


def step_index(case: dict[str, Any], ref: int | str) -> int | str:
    """A known-difference step reference: an index or a label."""
    if isinstance(ref, int):
        return ref
    for i, st in enumerate(case.get("steps", [])):
        if st.get("label") == ref:
            return i
    if ref == "end":
        return "end"
    raise KeyError(f"case {case.get('name')}: no step labelled {ref!r}")


def known_difference_steps(case: dict[str, Any]) -> set[int | str]:
    out: set[int | str] = set()
    for kd in case.get("known_differences", []):
        for ref in kd["steps"]:
            out.add(step_index(case, ref))
    return out


def compare(ref: list[dict[str, Any]], act: list[dict[str, Any]],
            case: dict[str, Any] | None = None, exclude: Iterable[int | str] = (),
            names: tuple[str, str] = ("QEMU", "qmpd"), raw: bool = True) -> list[str]:
    """Differences between two normalized transcripts, as readable text blocks."""
    case = case or {}
    excluded = set(exclude)
    no_raw_steps = {i for i, st in enumerate(case.get("steps", [])) if st.get("raw") is False}
    unordered = {i for i, st in enumerate(case.get("steps", []))
                 if st.get("compare") == "unordered"}

    def group(records: list[dict[str, Any]]) -> dict[Any, dict[str, list[dict[str, Any]]]]:
        g: dict[Any, dict[str, list[dict[str, Any]]]] = {}
        for r in records:
            if r["kind"] not in COMPARED_KINDS or r["step"] in excluded:
                continue
            g.setdefault(r["step"], {}).setdefault(_stream_key(r), []).append(r)
        return g

    gr, ga = group(ref), group(act)
    order = sorted(set(gr) | set(ga), key=lambda s: (isinstance(s, str), s if isinstance(s, int) else 0))
    diffs: list[str] = []
    for st in order:
        streams = sorted(set(gr.get(st, {})) | set(ga.get(st, {})))
        for sk in streams:
            a = gr.get(st, {}).get(sk, [])
            b = ga.get(st, {}).get(sk, [])
            use_raw = raw and st not in no_raw_steps
            if st in unordered:
                a = sorted(a, key=lambda r: _item(r, use_raw))
                b = sorted(b, key=lambda r: _item(r, use_raw))
            block = _diff_stream(a, b, names, False)
            if not block and use_raw:
                block = _diff_stream(a, b, names, True)
                if block:
                    block.insert(0, "  (JSON-equal, raw text differs)")
            if block:
                lbl = step_label(case, st) if case else (a or b)[0].get("label", "")
                head = f"step {st} ({lbl}) [{sk}]"
                sent = [r for r in ref if r["step"] == st and r["kind"] == "send"
                        and r.get("conn") == sk and not r.get("barrier")]
                if sent:
                    head += "\n  sent: " + _sent_text(sent[0])
                diffs.append(head + "\n" + "\n".join(block))
    return diffs


def _sent_text(rec: dict[str, Any]) -> str:
    if "data" in rec:
        text = json.dumps(rec["data"], ensure_ascii=False)
    elif "hex" in rec:
        text = "hex " + rec["hex"]
    else:
        text = (f"{rec.get('len')} bytes: " + json.dumps(rec.get("head"), ensure_ascii=False)
                + " ... " + json.dumps(rec.get("tail"), ensure_ascii=False))
    return text if len(text) <= 300 else text[:240] + " ... " + text[-50:]


def _merge(records: list[dict[str, Any]], raw: bool) -> list[dict[str, Any]]:
    """Collapse adjacent identical records of one stream (summing their repeat counts).

    Records of other kinds (a barrier's send record, say) may have split a run when the
    transcript was written; within a stream only the compared records count.
    """
    out: list[dict[str, Any]] = []
    for r in records:
        if out:
            prev = out[-1]
            if _item({**prev, "repeat": 1}, raw) == _item({**r, "repeat": 1}, raw):
                out[-1] = {**prev, "repeat": prev.get("repeat", 1) + r.get("repeat", 1)}
                continue
        out.append(r)
    return out


def _diff_stream(a: list[dict[str, Any]], b: list[dict[str, Any]], names: tuple[str, str],
                 raw: bool) -> list[str]:
    a = _merge(a, raw)
    b = _merge(b, raw)
    ka = [_item(r, raw) for r in a]
    kb = [_item(r, raw) for r in b]
    if ka == kb:
        return []
    out: list[str] = []
    sm = difflib.SequenceMatcher(a=ka, b=kb, autojunk=False)
    na, nb = names
    w = max(len(na), len(nb))
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        for i in range(i1, i2):
            out.append(f"  {na:<{w}} #{i}: {_show(a[i], raw)}")
        for j in range(j1, j2):
            out.append(f"  {nb:<{w}} #{j}: {_show(b[j], raw)}")
        if tag in ("replace", "delete", "insert"):
            out.append("  --")
    if out and out[-1] == "  --":
        out.pop()
    return out


# --------------------------------------------------------------------------
# known-difference bookkeeping


def readme_anchors() -> set[str]:
    """GitHub-style anchors of the headings of README.md in this folder."""
    anchors = set()
    if README.exists():
        for line in README.read_text(encoding="utf-8").splitlines():
            m = re.match(r"#+\s+(.*)", line)
            if m:
                slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
                anchors.add(slug)
    return anchors


def check_known_differences(case: dict[str, Any]) -> list[str]:
    """Every known difference needs steps and a reason naming a README section."""
    problems = []
    anchors = readme_anchors()
    for kd in case.get("known_differences", []):
        reason = kd.get("reason", "")
        m = re.search(r"README\.md#([\w\-]+)", reason)
        if not kd.get("steps"):
            problems.append("known difference without steps")
        if not m:
            problems.append(f"reason does not name a README section (README.md#anchor): {reason!r}")
        elif m.group(1) not in anchors:
            problems.append(f"README.md has no section #{m.group(1)}")
        try:
            known_difference_steps({"name": case.get("name"), "steps": case["steps"],
                                    "known_differences": [kd]})
        except KeyError as exc:
            problems.append(str(exc))
    return problems


# --------------------------------------------------------------------------
# command line


def _show_transcript(records: list[dict[str, Any]]) -> None:
    last = None
    for r in records:
        if r["kind"] == "meta":
            print("#", json.dumps({k: v for k, v in r.items() if k not in ("step", "kind")}))
            continue
        if r["step"] != last:
            last = r["step"]
            print(f"--- step {r['step']}: {r.get('label', '')}")
        conn = r.get("conn", "-")
        if r["kind"] == "send":
            what = "<barrier>" if r.get("barrier") else _sent_text(r)
            print(f"  {conn} >> {what}")
        elif r["kind"] in ("recv", "recv-raw"):
            print(f"  {conn} << {_show(r, r['kind'] == 'recv-raw')}")
        else:
            print(f"  {conn} .. {_show(r, False)}")


def _runnable(name: str, slow: bool) -> bool:
    case = load_case(name)
    return slow or not case.get("slow")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("capture", help="run cases on QEMU and write golden/<case>.jsonl")
    p.add_argument("cases", nargs="*")
    p.add_argument("--slow", action="store_true", help="include cases marked slow")
    p.add_argument("-j", "--jobs", type=int, default=2)
    p = sub.add_parser("check", help="run cases on QEMU and diff against golden/")
    p.add_argument("cases", nargs="*")
    p.add_argument("--slow", action="store_true")
    p.add_argument("-j", "--jobs", type=int, default=2)
    p = sub.add_parser("compare", help="run cases on qmpd and diff against QEMU (or golden)")
    p.add_argument("cases", nargs="*")
    p.add_argument("--golden", action="store_true", help="compare against golden/, not live QEMU")
    p.add_argument("--slow", action="store_true")
    p.add_argument("--all-steps", action="store_true", help="also compare known differences")
    p.add_argument("-j", "--jobs", type=int, default=2)
    p = sub.add_parser("run", help="run one case and print/write its transcript")
    p.add_argument("case")
    p.add_argument("--impl", choices=["qemu", "qmpd"], default="qmpd")
    p.add_argument("-o", "--output")
    p = sub.add_parser("diff", help="diff two transcripts")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("show", help="print a transcript")
    p.add_argument("file")
    args = ap.parse_args(argv)

    if args.cmd == "run":
        case = load_case(args.case)
        recs = run_case(case, args.impl)
        if args.output:
            write_transcript(Path(args.output), recs)
        else:
            _show_transcript(recs)
        return 0
    if args.cmd == "show":
        _show_transcript(read_transcript(Path(args.file)))
        return 0
    if args.cmd == "diff":
        a, b = read_transcript(Path(args.a)), read_transcript(Path(args.b))
        name = a[0].get("case") if a and a[0]["kind"] == "meta" else None
        known = isinstance(name, str) and (CASES_DIR / f"{name}.json").exists()
        d = compare(a, b, load_case(str(name)) if known else None, names=("A", "B"))
        print("\n".join(d) if d else "no differences")
        return 1 if d else 0

    names = args.cases or all_case_names()
    names = [Path(n).stem for n in names]
    if not args.cases:
        names = [n for n in names if _runnable(n, args.slow)]
    status = 0

    if args.cmd == "capture":
        if not qemu_binary():
            print(f"{QEMU_NAME} not found", file=sys.stderr)
            return 2
        GOLDEN_DIR.mkdir(exist_ok=True)

        def cap(n: str) -> str:
            case = load_case(n)
            if case.get("reference") == "hand":
                return f"{n}: skipped (hand-written reference)"
            t0 = time.monotonic()
            recs = run_case(case, "qemu")
            write_transcript(GOLDEN_DIR / f"{n}.jsonl", recs)
            bad = [r for r in recs if r["kind"] in ("timeout", "harness-error")]
            note = f" ({len(bad)} timeout/harness-error records)" if bad else ""
            return f"{n}: {len(recs)} records, {time.monotonic() - t0:.1f}s{note}"

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
            for line in ex.map(cap, names):
                print(line)
        return 0

    if args.cmd == "check":
        def chk(n: str) -> tuple[str, list[str]]:
            case = load_case(n)
            if case.get("reference") == "hand":
                return n, []
            live = run_case(case, "qemu")
            gold = read_transcript(GOLDEN_DIR / f"{n}.jsonl")
            return n, compare(gold, live, case, names=("golden", "QEMU"))

        with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
            for n, d in ex.map(chk, names):
                print(f"{'FAIL' if d else 'ok  '} {n}")
                for block in d:
                    print(block)
                status |= bool(d)
        return status

    # compare
    use_golden = args.golden or not qemu_binary()

    def cmp(n: str) -> tuple[str, list[str]]:
        case = load_case(n)
        excl = () if args.all_steps else known_difference_steps(case)
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            fq = ex.submit(run_case, case, "qmpd")
            if use_golden or case.get("reference") == "hand" or case.get("slow"):
                ref = read_transcript(GOLDEN_DIR / f"{n}.jsonl")
                ref_name = "golden"
            else:
                ref = ex.submit(run_case, case, "qemu").result()
                ref_name = "QEMU"
            act = fq.result()
        return n, compare(ref, act, case, exclude=excl, names=(ref_name, "qmpd"))

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
        for n, d in ex.map(cmp, names):
            print(f"{'FAIL' if d else 'ok  '} {n}")
            for block in d:
                print(block)
            status |= bool(d)
    return status


if __name__ == "__main__":
    sys.exit(main())
