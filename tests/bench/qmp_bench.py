#!/usr/bin/env python3
"""Side-by-side QMP benchmark: qmpd against QEMU 7.2 (qemu-system-x86_64 -M none).

This is a measuring script, not a test; pytest does not collect it.  Run it from a
checkout, with the interpreter that has qmpd's dependencies:

    python tests/bench/qmp_bench.py                 # 3 repetitions, 5000 commands each
    python tests/bench/qmp_bench.py --quick         # smoke run, a few seconds
    python tests/bench/qmp_bench.py --reps 5 -n 10000 --json /tmp/qmp.json

Both servers are started by the script inside its own temporary directory and are
stopped (SIGTERM, then SIGKILL, by pid) when it ends, whatever happens.  Each
repetition runs every test on both targets, one target after the other, and the
order of the targets is rotated from one repetition to the next so that noise from
the rest of the machine hits both alike.  Ratios are taken inside a repetition and
the median of those ratios is reported.

What is measured, per target:

  seq      N sequential round trips of query-version, then of query-status:
           p50/p99 latency, commands/s, server CPU per command (on-CPU time of all
           the server's threads from /proc/PID/task/*/schedstat), client CPU per
           command
  pipe     N query-version requests queued at once (and again with a window of W
           outstanding requests); every reply id is checked; commands/s
  reqsize  query-version padded with JSON whitespace to 64, 256 and 1024 bytes:
           p50 latency per size and the least-squares slope in us per request byte
  connect  connect + greeting + qmp_capabilities + close, p50/p99
  multi    C clients at once (default 100), each doing sequential query-version.
           QEMU serves one client per monitor, so its instance gets C monitor
           sockets; qmpd gets one socket that all C clients connect to (or C
           sockets with --qmpd-sockets=many).  Aggregate commands/s, p50/p99.

The client is deliberately simple and identical for both targets: plain blocking
UNIX sockets for one connection, one epoll loop for pipelining and for many
clients, no asyncio.  Its own CPU cost per command is printed so that the client
floor can be told apart from server cost.

CPU placement matters a lot for round trips on small VMs: a wake-up on another
vCPU costs tens of microseconds on each side, and an unpinned client/server pair
drifts between "same CPU" and "two CPUs" during a run, which makes results
bimodal.  By default (--pin split) the client runs on the first usable CPU and
every server on the second; the sequential query-version run is repeated with the
client moved onto the server's CPU ("one CPU" rows).  The time the server spent
runnable but waiting for its CPU (schedstat run_delay) during the sequential run
is printed too: when it is high, other processes were in the way and tails and
rates of that run are not trustworthy.

To measure a fixed version while the tree is being edited, export it and point
--qmpd-src at it:  git archive HEAD | tar -x -C /tmp/snap; ... --qmpd-src /tmp/snap
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import math
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BASELINE = "qemu"
TARGETS = ("qemu", "qmpd")
REQ_SIZES = (64, 256, 1024)
STALL_S = 15.0  # no reply for this long: the server is reported as stalled
START_TIMEOUT_S = 30.0

# (metric key, label, unit, which direction is better)
METRICS = [
    ("seq_version_p50_us", "query-version sequential p50", "us", "lower"),
    ("seq_version_p99_us", "query-version sequential p99", "us", "lower"),
    ("seq_version_cmds_s", "query-version sequential rate", "cmd/s", "higher"),
    ("seq_version_server_cpu_us", "server CPU per query-version", "us", "lower"),
    ("seq_version_client_cpu_us", "client CPU per query-version", "us", "lower"),
    ("seq_version_server_wait_us", "server run-queue wait per cmd", "us", "info"),
    ("seq1cpu_p50_us", "query-version p50, one CPU for both", "us", "lower"),
    ("seq1cpu_server_cpu_us", "server CPU/query-version, one CPU", "us", "lower"),
    ("seq_status_p50_us", "query-status sequential p50", "us", "lower"),
    ("seq_status_p99_us", "query-status sequential p99", "us", "lower"),
    ("seq_status_server_cpu_us", "server CPU per query-status", "us", "lower"),
    ("pipe_all_cmds_s", "pipelined, all queued at once", "cmd/s", "higher"),
    ("pipe_all_server_cpu_us", "server CPU per pipelined cmd", "us", "lower"),
    ("pipe_all_client_cpu_us", "client CPU per pipelined cmd", "us", "lower"),
    ("pipe_all_server_wait_us", "pipelined: server run-queue wait/cmd", "us", "info"),
    ("pipe_win_cmds_s", "pipelined, window {window}", "cmd/s", "higher"),
    ("multi_cmds_s", "{clients} clients aggregate rate", "cmd/s", "higher"),
    ("multi_p50_us", "{clients} clients p50", "us", "lower"),
    ("multi_p99_us", "{clients} clients p99", "us", "lower"),
    ("multi_server_cpu_us", "{clients} clients server CPU/cmd", "us", "lower"),
    ("multi_client_cpu_us", "{clients} clients client CPU/cmd", "us", "lower"),
    ("req64_p50_us", "64 B request p50", "us", "lower"),
    ("req256_p50_us", "256 B request p50", "us", "lower"),
    ("req1024_p50_us", "1024 B request p50", "us", "lower"),
    ("req_slope_us_per_b", "latency per request byte", "us/B", "lower"),
    ("req_cpu_slope_us_per_b", "server CPU per request byte", "us/B", "lower"),
    ("connect_p50_us", "connect+greeting+caps+close p50", "us", "lower"),
    ("connect_p99_us", "connect+greeting+caps+close p99", "us", "lower"),
    ("server_rss_kb", "server RSS after single-client tests", "KiB", "lower"),
    ("bad_replies", "wrong/missing/error replies", "count", "lower"),
]

INFO_METRICS = {m[0] for m in METRICS if m[3] == "info"}

# Goals: (label, metric, ratio qmpd/qemu must be <= or >= this value)
GOALS = [
    ("server CPU per command", "seq_version_server_cpu_us", "<=", 0.3),
    ("query-version p50 latency", "seq_version_p50_us", "<=", 0.7),
    ("pipelined throughput", "pipe_all_cmds_s", ">=", 5.0),
    ("1 KiB request latency", "req1024_p50_us", "<=", 0.1),  # i.e. >= 10x faster
    # The same two goals with client and server sharing one CPU (shown for reference).
    ("server CPU/cmd, one CPU", "seq1cpu_server_cpu_us", "<=", 0.3),
    ("p50 latency, one CPU", "seq1cpu_p50_us", "<=", 0.7),
]


class BenchError(Exception):
    """A test could not complete against a target (stall, disconnect, bad protocol)."""


class Stall(BenchError):
    pass


class Skip(Exception):
    """A test that does not apply to this configuration."""


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


def percentile(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    k = (len(sorted_vals) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def lat_stats(ns_values: list[int]) -> tuple[float | None, float | None]:
    """p50 and p99 in microseconds."""
    vals = sorted(ns_values)
    p50, p99 = percentile(vals, 50), percentile(vals, 99)
    return (None if p50 is None else p50 / 1e3, None if p99 is None else p99 / 1e3)


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ys over xs."""
    if len(xs) < 2 or any(y is None for y in ys):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def server_cpu_ns(pid: int) -> int | None:
    """On-CPU time of every thread of pid, in ns; /proc/PID/stat ticks as a fallback."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    ok = False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
                ok = True
        except (OSError, ValueError, IndexError):
            pass
    if ok:
        return total
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def server_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def git_describe(path: str) -> str | None:
    """Commit of the qmpd sources, with '+dirty' if qmpd/ has local changes."""
    try:
        head = subprocess.run(
            ["git", "-C", path, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", path, "status", "--porcelain", "--", "qmpd"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_probe_ms() -> float:
    """A fixed amount of pure-Python work; a slow value flags a disturbed repetition."""
    t0 = time.perf_counter()
    acc = 0
    for i in range(300_000):
        acc += i * i % 7
    return (time.perf_counter() - t0) * 1e3


def is_event(line: bytes) -> bool:
    return line.startswith(b'{"timestamp"') or line.startswith(b'{"event"')


def request(cmd: str, ident: int) -> bytes:
    return b'{"execute": "%s", "id": %d}\n' % (cmd.encode(), ident)


def padded_request(ident: int, size: int) -> bytes:
    """query-version with JSON whitespace before the closing brace: exactly size bytes."""
    head = b'{"execute": "query-version", "id": %d' % ident
    fill = size - len(head) - 2
    if fill < 0:
        raise ValueError(f"request size {size} is too small")
    return head + b" " * fill + b"}\n"


class ReplyChecker:
    """Validates reply lines after the timed part; keeps a count and a few examples."""

    def __init__(self) -> None:
        self.bad = 0
        self.examples: list[str] = []

    def fail(self, what: str) -> None:
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append(what[:300])

    def check(self, line: bytes, ident: int, key: str) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            self.fail(f"id {ident}: not JSON: {line[:200]!r}")
            return
        if not isinstance(msg, dict):
            self.fail(f"id {ident}: not an object: {line[:200]!r}")
        elif msg.get("id") != ident:
            self.fail(f"expected id {ident}, got {line[:200]!r}")
        elif not isinstance(msg.get("return"), dict) or key not in msg["return"]:
            self.fail(f"id {ident}: unexpected reply {line[:200]!r}")


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------

_LIVE: dict[int, subprocess.Popen[bytes]] = {}
# CPU placement: {"client": cpu or None, "server": cpu or None}; see --pin.
PIN: dict[str, int | None] = {"client": None, "server": None}


def _pin_server() -> None:
    os.sched_setaffinity(0, {PIN["server"]})


class Server:
    """One server process with its monitor socket paths."""

    def __init__(
        self,
        target: str,
        argv: list[str],
        paths: list[str],
        log: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.target = target
        self.argv = argv
        self.paths = paths
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.greeting: dict | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=os.path.dirname(self.log),
                start_new_session=True,
                preexec_fn=_pin_server if PIN["server"] is not None else None,
            )
        _LIVE[self.proc.pid] = self.proc

    def wait_ready(self) -> None:
        """Wait until the first and the last monitor socket each send a greeting."""
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        for path in dict.fromkeys([self.paths[0], self.paths[-1]]):
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(
                        f"{self.target} exited with status {self.proc.returncode}"
                        f" during start-up:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.target} not ready after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
                    )
                try:
                    c = Client(path, timeout=5.0)
                except (OSError, BenchError):
                    time.sleep(0.02)
                    continue
                self.greeting = c.greeting
                c.close()
                break

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            try:
                os.kill(proc.pid, sig)
                proc.wait(timeout=grace)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        _LIVE.pop(proc.pid, None)

    def log_tail(self, nbytes: int = 1500) -> str:
        try:
            with open(self.log, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                return f.read().decode(errors="replace")
        except OSError:
            return ""


def kill_leftovers() -> None:
    for pid, proc in list(_LIVE.items()):
        if proc.poll() is None:
            try:
                os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        _LIVE.pop(pid, None)


def make_server(
    target: str, args: argparse.Namespace, tmp: str, phase: str, nsockets: int
) -> Server:
    """Server for one phase; socket paths have the same length for both targets."""
    d = os.path.join(tmp, f"{target}-{phase}")
    os.makedirs(d, exist_ok=True)
    paths = [os.path.join(d, f"m{i:03d}.sock") for i in range(nsockets)]
    log = os.path.join(d, "server.log")
    if target == "qemu":
        argv = [args.qemu, "-M", "none", "-nodefaults", "-display", "none"]
        for p in paths:
            argv += ["-qmp", f"unix:{p},server=on,wait=off"]
        return Server(target, argv, paths, log)
    if target == "qmpd":
        argv = [args.python, "-m", "qmpd"]
        for p in paths:
            argv += ["--qmp", f"unix:{p}"]
        argv += args.qmpd_arg
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [args.qmpd_src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        return Server(target, argv, paths, log, env)
    raise ValueError(target)


def start_servers(
    targets: list[str], args: argparse.Namespace, tmp: str, phase: str, nsockets: dict[str, int]
) -> dict[str, Server]:
    servers = {t: make_server(t, args, tmp, phase, nsockets[t]) for t in targets}
    try:
        for s in servers.values():
            s.spawn()
        for s in servers.values():
            s.wait_ready()
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


# ---------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------


class Client:
    """Blocking QMP client on a UNIX socket.  The receive timeout is set in the kernel
    (SO_RCVTIMEO) so that each recv stays a single system call."""

    def __init__(self, path: str, timeout: float = STALL_S) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self.sock.settimeout(None)
            sec = int(timeout)
            self.sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_RCVTIMEO,
                struct.pack("ll", sec, int((timeout - sec) * 1e6)),
            )
            self.buf = b""
            self.events = 0
            line = self.readline()
            self.greeting = json.loads(line)
            if not isinstance(self.greeting, dict) or "QMP" not in self.greeting:
                raise BenchError(f"unexpected greeting {line[:200]!r}")
        except BaseException:
            self.sock.close()
            raise

    def readline(self) -> bytes:
        """Next line that is not an event."""
        while True:
            buf = self.buf
            j = buf.find(b"\n")
            while j < 0:
                try:
                    chunk = self.sock.recv(65536)
                except (TimeoutError, BlockingIOError):
                    raise Stall("no reply within the timeout") from None
                if not chunk:
                    raise BenchError("server closed the connection")
                buf += chunk
                j = buf.find(b"\n")
            line = buf[: j + 1]
            self.buf = buf[j + 1 :]
            if is_event(line):
                self.events += 1
                continue
            return line

    def command(self, name: str, arguments: dict | None = None) -> dict:
        msg: dict = {"execute": name}
        if arguments is not None:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return json.loads(self.readline())

    def negotiate(self) -> None:
        reply = self.command("qmp_capabilities")
        if "return" not in reply:
            raise BenchError(f"qmp_capabilities failed: {reply}")

    def close(self) -> None:
        self.sock.close()


def open_client(path: str) -> Client:
    c = Client(path)
    try:
        c.negotiate()
    except BaseException:
        c.close()
        raise
    return c


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def timed_round_trips(c: Client, reqs: list[bytes]) -> tuple[list[int], list[bytes], int]:
    """Send each request and wait for its reply; returns latencies (ns), replies and
    the wall time of the whole loop (ns)."""
    sock = c.sock
    send = sock.sendall
    recv = sock.recv
    clock = time.perf_counter_ns
    lat = [0] * len(reqs)
    replies: list[bytes] = [b""] * len(reqs)
    buf = c.buf
    start = clock()
    for i, req in enumerate(reqs):
        t0 = clock()
        send(req)
        while True:
            j = buf.find(b"\n")
            while j < 0:
                try:
                    chunk = recv(65536)
                except (TimeoutError, BlockingIOError):
                    raise Stall(f"no reply to request {i} within {STALL_S:.0f} s") from None
                if not chunk:
                    raise BenchError(f"server closed the connection at request {i}")
                buf += chunk
                j = buf.find(b"\n")
            line = buf[: j + 1]
            buf = buf[j + 1 :]
            if not is_event(line):
                break
            c.events += 1
        lat[i] = clock() - t0
        replies[i] = line
    end = clock()
    c.buf = buf
    return lat, replies, end - start


def server_wait_ns(pid: int) -> int | None:
    """Time the server's threads spent runnable but waiting for a CPU (schedstat run_delay):
    mostly how much other processes on its CPU delayed it.  QEMU reads QMP input in a
    monitor I/O thread and runs commands in its main thread, so its figure also holds
    those two waiting for each other."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return total


