#!/usr/bin/env python3
"""Live-migration downtime with K qcow2 nodes: qmpd against QEMU 7.2, side by side.

A measuring script, not a test (pytest does not collect it).  From a checkout,
with the interpreter that has qmpd's dependencies:

    python tests/bench/migration_bench.py                      # K = 1, 10, 100, 1000
    python tests/bench/migration_bench.py --ks 100 --reps 9
    python tests/bench/migration_bench.py --ks 100 --profile   # cProfile the qmpd destination
    python tests/bench/migration_bench.py --json /tmp/mig.json

For each K, the script makes K empty 1 GiB qcow2 images in a temporary
directory (shared storage).  Each repetition then runs, for each target
(qemu: two ``qemu-system-x86_64 -M none -nodefaults``; qmpd: two ``python -m
qmpd``), in an order rotated from one repetition to the next:

  start a source and a destination (``-incoming defer`` / ``--incoming defer``),
  the ``events`` capability on both, ``blockdev-add`` of the K images on both
  (qcow2 over file, pipelined), ``migrate-incoming unix:`` on the destination,
  ``migrate unix:`` on the source; wait for the destination's RESUME and the
  source's ``completed``; quit both.

Measured (event timestamps are the servers' own, same host clock):

  stop_to_resume   source STOP -> destination RESUME: what a guest would see
                   as downtime, including the destination's activation of
                   the K nodes (invalidate_cache + lock refresh each)
  migrate_to_resume  client time from sending migrate to receiving RESUME
  total, downtime  the source's query-migrate after completion (QEMU's
                   downtime ends when the source has sent everything)
  src_stop_to_completed  source STOP -> source MIGRATION completed (flush and
                   inactivation of K nodes on the source, device state)
  dst_active_to_resume  destination MIGRATION active -> RESUME
  add              blockdev-add of the K nodes on the destination

Medians per target and K are printed, with qmpd/qemu ratios of the medians.
The target at K = 100 is stop_to_resume <= 0.5 x QEMU's.

Processes are started in the script's temporary directory and stopped by pid
(quit, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
QEMU = "qemu-system-x86_64"


# ---------------------------------------------------------------------------
# A small blocking QMP client with pipelining
# ---------------------------------------------------------------------------


class Qmp:
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.recv()  # greeting
        self.cmd("qmp_capabilities")

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        msg["_recv"] = time.time()
        return msg

    def reply(self) -> dict[str, Any]:
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def cmd(self, execute: str, arguments: dict[str, Any] | None = None) -> Any:
        req: dict[str, Any] = {"execute": execute}
        if arguments is not None:
            req["arguments"] = arguments
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        msg = self.reply()
        if "error" in msg:
            raise RuntimeError(f"{execute}: {msg['error']['desc']}")
        return msg["return"]

    def pipeline(self, execute: str, args: list[dict[str, Any]], window: int = 64) -> None:
        """Many commands with up to ``window`` outstanding; every reply must be a return."""
        sent = done = 0
        while done < len(args):
            batch = []
            while sent < len(args) and sent - done < window:
                batch.append(json.dumps({"execute": execute, "arguments": args[sent]}) + "\n")
                sent += 1
            if batch:
                self.sock.sendall("".join(batch).encode())
            msg = self.reply()
            if "error" in msg:
                raise RuntimeError(f"{execute}: {msg['error']['desc']}")
            done += 1

    def wait_event(self, name: str, status: str | None = None) -> dict[str, Any]:
        def match(ev: dict[str, Any]) -> bool:
            return ev["event"] == name and (
                status is None or ev.get("data", {}).get("status") == status)
        for ev in self.events:
            if match(ev):
                return ev
        while True:
            msg = self.recv()
            if "event" not in msg:
                continue
            self.events.append(msg)
            if match(msg):
                return msg

    def event(self, name: str, status: str | None = None) -> dict[str, Any] | None:
        for ev in self.events:
            if ev["event"] == name and (status is None or ev.get("data", {}).get("status") == status):
                return ev
        return None

    def close(self) -> None:
        self.sock.close()


def ts(event: dict[str, Any]) -> float:
    t = event["timestamp"]
    return float(t["seconds"]) + float(t["microseconds"]) / 1e6


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


class Server:
    def __init__(self, target: str, role: str, work: Path, profile: Path | None = None) -> None:
        self.dir = work / f"{target}-{role}-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.sock = str(self.dir / "qmp.sock")
        if target == "qemu":
            argv = [QEMU, "-M", "none", "-nodefaults", "-display", "none",
                    "-qmp", f"unix:{self.sock},server=on,wait=off"]
            if role == "dst":
                argv += ["-incoming", "defer"]
        else:
            head = [sys.executable]
            if profile is not None:
                head += ["-m", "cProfile", "-o", str(profile)]
            argv = [*head, "-m", "qmpd", "--log-level", os.environ.get("QMPD_BENCH_LOG", "warning"), "--qmp", f"unix:{self.sock}"]
            if role == "dst":
                argv += ["--incoming", "defer"]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.log = open(self.dir / "log", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=self.log, env=env, cwd=self.dir)
        self.qmp: Qmp | None = None

    def connect(self) -> Qmp:
        self.qmp = Qmp(self.sock)
        return self.qmp

    def stop(self) -> None:
        if self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(OSError, EOFError, RuntimeError):
                self.qmp.sock.sendall(b'{"execute": "quit"}\n')
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
        self.log.close()


def make_images(work: Path, k: int) -> list[Path]:
    images = []
    base = work / f"k{k}"
    base.mkdir(exist_ok=True)
    template = base / "template.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "1G"], check=True)
    for i in range(k):
        path = base / f"img{i}.qcow2"
        shutil.copyfile(template, path)
        images.append(path)
    return images


def one_run(target: str, images: list[Path], work: Path,
            profile: Path | None = None) -> dict[str, float]:
    src = Server(target, "src", work)
    dst = Server(target, "dst", work, profile)
    try:
        s, d = src.connect(), dst.connect()
        for q in (s, d):
            q.cmd("migrate-set-capabilities",
                  {"capabilities": [{"capability": "events", "state": True}]})
        nodes = [{"driver": "qcow2", "node-name": f"n{i}",
                  "file": {"driver": "file", "filename": str(p)}} for i, p in enumerate(images)]
        s.pipeline("blockdev-add", nodes)
        t0 = time.perf_counter()
        d.pipeline("blockdev-add", nodes)
        add = time.perf_counter() - t0
        uri = f"unix:{dst.dir / 'mig.sock'}"
        d.cmd("migrate-incoming", {"uri": uri})
        t0 = time.time()
        s.cmd("migrate", {"uri": uri})
        resume = d.wait_event("RESUME")
        completed = s.wait_event("MIGRATION", "completed")
        stop = s.wait_event("STOP")
        active = d.wait_event("MIGRATION", "active")
        info = s.cmd("query-migrate")
        if info.get("status") != "completed":
            raise RuntimeError(f"{target}: migration ended {info}")
        return {
            "stop_to_resume": (ts(resume) - ts(stop)) * 1000,
            "migrate_to_resume": (resume["_recv"] - t0) * 1000,
            "total": float(info["total-time"]),
            "downtime": float(info["downtime"]),
            "src_stop_to_completed": (ts(completed) - ts(stop)) * 1000,
            "dst_active_to_resume": (ts(resume) - ts(active)) * 1000,
            "add": add * 1000,
        }
    finally:
        src.stop()
        dst.stop()


METRICS = ["stop_to_resume", "migrate_to_resume", "total", "downtime",
           "src_stop_to_completed", "dst_active_to_resume", "add"]


def table(results: dict[str, dict[int, list[dict[str, float]]]], ks: list[int]) -> str:
    lines = []
    head = f"{'K':>5} {'target':<6} " + " ".join(f"{m:>22}" for m in METRICS)
    lines.append("medians, ms (n = repetitions)")
    lines.append(head)
    for k in ks:
        med: dict[str, dict[str, float]] = {}
        for target in results:
            runs = results[target].get(k, [])
            if not runs:
                continue
            med[target] = {m: statistics.median(r[m] for r in runs) for m in METRICS}
            lines.append(f"{k:>5} {target:<6} " + " ".join(
                f"{med[target][m]:>22.2f}" for m in METRICS) + f"   n={len(runs)}")
        if "qemu" in med and "qmpd" in med:
            ratios = []
            for m in METRICS:
                q = med["qemu"][m]
                ratios.append(f"{(med['qmpd'][m] / q) if q else float('inf'):>21.2f}x")
            lines.append(f"{k:>5} {'ratio':<6} " + " ".join(ratios))
    return "\n".join(lines)


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qmigbench", dir="/tmp"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,10,100,1000", help="node counts (default 1,10,100,1000)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions per K (default 5)")
    ap.add_argument("--reps-1000", type=int, default=3, help="repetitions for K >= 1000")
    ap.add_argument("--targets", default="qemu,qmpd")
    ap.add_argument("--json", help="write every run's numbers here")
    ap.add_argument("--profile", action="store_true",
                    help="one more qmpd run per K with the destination under cProfile")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    targets = args.targets.split(",")
    if "qemu" in targets and shutil.which(QEMU) is None:
        print(f"{QEMU} not found: qmpd only", file=sys.stderr)
        targets.remove("qemu")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * max(ks) + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    results: dict[str, dict[int, list[dict[str, float]]]] = {t: {} for t in targets}
    with workdir(args.keep) as work:
        for k in ks:
            images = make_images(work, k)
            reps = args.reps_1000 if k >= 1000 else args.reps
            for rep in range(reps):
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for target in order:
                    r = one_run(target, images, work)
                    results[target].setdefault(k, []).append(r)
                    print(f"[rep {rep}] {target} K={k}: STOP->RESUME {r['stop_to_resume']:.1f} ms, "
                          f"migrate->RESUME {r['migrate_to_resume']:.1f} ms, "
                          f"total {r['total']:.0f} ms, downtime {r['downtime']:.0f} ms, "
                          f"dst active->RESUME {r['dst_active_to_resume']:.1f} ms",
                          flush=True)
            if args.profile and "qmpd" in targets:
                prof = work / f"dst-k{k}.prof"
                one_run("qmpd", images, work, profile=prof)
                print(f"\n--- cProfile of the qmpd destination, K={k} (cumulative, top 25) ---")
                stats = pstats.Stats(str(prof))
                stats.sort_stats("cumulative").print_stats(25)
                stats.sort_stats("tottime").print_stats(15)
    print()
    print(table(results, ks))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    del cProfile  # imported for --profile's `-m cProfile` (documents the dependency)
    raise SystemExit(main())
