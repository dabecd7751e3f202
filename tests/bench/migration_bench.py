#!/usr/bin/env python3
"""Issue 10's handover benchmark: qmpd against QEMU 7.2, side by side, in one run.

A measuring script, not a test (pytest does not collect it).  From a checkout,
with the interpreter that has qmpd's dependencies:

    python tests/bench/migration_bench.py                      # everything, 5 repetitions
    python tests/bench/migration_bench.py --ks 1,100 --reps 3 --nodes 100   # a quick look
    python tests/bench/migration_bench.py --parts startup      # node opening and start-up only
    python tests/bench/migration_bench.py --ks 100 --profile   # cProfile the qmpd destination
    python tests/bench/migration_bench.py --ks 100 --profile-source   # ... the qmpd source
    python tests/bench/migration_bench.py --json /tmp/mig.json

It runs the daemon of the checkout it lives in (``PYTHONPATH`` and the
children's working directory are set for that, and checked before measuring).
The images are empty 1 GiB qcow2 files in a temporary directory (shared
storage), made once and reused by every repetition and K (the first K).

Migration (``--parts migration``), for each K (default 1, 10, 100, 1000) and
repetition, for each target (qemu: two ``qemu-system-x86_64 -M none
-nodefaults``; qmpd: two ``python -m qmpd``), in an order rotated from one
repetition to the next: start a source and a destination (``-incoming
defer``), the ``events`` capability on both, ``blockdev-add`` of the K images
on both (qcow2 over file, pipelined), ``migrate-incoming unix:`` on the
destination, ``migrate unix:`` on the source; wait for the destination's
RESUME and the source's ``completed``; quit both.  Measured (event timestamps
are the servers' own, same host clock):

  stop_to_resume   source STOP -> destination RESUME: what a guest would see
                   as downtime, including the destination's activation of
                   the K nodes (invalidate_cache + lock refresh each)
  migrate_to_resume  client time from sending migrate to receiving RESUME
  total, downtime  the source's query-migrate after completion (QEMU's
                   downtime ends when the source has sent everything)
  src_stop_to_completed  source STOP -> source MIGRATION completed (flush and
                   inactivation of K nodes on the source, device state)
  dst_active_to_resume  destination MIGRATION active -> RESUME
  add              blockdev-add of the K nodes on the destination (pipelined)

Start-up and node opening (``--parts startup``): ``startup_bench.one_run``
for qmpd, QEMU and qemu-storage-daemon, once per repetition, each in a fresh
daemon: exec to a greeting QMP socket, idle RSS, the first ``blockdev-add``,
``--nodes`` - 1 more as sequential round trips (per node), and
``query-named-block-nodes`` with them open.

Printed: every run, the medians per target (and K), then the issue's targets
with the ratio of the medians qmpd/QEMU (qemu-storage-daemon's start-up
figures beside them) and PASS or MISS.  ``--json`` writes every run, the
medians and the verdicts.  Processes are started in the script's temporary
directory and stopped by pid (quit, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.machine import describe
from tests.bench.startup_bench import (
    BINARIES,
    QEMU,
    QSD,
    check_checkout,
    child_env,
    make_images,
    qcow2_node,
    rotated,
)
from tests.bench.startup_bench import one_run as startup_run
from tests.support.qmp import QmpClient
from tests.support.qsd import QsdMonitor

# ---------------------------------------------------------------------------
# The shared client, with receive times and pipelining
# ---------------------------------------------------------------------------


class Qmp(QmpClient):
    """tests/support's client; each event also gets its arrival time as ``_recv``."""

    def __init__(self, path: str | socket.socket, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(path, timeout=120, wait=60, proc=proc, check_schema=False,
                         negotiate=True)

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        msg = super().recv(timeout)
        if "event" in msg:
            msg["_recv"] = time.time()
        return msg

    def pipeline(self, execute: str, args: list[dict[str, Any]], window: int = 64) -> None:
        """Many commands with up to ``window`` outstanding; every reply must be a return."""
        sent = done = 0
        while done < len(args):
            batch = []
            while sent < len(args) and sent - done < window:
                batch.append(json.dumps({"execute": execute, "arguments": args[sent]}) + "\n")
                sent += 1
            if batch:
                self.send("".join(batch))
            msg = self.recv()
            if "event" in msg:
                continue
            if "return" not in msg:
                raise RuntimeError(f"{execute}: {msg}")
            done += 1


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
        self.sock: str | socket.socket = str(self.dir / "qmp.sock")
        monitor = None
        if target == "qemu":
            # A socket pair, not a listening socket: QsdMonitor says why.
            monitor = QsdMonitor("qmp")
            self.sock = monitor.sock
            argv = [QEMU, "-M", "none", "-nodefaults", "-display", "none", *monitor.qemu_args]
            if role == "dst":
                argv += ["-incoming", "defer"]
        else:
            head = [sys.executable]
            if profile is not None:
                head += ["-m", "cProfile", "-o", str(profile)]
            argv = [*head, "-m", "qmpd", "--log-level",
                    os.environ.get("QMPD_BENCH_LOG", "warning"), "--qmp", f"unix:{self.sock}"]
            if role == "dst":
                argv += ["--incoming", "defer"]
        self.log = open(self.dir / "log", "wb")
        spawn = monitor.popen if monitor is not None else subprocess.Popen
        self.proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                          stderr=self.log, env=child_env(), cwd=self.dir)
        self.qmp: Qmp | None = None
        self.add_ms = 0.0  # blockdev-add of the images, pipelined

    def connect(self) -> Qmp:
        self.qmp = Qmp(self.sock, self.proc)
        return self.qmp

    def stop(self) -> None:
        if self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(OSError, EOFError, RuntimeError):
                self.qmp.send(b'{"execute": "quit"}\n')
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        if self.qmp is not None:
            self.qmp.close()
        self.log.close()