def bench_seq(srv: Server, cmd: str, key: str, n: int, warmup: int, chk: ReplyChecker) -> dict:
    c = open_client(srv.paths[0])
    try:
        timed_round_trips(c, [request(cmd, 1_000_000 + i) for i in range(warmup)])
        reqs = [request(cmd, i) for i in range(n)]
        gc.collect()
        gc.disable()
        try:
            wait0 = server_wait_ns(srv.pid)
            cpu0, ccpu0 = server_cpu_ns(srv.pid), time.process_time_ns()
            lat, replies, wall = timed_round_trips(c, reqs)
            cpu1, ccpu1 = server_cpu_ns(srv.pid), time.process_time_ns()
            wait1 = server_wait_ns(srv.pid)
        finally:
            gc.enable()
    finally:
        c.close()
    for i, line in enumerate(replies):
        chk.check(line, i, key)
    p50, p99 = lat_stats(lat)
    return {
        "server_wait_us": None if wait0 is None or wait1 is None else (wait1 - wait0) / n / 1e3,
        "p50_us": p50,
        "p99_us": p99,
        "cmds_s": n / (wall / 1e9),
        "server_cpu_us": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / n / 1e3,
        "client_cpu_us": (ccpu1 - ccpu0) / n / 1e3,
    }


