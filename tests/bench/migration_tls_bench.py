#!/usr/bin/env python3
"""Issue 13's migration benchmark: handover over TLS, qmpd against QEMU 7.2.

A measuring script, not a test.  From a checkout, with the interpreter that
has qmpd's dependencies:

    python tests/bench/migration_tls_bench.py                 # K = 1, 100; 5 repetitions
    python tests/bench/migration_tls_bench.py --ks 1 --reps 3 --modes tls

For each K, repetition, mode (``plain``: ``tcp:``; ``tls``: ``tcp:`` with
tls-creds on both sides, tls-hostname on the source, tls-authz on the
destination) and target (two ``qemu-system-x86_64 -M none`` or two ``python
-m qmpd``, in rotated order): start both (certificates made by
tests/support/certs.py once), the events capability, K qcow2 images added
on both, ``migrate-incoming tcp:127.0.0.1:0``, ``migrate`` to its port, wait
for RESUME and the source's completion.  Measured as migration_bench.py
does: source STOP -> destination RESUME (the guest's downtime), the source's
``downtime`` and STOP -> completed (qmpd's source waits on tcp: for the
destination's close; QEMU's does not), migrate -> RESUME.  Printed: the
medians, qmpd/QEMU per mode and tls/plain per target.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.migration_bench import Qmp, ts
from tests.bench.startup_bench import (
    QEMU,
    check_checkout,
    child_env,
    make_images,
    qcow2_node,
    rotated,
)
from tests.support.certs import CLIENT_DN, Pki, make_pki
from tests.support.qsd import QsdMonitor

METRICS = ["stop_to_resume", "downtime", "src_stop_to_completed", "migrate_to_resume"]


class Peer:
    def __init__(self, target: str, role: str, work: Path, pki: Pki, tls: bool) -> None:
        self.dir = work / f"{target}-{role}-{time.monotonic_ns()}"
        self.dir.mkdir()
        self.sock: str | socket.socket = str(self.dir / "qmp.sock")
        flag = "-object" if target == "qemu" else "--object"
        monitor = None
        if target == "qemu":
            # A socket pair, not a listening socket: QsdMonitor says why.
            monitor = QsdMonitor("qmp")
            self.sock = monitor.sock
            argv = [QEMU, "-M", "none", "-nodefaults", "-display", "none", *monitor.qemu_args]
        else:
            argv = [sys.executable, "-m", "qmpd", "--log-level", "warning",
                    "--qmp", f"unix:{self.sock}"]
        if role == "dst":
            argv += [flag.replace("object", "incoming"), "defer"]
        if tls:
            endpoint = "client" if role == "src" else "server"
            argv += [flag, f"tls-creds-x509,id=tls0,dir={pki.dir(endpoint)},endpoint={endpoint}"]
            if role == "dst":
                argv += [flag, "authz-simple,id=az0,identity=" + CLIENT_DN.replace(",", ",,")]
        self.log = open(self.dir / "log", "wb")
        spawn = monitor.popen if monitor is not None else subprocess.Popen
        self.proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                          stderr=self.log, env=child_env(), cwd=self.dir)
        self.qmp = Qmp(self.sock, self.proc)

    def stop(self) -> None:
        with contextlib.suppress(OSError, EOFError, RuntimeError):
            self.qmp.send(b'{"execute": "quit"}\n')
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.qmp.close()
        self.log.close()


def one_run(target: str, mode: str, images: list[Path], work: Path, pki: Pki
            ) -> dict[str, float]:
    tls = mode == "tls"
    src = Peer(target, "src", work, pki, tls)
    dst = Peer(target, "dst", work, pki, tls)
    try:
        s, d = src.qmp, dst.qmp
        nodes = [qcow2_node(i, p) for i, p in enumerate(images)]
        for q in (s, d):
            q.ok("migrate-set-capabilities",
                 {"capabilities": [{"capability": "events", "state": True}]})
            q.pipeline("blockdev-add", nodes)
        if tls:
            d.ok("migrate-set-parameters", {"tls-creds": "tls0", "tls-authz": "az0"})
            s.ok("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "localhost"})
        d.ok("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = d.ok("query-migrate")["socket-address"][0]["port"]
        t0 = time.time()
        s.ok("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        resume = d.wait_event("RESUME", timeout=300)
        completed = s.wait_event("MIGRATION", "completed", timeout=300)
        stop = s.wait_event("STOP")
        info = s.ok("query-migrate")
        if info.get("status") != "completed":
            raise RuntimeError(f"{target} {mode}: {info}")
        return {
            "stop_to_resume": (ts(resume) - ts(stop)) * 1000,
            "downtime": float(info["downtime"]),
            "src_stop_to_completed": (ts(completed) - ts(stop)) * 1000,
            "migrate_to_resume": (resume["_recv"] - t0) * 1000,
        }
    finally:
        src.stop()
        dst.stop()


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qmpd-migtls-bench-"))
    try:
        yield path
    finally:
        if not keep:
            subprocess.run(["rm", "-rf", str(path)], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="1,100")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--modes", default="plain,tls")
    parser.add_argument("--targets", default="qemu,qmpd")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    modes = args.modes.split(",")
    targets = args.targets.split(",")
    runs: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    with workdir(args.keep) as work:
        print(f"qmpd from {check_checkout(work)}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        pki = make_pki(work / "pki")
        images = make_images(work, max(ks))
        for k in ks:
            for rep in range(args.reps):
                for mode in modes:
                    for target in rotated(targets, rep):
                        r = one_run(target, mode, images[:k], work, pki)
                        runs.setdefault((target, mode, k), []).append(r)
                        print(f"[rep {rep}] {target} {mode} K={k}: " + ", ".join(
                            f"{m} {r[m]:.1f}" for m in METRICS), flush=True)
    med = {key: {m: statistics.median(r[m] for r in rs) for m in METRICS}
           for key, rs in runs.items()}
    print(f"\nmedians (ms) of {args.reps} runs")
    print(f"{'K':>5} {'mode':6} {'metric':22} {'qemu':>9} {'qmpd':>9} {'qmpd/qemu':>10}")
    for k in ks:
        for mode in modes:
            for m in METRICS:
                q = med.get(("qemu", mode, k), {}).get(m)
                p = med.get(("qmpd", mode, k), {}).get(m)
                ratio = f"{p / q:.2f}x" if p is not None and q else "-"
                print(f"{k:>5} {mode:6} {m:22} {q if q is not None else float('nan'):>9.1f} "
                      f"{p if p is not None else float('nan'):>9.1f} {ratio:>10}")
    if "tls" in modes and "plain" in modes:
        print("\nTLS cost: tls/plain of the medians")
        for k in ks:
            for target in targets:
                for m in ("stop_to_resume", "migrate_to_resume"):
                    t = med[(target, "tls", k)][m]
                    p = med[(target, "plain", k)][m]
                    print(f"{k:>5} {target:5} {m:22} {t / p if p else float('nan'):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