@contextlib.contextmanager
def pair(target: str, images: list[Path], work: Path, profile: Path | None = None,
         profile_role: str = "dst") -> Iterator[tuple[Server, Server]]:
    """A source and a ``defer`` destination with the events capability and the images added
    (``profile``: where the cProfile of the ``profile_role`` side goes)."""
    src = Server(target, "src", work, profile if profile_role == "src" else None)
    dst = Server(target, "dst", work, profile if profile_role == "dst" else None)
    try:
        s, d = src.connect(), dst.connect()
        for q in (s, d):
            q.ok("migrate-set-capabilities",
                 {"capabilities": [{"capability": "events", "state": True}]})
        nodes = [qcow2_node(i, p) for i, p in enumerate(images)]
        s.pipeline("blockdev-add", nodes)
        t0 = time.perf_counter()
        d.pipeline("blockdev-add", nodes)
        dst.add_ms = (time.perf_counter() - t0) * 1000
        yield src, dst
    finally:
        src.stop()
        dst.stop()


def migrate(src: Server, dst: Server, target: str) -> dict[str, float]:
    """Migrate ``src`` to ``dst`` over a unix socket; the timings of one handover."""
    s, d = src.qmp, dst.qmp
    assert s is not None and d is not None
    uri = f"unix:{dst.dir / 'mig.sock'}"
    d.ok("migrate-incoming", {"uri": uri})
    t0 = time.time()
    s.ok("migrate", {"uri": uri})
    resume = d.wait_event("RESUME", timeout=300)
    completed = s.wait_event("MIGRATION", "completed", timeout=300)
    stop = s.wait_event("STOP")
    active = d.wait_event("MIGRATION", "active")
    info = s.ok("query-migrate")
    if info.get("status") != "completed":
        raise RuntimeError(f"{target}: migration ended {info}")
    return {
        "stop_to_resume": (ts(resume) - ts(stop)) * 1000,
        "migrate_to_resume": (resume["_recv"] - t0) * 1000,
        "total": float(info["total-time"]),
        "downtime": float(info["downtime"]),
        "src_stop_to_completed": (ts(completed) - ts(stop)) * 1000,
        "dst_active_to_resume": (ts(resume) - ts(active)) * 1000,
        "add": dst.add_ms,
    }


def one_run(target: str, images: list[Path], work: Path,
            profile: Path | None = None, profile_role: str = "dst") -> dict[str, float]:
    with pair(target, images, work, profile, profile_role) as (src, dst):
        return migrate(src, dst, target)


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

METRICS = ["stop_to_resume", "migrate_to_resume", "total", "downtime",
           "src_stop_to_completed", "dst_active_to_resume", "add"]
STARTUP = ["exec->listening ms", "idle RSS MiB", "first add ms", "add per node ms",
           "query-named-block-nodes ms"]

Runs = list[dict[str, float]]


def medians(runs: Runs, metrics: list[str]) -> dict[str, float]:
    return {m: statistics.median(r[m] for r in runs) for m in metrics}