def bench_seq_one_cpu(srv: Server, n: int, warmup: int, chk: ReplyChecker) -> dict:
    """bench_seq with the client moved onto the server's CPU: every round trip is then
    two context switches on one CPU instead of two cross-CPU wake-ups."""
    if PIN["server"] is None or PIN["server"] == PIN["client"]:
        raise Skip("needs --pin split")
    os.sched_setaffinity(0, {PIN["server"]})
    try:
        return bench_seq(srv, "query-version", "qemu", n, warmup, chk)
    finally:
        os.sched_setaffinity(0, {PIN["client"]})


def bench_pipe(srv: Server, n: int, window: int | None, chk: ReplyChecker) -> dict:
    """Queue requests without waiting for replies (all of them, or at most `window`
    outstanding); read replies concurrently so that neither side can block the other."""
    c = open_client(srv.paths[0])
    sock = c.sock
    try:
        reqs = [request("query-version", i) for i in range(n)]
        sock.setblocking(False)
        ep = select.epoll()
        fd = sock.fileno()
        ep.register(fd, select.EPOLLIN | select.EPOLLOUT)
        out = bytearray()
        queued = 0
        lines: list[bytes] = []
        buf = c.buf
        want_out = True
        gc.collect()
        gc.disable()
        try:
            wait0 = server_wait_ns(srv.pid)
            cpu0, ccpu0 = server_cpu_ns(srv.pid), time.process_time_ns()
            t0 = time.perf_counter_ns()
            while len(lines) < n:
                limit = n if window is None else min(n, len(lines) + window)
                if queued < limit:
                    out += b"".join(reqs[queued:limit])
                    queued = limit
                if out:
                    try:
                        k = sock.send(out)
                        del out[:k]
                    except BlockingIOError:
                        pass
                if bool(out) != want_out:
                    want_out = bool(out)
                    ep.modify(fd, select.EPOLLIN | (select.EPOLLOUT if want_out else 0))
                events = ep.poll(STALL_S)
                if not events:
                    raise Stall(
                        f"pipelined: stalled after {len(lines)} of {n} replies "
                        f"({queued} requests queued, {len(out)} bytes unsent)"
                    )
                for _fd, ev in events:
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        try:
                            chunk = sock.recv(1 << 18)
                        except BlockingIOError:
                            continue
                        if not chunk:
                            raise BenchError(
                                f"pipelined: server closed the connection "
                                f"after {len(lines)} replies"
                            )
                        buf += chunk
                        if b"\n" in chunk:
                            parts = buf.split(b"\n")
                            buf = parts.pop()
                            for p in parts:
                                if is_event(p):
                                    c.events += 1
                                else:
                                    lines.append(p)
            t1 = time.perf_counter_ns()
            cpu1, ccpu1 = server_cpu_ns(srv.pid), time.process_time_ns()
            wait1 = server_wait_ns(srv.pid)
        finally:
            gc.enable()
            ep.close()
    finally:
        c.close()
    if len(lines) != n:
        chk.fail(f"pipelined: {len(lines)} replies for {n} requests")
    for i, line in enumerate(lines[:n]):
        chk.check(line, i, "qemu")
    return {
        "cmds_s": n / ((t1 - t0) / 1e9),
        "server_cpu_us": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / n / 1e3,
        "server_wait_us": None if wait0 is None or wait1 is None else (wait1 - wait0) / n / 1e3,
        "client_cpu_us": (ccpu1 - ccpu0) / n / 1e3,
    }


def bench_reqsize(
    srv: Server, count: int, warmup: int, order: list[int], chk: ReplyChecker
) -> dict:
    c = open_client(srv.paths[0])
    res: dict[int, tuple[float | None, float | None]] = {}
    try:
        for size in order:
            timed_round_trips(c, [padded_request(2_000_000 + i, size) for i in range(warmup)])
            reqs = [padded_request(i, size) for i in range(count)]
            gc.collect()
            gc.disable()
            try:
                cpu0 = server_cpu_ns(srv.pid)
                lat, replies, _wall = timed_round_trips(c, reqs)
                cpu1 = server_cpu_ns(srv.pid)
            finally:
                gc.enable()
            for i, line in enumerate(replies):
                chk.check(line, i, "qemu")
            cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / count / 1e3
            res[size] = (lat_stats(lat)[0], cpu)
    finally:
        c.close()
    sizes = sorted(res)
    out: dict = {f"req{s}_p50_us": res[s][0] for s in sizes}
    out.update({f"req{s}_server_cpu_us": res[s][1] for s in sizes})
    out["req_slope_us_per_b"] = slope(sizes, [res[s][0] for s in sizes])
    out["req_cpu_slope_us_per_b"] = slope(sizes, [res[s][1] for s in sizes])
    return out