def migration_table(med: dict[str, dict[int, dict[str, float]]], counts: dict[str, dict[int, int]],
                    ks: list[int]) -> list[str]:
    lines = ["migration, medians in ms (n = repetitions)",
             f"{'K':>5} {'target':<6} " + " ".join(f"{m:>22}" for m in METRICS)]
    for k in ks:
        for target in med:
            if k in med[target]:
                lines.append(f"{k:>5} {target:<6} " + " ".join(
                    f"{med[target][k][m]:>22.2f}" for m in METRICS) + f"   n={counts[target][k]}")
        if k in med.get("qemu", {}) and k in med.get("qmpd", {}):
            q, o = med["qemu"][k], med["qmpd"][k]
            lines.append(f"{k:>5} {'ratio':<6} " + " ".join(
                f"{o[m] / q[m] if q[m] else float('inf'):>21.2f}x" for m in METRICS))
    return lines


def startup_table(med: dict[str, dict[str, float]], nodes: int, reps: int) -> list[str]:
    targets = list(med)
    lines = [f"start-up and node opening, K = {nodes} qcow2-over-file nodes, medians of {reps}",
             f"{'metric':30}" + "".join(f" {t:>10}" for t in targets)]
    for m in STARTUP:
        lines.append(f"{m:30}" + "".join(f" {med[t][m]:10.2f}" for t in targets))
    return lines


def verdicts(mig: dict[str, dict[int, dict[str, float]]], start: dict[str, dict[str, float]],
             nodes: int) -> list[dict[str, Any]]:
    """The issue's targets: (what, K, reference, its value, qmpd's, ratio, goal, verdict)."""
    rows: list[dict[str, Any]] = []

    def row(what: str, k: str, ref: str, theirs: float | None, ours: float | None,
            limit: float | None, unit: str = "x") -> None:
        ratio = ours / theirs if ours is not None and theirs else None
        if limit is None:
            goal, ok = "(report)", None
        elif unit == "x":
            goal, ok = f"<= {limit:g}x", None if ratio is None else ratio <= limit
        else:
            goal, ok = f"<= {limit:g} {unit}", None if ours is None else ours <= limit
        rows.append({"metric": what, "K": k, "ref": ref, "ref_value": theirs, "qmpd": ours,
                     "ratio": ratio, "goal": goal,
                     "verdict": "-" if ok is None else "PASS" if ok else "MISS"})

    qemu, qmpd = mig.get("qemu", {}), mig.get("qmpd", {})
    for k in sorted(set(qemu) | set(qmpd)):
        limit = 1.0 if k == 1 else 0.3 if k >= 100 else None
        row("STOP->RESUME ms", str(k), "qemu", qemu.get(k, {}).get("stop_to_resume"),
            qmpd.get(k, {}).get("stop_to_resume"), limit)
    for k in sorted(set(qemu) | set(qmpd)):
        row("source STOP->completed ms", str(k), "qemu",
            qemu.get(k, {}).get("src_stop_to_completed"),
            qmpd.get(k, {}).get("src_stop_to_completed"), 1.0)
    if start:
        def get(target: str, m: str) -> float | None:
            return start.get(target, {}).get(m)
        big = str(nodes) + ("" if nodes == 1000 else " (goal at 1000)")
        row("blockdev-add per node ms", big, "qemu", get("qemu", "add per node ms"),
            get("qmpd", "add per node ms"), 0.5)
        row("first blockdev-add ms", "1", "qemu", get("qemu", "first add ms"),
            get("qmpd", "first add ms"), 2.0)
        row("query-named-block-nodes ms", big, "qemu", get("qemu", "query-named-block-nodes ms"),
            get("qmpd", "query-named-block-nodes ms"), 0.5)
        ref = "qsd" if "qsd" in start else "qemu"
        row("exec->listening QMP ms", "-", ref, get(ref, "exec->listening ms"),
            get("qmpd", "exec->listening ms"), 150.0, "ms")
        row("idle RSS MiB", "-", ref, get(ref, "idle RSS MiB"), get("qmpd", "idle RSS MiB"), None)
    return rows


def verdict_table(rows: list[dict[str, Any]]) -> list[str]:
    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = ["issue 10 targets (ratio = qmpd median / reference median)",
             f"{'metric':28} {'K':>16} {'ref':>5} {'ref value':>10} {'qmpd':>10} "
             f"{'ratio':>8} {'goal':>10} verdict"]
    for r in rows:
        lines.append(f"{r['metric']:28} {r['K']:>16} {r['ref']:>5} {num(r['ref_value'], '.2f'):>10} "
                     f"{num(r['qmpd'], '.2f'):>10} {num(r['ratio'], '.2f') + 'x':>8} "
                     f"{r['goal']:>10} {r['verdict']}")
    return lines