def bench_connect(srv: Server, count: int, warmup: int) -> dict:
    path = srv.paths[0]
    caps = b'{"execute": "qmp_capabilities"}\n'
    clock = time.perf_counter_ns
    lat = []
    for i in range(warmup + count):
        t0 = clock()
        c = Client(path)
        try:
            c.sock.sendall(caps)
            reply = c.readline()
        finally:
            c.close()
        t1 = clock()
        if b'"return"' not in reply:
            raise BenchError(f"connect: qmp_capabilities failed: {reply[:200]!r}")
        if i >= warmup:
            lat.append(t1 - t0)
    p50, p99 = lat_stats(lat)
    return {"p50_us": p50, "p99_us": p99}


def bench_multi(srv: Server, clients: int, per_client: int, chk: ReplyChecker) -> dict:
    """`clients` connections, each doing sequential query-version, served by one epoll
    loop.  Connection i uses monitor socket i (modulo the number of sockets)."""
    conns: list[Client] = []
    ep = select.epoll()
    try:
        for i in range(clients):
            conns.append(open_client(srv.paths[i % len(srv.paths)]))
        reqs = [request("query-version", k) for k in range(per_client)]
        socks = [c.sock for c in conns]
        index = {}
        for i, s in enumerate(socks):
            s.setblocking(False)
            ep.register(s.fileno(), select.EPOLLIN)
            index[s.fileno()] = i
        bufs = [c.buf for c in conns]
        sent_at = [0] * clients
        count = [0] * clients
        lat: list[int] = []
        replies: list[list[bytes]] = [[] for _ in range(clients)]
        done = 0
        clock = time.perf_counter_ns
        gc.collect()
        gc.disable()
        try:
            cpu0, ccpu0 = server_cpu_ns(srv.pid), time.process_time_ns()
            t0 = clock()
            for i, s in enumerate(socks):
                sent_at[i] = clock()
                s.send(reqs[0])
            while done < clients:
                events = ep.poll(STALL_S)
                if not events:
                    waiting = sum(1 for k in count if k < per_client)
                    raise Stall(
                        f"multi: {waiting} clients got no reply within {STALL_S:.0f} s"
                        f" ({sum(count)} of {clients * per_client} replies)"
                    )
                for fd, _ev in events:
                    i = index[fd]
                    try:
                        chunk = socks[i].recv(65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise BenchError(f"multi: server closed client {i}'s connection")
                    now = clock()
                    buf = bufs[i] + chunk
                    j = buf.find(b"\n")
                    while j >= 0:
                        line = buf[: j + 1]
                        buf = buf[j + 1 :]
                        j = buf.find(b"\n")
                        if is_event(line):
                            continue
                        lat.append(now - sent_at[i])
                        replies[i].append(line)
                        k = count[i] = count[i] + 1
                        if k < per_client:
                            sent_at[i] = clock()
                            socks[i].send(reqs[k])
                        elif k == per_client:
                            done += 1
                    bufs[i] = buf
            t1 = clock()
            cpu1, ccpu1 = server_cpu_ns(srv.pid), time.process_time_ns()
        finally:
            gc.enable()
    finally:
        ep.close()
        for c in conns:
            c.close()
    for rs in replies:
        if len(rs) != per_client:
            chk.fail(f"multi: {len(rs)} replies for {per_client} requests")
        for k, line in enumerate(rs):
            chk.check(line, k, "qemu")
    total = clients * per_client
    p50, p99 = lat_stats(lat)
    return {
        "cmds_s": total / ((t1 - t0) / 1e9),
        "p50_us": p50,
        "p99_us": p99,
        "server_cpu_us": None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / total / 1e3,
        "client_cpu_us": (ccpu1 - ccpu0) / total / 1e3,
    }


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_test(
    rep_res: dict,
    problems: list[str],
    rep: int,
    target: str,
    srv: Server,
    name: str,
    fn,
    prefix: str,
) -> None:
    """Run one test, store its numbers under prefix_*, record failures instead of
    aborting the whole benchmark."""
    if not srv.alive():
        problems.append(f"rep {rep} {target} {name}: skipped, the server is not running")
        return
    t0 = time.monotonic()
    try:
        res = fn()
    except Skip:
        return
    except BenchError as exc:
        msg = f"rep {rep} {target} {name}: {exc}"
        if not srv.alive():
            msg += (
                f" (server exited with status {srv.proc.returncode}; log tail: "
                f"{srv.log_tail(400)!r})"
            )
        problems.append(msg)
        log("  PROBLEM: " + msg)
        return
    except OSError as exc:
        msg = f"rep {rep} {target} {name}: {type(exc).__name__}: {exc}"
        problems.append(msg)
        log("  PROBLEM: " + msg)
        return
    for k, v in res.items():
        rep_res[f"{prefix}_{k}" if prefix else k] = v
    log(f"  {target:5s} {name:14s} {time.monotonic() - t0:6.2f} s")


def one_rep(
    rep: int,
    order: list[str],
    args: argparse.Namespace,
    tmp: str,
    problems: list[str],
    greetings: dict,
) -> dict:
    res: dict[str, dict] = {t: {} for t in order}
    checkers = {t: ReplyChecker() for t in order}
    n = args.n
    size_order = list(REQ_SIZES[rep % 3 :] + REQ_SIZES[: rep % 3])

    # Phase A: one monitor socket per target, one client at a time.
    servers = start_servers(order, args, tmp, f"r{rep}a", {t: 1 for t in order})
    try:
        for t, s in servers.items():
            greetings[t] = s.greeting
        w = args.warmup
        tests = [
            (
                "seq version",
                "seq_version",
                lambda s, ch: bench_seq(s, "query-version", "qemu", n, w, ch),
            ),
            ("seq 1 CPU", "seq1cpu", lambda s, ch: bench_seq_one_cpu(s, n, w, ch)),
            (
                "seq status",
                "seq_status",
                lambda s, ch: bench_seq(s, "query-status", "status", n, w, ch),
            ),
            ("pipe all", "pipe_all", lambda s, ch: bench_pipe(s, n, None, ch)),
            ("pipe window", "pipe_win", lambda s, ch: bench_pipe(s, n, args.window, ch)),
            (
                "reqsize",
                "",
                lambda s, ch: bench_reqsize(s, args.reqsize_n, min(w, 20), size_order, ch),
            ),
            ("connect", "connect", lambda s, ch: bench_connect(s, args.connect_n, 10)),
        ]
        for name, prefix, fn in tests:
            for t in order:
                s = servers[t]
                run_test(
                    res[t],
                    problems,
                    rep,
                    t,
                    s,
                    name,
                    lambda fn=fn, s=s, ch=checkers[t]: fn(s, ch),
                    prefix,
                )
        for t, s in servers.items():
            res[t]["server_rss_kb"] = server_rss_kb(s.pid)
    finally:
        for s in servers.values():
            s.stop()

    # Phase B: many clients.  QEMU needs one monitor per client.
    if args.clients > 0:
        nsock = {t: args.clients for t in order}
        if args.qmpd_sockets == "one" and "qmpd" in nsock:
            nsock["qmpd"] = 1
        servers = start_servers(order, args, tmp, f"r{rep}b", nsock)
        try:
            for t in order:
                s = servers[t]
                run_test(
                    res[t],
                    problems,
                    rep,
                    t,
                    s,
                    f"{args.clients} clients",
                    lambda s=s, ch=checkers[t]: bench_multi(s, args.clients, args.per_client, ch),
                    "multi",
                )
        finally:
            for s in servers.values():
                s.stop()

    for t in order:
        res[t]["bad_replies"] = checkers[t].bad
        if checkers[t].bad:
            msg = f"rep {rep} {t}: {checkers[t].bad} wrong replies, e.g. " + " | ".join(
                checkers[t].examples
            )
            problems.append(msg)
            log("  PROBLEM: " + msg)
    return res


def summarize(values: list) -> dict | None:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": vals[0], "max": vals[-1], "n": len(vals)}


def fmt_num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if unit == "count":
        return f"{v:.0f}"
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_cell(s: dict | None, unit: str) -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return fmt_num(s["median"], unit)
    return f"{fmt_num(s['median'], unit)} [{fmt_num(s['min'], unit)}-{fmt_num(s['max'], unit)}]"


def fmt_ratio(s: dict | None) -> str:
    if s is None:
        return "-"
    r = s["median"]
    txt = f"{r:.3f}" if abs(r) < 0.1 else f"{r:.2f}"
    if txt == "-0.000":
        txt = "0.000"
    if s["n"] > 1:
        txt += f" [{s['min']:.2g}-{s['max']:.2g}]"
    return txt


def build_summary(reps: list[dict], targets: list[str]) -> dict:
    summary: dict = {"targets": {}, "ratio": {}}
    for key, *_ in METRICS:
        summary["targets"][key] = {
            t: summarize([r["results"][t].get(key) for r in reps]) for t in targets
        }
        if BASELINE in targets and "qmpd" in targets and key not in INFO_METRICS:
            ratios = []
            for r in reps:
                a = r["results"]["qmpd"].get(key)
                b = r["results"][BASELINE].get(key)
                if a is not None and b:
                    ratios.append(a / b)
            summary["ratio"][key] = summarize(ratios)
    return summary


def render(
    summary: dict,
    targets: list[str],
    args: argparse.Namespace,
    meta: dict,
    reps: list[dict],
    problems: list[str],
) -> tuple[str, list[dict]]:
    lines = []
    lines.append(
        f"QMP benchmark: {' vs '.join(targets)}  (reps={args.reps}, n={args.n}, "
        f"window={args.window}, clients={args.clients}x{args.per_client}, "
        f"reqsize n={args.reqsize_n}, connect n={args.connect_n})"
    )
    lines.append(
        f"host: {meta['host'].get('cpu', '?')}, {meta['host']['nproc']} CPUs, "
        f"Python {meta['host']['python']}, kernel {meta['host']['kernel']}"
    )
    pin = meta["pin"]
    lines.append(
        f"placement (--pin {args.pin}): client on CPU {pin['client']}, "
        f"servers on CPU {pin['server']}"
        if args.pin != "none"
        else "placement: not pinned (--pin none)"
    )
    lines.append(
        f"qmpd sources: {meta['qmpd_src']}"
        + (f" (git {meta['qmpd_git']})" if meta["qmpd_git"] else "")
    )
    for t in targets:
        g = meta["greetings"].get(t)
        if g:
            v = g["QMP"]["version"]
            q = v.get("qemu", {})
            lines.append(
                f"  {t}: reports {q.get('major')}.{q.get('minor')}.{q.get('micro')}"
                f" '{v.get('package', '')}'"
            )
    probes = [f"{r['cpu_probe_ms']:.1f}" for r in reps]
    lines.append(f"client CPU probe per rep (ms, higher = busier machine): {', '.join(probes)}")
    lines.append("cells: median [min-max] over reps; ratio = median of per-rep qmpd/qemu")
    lines.append("")
    have_ratio = bool(summary["ratio"])
    head = f"{'metric':38s} {'unit':6s}"
    for t in targets:
        head += f" {t:>24s}"
    if have_ratio:
        head += f" {'qmpd/qemu':>18s}  better"
    lines.append(head)
    lines.append("-" * len(head))
    for key, label, unit, better in METRICS:
        label = label.format(window=args.window, clients=args.clients)
        row = f"{label:38s} {unit:6s}"
        for t in targets:
            row += f" {fmt_cell(summary['targets'][key][t], unit):>24s}"
        if have_ratio:
            row += f" {fmt_ratio(summary['ratio'].get(key)):>18s}  {better}"
        lines.append(row)
    busy = []
    for r in reps:
        for t in targets:
            res = r["results"][t]
            wait, p50 = res.get("seq_version_server_wait_us"), res.get("seq_version_p50_us")
            if wait is not None and p50 and wait > 0.2 * p50:
                busy.append(f"rep {r['rep']} {t} ({wait:.0f} us/cmd)")
    if busy:
        lines.append(
            "note: other processes delayed the server (runnable, waiting for its CPU) during "
            "the sequential run: " + ", ".join(busy) + "; tails and rates there are inflated"
            " (QEMU's figure also holds its monitor I/O thread and main thread waiting for"
            " each other on the one CPU)"
        )
    goals = []
    if have_ratio:
        lines.append("")
        lines.append("Goals (median of per-rep ratios qmpd/qemu):")
        for label, key, op, limit in GOALS:
            s = summary["ratio"].get(key)
            r = None if s is None else s["median"]
            met = None if r is None else (r <= limit if op == "<=" else r >= limit)
            if key == "req1024_p50_us":
                shown = "-" if r is None else f"{1 / r:.1f}x faster"
                want = f">= {1 / limit:.0f}x faster"
            elif op == ">=":
                shown = "-" if r is None else f"{r:.2f}x"
                want = f">= {limit:g}x QEMU"
            else:
                shown = "-" if r is None else f"{r:.3f}x"
                want = f"<= {limit:g}x QEMU"
            verdict = "n/a" if met is None else ("MET" if met else "NOT MET")
            lines.append(f"  {label:28s} {shown:>14s}   goal {want:18s} {verdict}")
            goals.append(
                {"goal": label, "metric": key, "op": op, "limit": limit, "ratio": r, "met": met}
            )
    if problems:
        lines.append("")
        lines.append(f"Problems ({len(problems)}):")
        for p in problems:
            lines.append(f"  - {p}")
    return "\n".join(lines), goals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="QMP latency/throughput benchmark: qmpd vs QEMU 7.2, side by side."
    )
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3)")
    p.add_argument(
        "-n",
        "--n",
        type=int,
        default=None,
        help="commands per sequential / pipelined run (default 5000)",
    )
    p.add_argument("--quick", action="store_true", help="small counts for a smoke run")
    p.add_argument("--json", metavar="OUT", help="write all results as JSON here")
    p.add_argument(
        "--targets", default="qemu,qmpd", help="comma-separated subset of qemu,qmpd (default: both)"
    )
    p.add_argument(
        "--window",
        type=int,
        default=16,
        help="outstanding requests in the windowed pipelined run (default 16)",
    )
    p.add_argument(
        "--clients",
        type=int,
        default=100,
        help="concurrent clients in the multi-client run (0 skips it)",
    )
    p.add_argument(
        "--per-client",
        type=int,
        default=None,
        help="sequential commands per client in the multi-client run",
    )
    p.add_argument(
        "--reqsize-n",
        type=int,
        default=None,
        help="samples per request size (default n/20, at least 50)",
    )
    p.add_argument(
        "--connect-n", type=int, default=None, help="connect cycles (default n/10, at least 50)"
    )
    p.add_argument("--warmup", type=int, default=100, help="untimed requests before a run")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that runs 'python -m qmpd' (default: this one)",
    )
    p.add_argument(
        "--qmpd-src",
        default=str(REPO_ROOT),
        metavar="DIR",
        help="directory holding the qmpd package to run (default: this checkout;"
        " e.g. an exported snapshot while the tree is being edited)",
    )
    p.add_argument(
        "--qmpd-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for qmpd (repeatable)",
    )
    p.add_argument(
        "--qmpd-sockets",
        choices=["one", "many"],
        default="one",
        help="multi-client run: all qmpd clients on one socket (default) or one "
        "socket per client like QEMU",
    )
    p.add_argument(
        "--pin",
        choices=["split", "same", "none"],
        default=None,
        help="CPU placement: 'split' (default with 2+ CPUs) puts the client on "
        "the first usable CPU and every server on the second; 'same' puts "
        "all on one CPU; 'none' lets the scheduler choose, which on VMs "
        "makes round trips bimodal",
    )
    a = p.parse_args(argv)
    a.reps = a.reps if a.reps is not None else (1 if a.quick else 3)
    a.n = a.n if a.n is not None else (300 if a.quick else 5000)
    if a.quick:
        a.warmup = min(a.warmup, 20)
    a.per_client = a.per_client if a.per_client is not None else max(5, a.n // 50)
    a.reqsize_n = a.reqsize_n if a.reqsize_n is not None else max(30 if a.quick else 50, a.n // 20)
    a.connect_n = a.connect_n if a.connect_n is not None else max(30 if a.quick else 50, a.n // 10)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}; choose from {', '.join(TARGETS)}")
    if not targets or len(set(targets)) != len(targets):
        p.error("--targets: give qemu and/or qmpd, each once")
    a.target_list = targets
    if a.pin is None:
        a.pin = "split" if len(os.sched_getaffinity(0)) >= 2 else "none"
    if a.pin != "none" and len(os.sched_getaffinity(0)) < (2 if a.pin == "split" else 1):
        p.error("--pin split needs two usable CPUs")
    if a.reps < 1 or a.n < 1 or a.window < 1 or a.clients < 0:
        p.error("--reps, -n and --window must be positive, --clients not negative")
    a.qmpd_src = os.path.abspath(a.qmpd_src)
    if "qmpd" in targets and not os.path.isfile(os.path.join(a.qmpd_src, "qmpd", "__main__.py")):
        p.error(f"--qmpd-src {a.qmpd_src}: no qmpd package there")
    if "qemu" in targets and shutil.which(a.qemu) is None:
        p.error(f"QEMU binary {a.qemu!r} not found")
    return a


def _raise_nofile(need: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _on_signal(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    targets = args.target_list
    _raise_nofile(4 * args.clients + 256)
    if args.pin != "none":
        cpus = sorted(os.sched_getaffinity(0))
        PIN["client"] = cpus[0]
        PIN["server"] = cpus[1] if args.pin == "split" else cpus[0]
        os.sched_setaffinity(0, {PIN["client"]})
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    atexit.register(kill_leftovers)
    tmp = tempfile.mkdtemp(prefix="qmp_bench.")
    problems: list[str] = []
    greetings: dict = {}
    reps: list[dict] = []
    meta = {
        "host": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "loadavg_start": os.getloadavg(),
        },
        "greetings": greetings,
        "args": {k: v for k, v in vars(args).items() if k != "target_list"},
        "targets": targets,
        "pin": dict(PIN),
        "qmpd_src": args.qmpd_src,
        "qmpd_git": git_describe(args.qmpd_src),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    meta["host"]["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    started = time.monotonic()
    interrupted = False
    try:
        for rep in range(args.reps):
            order = targets[rep % len(targets) :] + targets[: rep % len(targets)]
            probe = cpu_probe_ms()
            log(
                f"rep {rep + 1}/{args.reps}: order {', '.join(order)}, "
                f"CPU probe {probe:.1f} ms, load {os.getloadavg()[0]:.2f}"
            )
            try:
                res = one_rep(rep, order, args, tmp, problems, greetings)
            except BenchError as exc:
                problems.append(f"rep {rep}: {exc}")
                log(f"  PROBLEM: rep {rep}: {exc}")
                continue
            reps.append({"rep": rep, "order": order, "cpu_probe_ms": probe, "results": res})
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted; cleaning up")
    finally:
        kill_leftovers()
        shutil.rmtree(tmp, ignore_errors=True)
    meta["host"]["loadavg_end"] = os.getloadavg()
    meta["wall_s"] = time.monotonic() - started
    if not reps:
        log("no repetition completed")
        for p in problems:
            log(f"  - {p}")
        return 1
    summary = build_summary(reps, targets)
    text, goals = render(summary, targets, args, meta, reps, problems)
    print(text)
    print(f"\n(total wall time {meta['wall_s']:.0f} s)")
    if args.json:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from tests.bench.machine import describe

        doc = {
            "machine": describe(),
            "meta": meta,
            "reps": reps,
            "summary": summary,
            "goals": goals,
            "problems": problems,
            "metrics": [list(m) for m in METRICS],
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        log(f"results written to {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