@contextlib.contextmanager
def workdir(base: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qmigbench", dir=base or None))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def print_profile(prof: Path, k: int, role: str = "destination") -> None:
    print(f"\n--- cProfile of the qmpd {role}, K={k} (cumulative, top 25) ---")
    stats = pstats.Stats(str(prof))
    stats.sort_stats("cumulative").print_stats(25)
    stats.sort_stats("tottime").print_stats(15)
    if role == "source":  # the switchover alone, among the blockdev-adds
        print("--- the source's switchover (cumulative) ---")
        stats.sort_stats("cumulative").print_callees(r"_outgoing|inactivate_all")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,10,100,1000", help="node counts (default 1,10,100,1000)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions (default 5)")
    ap.add_argument("--reps-1000", type=int, default=None,
                    help="repetitions for K >= 1000 (default: --reps)")
    ap.add_argument("--nodes", type=int, default=1000,
                    help="nodes for blockdev-add and query-named-block-nodes (default 1000)")
    ap.add_argument("--parts", default="migration,startup",
                    help="migration, startup or both (default both)")
    ap.add_argument("--targets", default="qemu,qmpd",
                    help="default qemu,qmpd (start-up adds qemu-storage-daemon)")
    ap.add_argument("--dir", default="/tmp", help="where the images go (default /tmp)")
    ap.add_argument("--json", help="write every run's numbers, the medians and the verdicts here")
    ap.add_argument("--profile", action="store_true",
                    help="one more qmpd run per K with the destination under cProfile")
    ap.add_argument("--profile-source", action="store_true",
                    help="one more qmpd run per K with the source under cProfile")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")] if "migration" in args.parts else []
    nodes = args.nodes if "startup" in args.parts else 0
    if not set(args.targets.split(",")) <= {"qemu", "qmpd"}:
        ap.error("--targets: qemu and/or qmpd")
    targets = [t for t in args.targets.split(",") if t == "qmpd" or shutil.which(BINARIES[t])]
    if targets != args.targets.split(","):
        print(f"{QEMU} not found: qmpd only", file=sys.stderr)
    start_targets = targets + ([] if shutil.which(QSD) is None else ["qsd"])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * max([*ks, nodes]) + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    began = time.monotonic()
    results: dict[str, dict[int, Runs]] = {t: {} for t in targets}
    startup: dict[str, Runs] = {t: [] for t in start_targets} if nodes else {}
    with workdir(args.dir, args.keep) as work:
        print(f"qmpd from {check_checkout(work)}; images in {work}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        images = make_images(work, max([*ks, nodes]))
        for k in ks:
            reps = args.reps_1000 if k >= 1000 and args.reps_1000 is not None else args.reps
            for rep in range(reps):
                for target in rotated(targets, rep):
                    r = one_run(target, images[:k], work)
                    results[target].setdefault(k, []).append(r)
                    print(f"[rep {rep}] {target} K={k}: STOP->RESUME {r['stop_to_resume']:.1f} ms, "
                          f"src STOP->completed {r['src_stop_to_completed']:.1f} ms, "
                          f"migrate->RESUME {r['migrate_to_resume']:.1f} ms, "
                          f"dst active->RESUME {r['dst_active_to_resume']:.1f} ms, "
                          f"add {r['add']:.1f} ms", flush=True)
            if args.profile and "qmpd" in targets:
                prof = work / f"dst-k{k}.prof"
                one_run("qmpd", images[:k], work, profile=prof)
                print_profile(prof, k)
            if args.profile_source and "qmpd" in targets:
                prof = work / f"src-k{k}.prof"
                one_run("qmpd", images[:k], work, profile=prof, profile_role="src")
                print_profile(prof, k, "source")
        for rep in range(args.reps if nodes else 0):
            for target in rotated(start_targets, rep):
                r = startup_run(target, work, images[:nodes])
                startup[target].append(r)
                print(f"[rep {rep}] {target} start-up: " + ", ".join(
                    f"{m} {r[m]:.2f}" for m in STARTUP), flush=True)
    mig_med = {t: {k: medians(runs, METRICS) for k, runs in by_k.items()}
               for t, by_k in results.items()}
    start_med = {t: medians(runs, STARTUP) for t, runs in startup.items() if runs}
    rows = verdicts(mig_med, start_med, nodes)
    print()
    if ks:
        print("\n".join(migration_table(mig_med, {t: {k: len(v) for k, v in by_k.items()}
                                                  for t, by_k in results.items()}, ks)))
        print()
    if start_med:
        print("\n".join(startup_table(start_med, nodes, args.reps)))
        print()
    print("\n".join(verdict_table(rows)))
    print(f"\n(wall time {time.monotonic() - began:.0f} s, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": describe(),
            "migration": {t: {str(k): v for k, v in by_k.items()} for t, by_k in results.items()},
            "startup": startup, "medians": {"migration": mig_med, "startup": start_med},
            "verdicts": rows, "nodes": nodes, "reps": args.reps}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
