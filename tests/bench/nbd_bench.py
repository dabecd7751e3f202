#!/usr/bin/env python3
"""NBD export benchmark: qmpd side by side with qemu-storage-daemon (not a pytest test).

Both servers export the same raw image (a file node, page cache on, writable
NBD export) over a UNIX socket; each repetition runs every target in turn,
in rotating order, so that both see the same machine state.  Measured per
target and repetition:

* ``seq_write``: ``nbdcopy -S 0 --flush SRC URI`` (libnbd; several
  connections when the server offers multi-conn), MiB/s;
* ``seq_read``: ``nbdcopy --no-extents URI null:`` (every byte read), MiB/s;
* ``rand4k_read`` / ``rand4k_write``: ``qemu-img bench -s 4k -d 16`` with a
  stride of 100003 blocks (an odd multiple of 4 KiB: every block of the
  image once, in scattered order; qemu-img bench has no random mode), IOPS;
* server CPU (``/proc/PID/stat`` user+system, all threads) per request and
  per GiB;
* QMP latency (``query-block-exports``, one client, sequential) while the
  export serves reads at full speed: p50 / p99 / max;
* ceilings of this machine in the same repetition: a page-cache read of the
  image (``dd bs=1M``, second pass) and a 4 KiB ``qemu-img bench`` straight
  on the file; results are also reported as fractions of them.

``--tls`` runs it all over TLS: both servers get the same certificates
(made by tests/support/certs.py) and ``tls-creds``; nbdcopy connects with
``nbds+unix://...&tls-certificates=``.  ``qemu-img bench`` takes no
``--object``, so the 4 KiB figures come from nbdcopy instead (4 KiB
requests, 16 in flight, one connection, over the whole image, in order).

Usage::

    python3 tests/bench/nbd_bench.py [--size 1G] [--reps 3] [--dir /dev/shm] [--json out.json]
                                     [--tls]

Targets: ``qmpd`` (this checkout, ``python -m qmpd``), ``qsd``
(``qemu-storage-daemon``); ``--qmpd-loop uvloop`` tries qmpd on uvloop.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
MiB = 1 << 20
STRIDE_BLOCKS = 100003
TICKS = os.sysconf("SC_CLK_TCK")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.upper())
    if m is None:
        raise SystemExit(f"bad size {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def run(argv: list[str], timeout: float = 600) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip()}")
    return elapsed, result.stdout


class Qmp:
    """A minimal blocking QMP client (enough for latency probes)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""
        self.recv()
        self.cmd("qmp_capabilities")

    def recv(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd(self, name: str) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            msg = self.recv()
            if "return" in msg or "error" in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


class Target:
    def __init__(self, name: str, argv: list[str], workdir: Path, nbd_sock: Path,
                 qmp_sock: Path, env: dict[str, str] | None = None,
                 pki: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.workdir = workdir
        self.nbd_sock = nbd_sock
        self.qmp_sock = qmp_sock
        self.env = env
        #: With TLS: the certificates' root (tests/support/certs.py layout).
        self.pki = pki
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.pki is not None:
            return (f"nbds+unix:///bench?socket={self.nbd_sock}"
                    f"&tls-certificates={self.pki / 'client'}")
        return f"nbd+unix:///bench?socket={self.nbd_sock}"

    def start(self) -> None:
        for path in (self.nbd_sock, self.qmp_sock):
            if path.exists():
                path.unlink()
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not (self.nbd_sock.exists() and self.qmp_sock.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"{self.name} did not start: {err}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            qmp = Qmp(str(self.qmp_sock))
            qmp.sock.sendall(b'{"execute": "quit"}\n')
            self.proc.wait(30)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def make_pki(work: Path) -> Path:
    sys.path.insert(0, str(REPO))
    from tests.support.certs import make_pki as make

    return make(work / "pki").root


def make_targets(args: argparse.Namespace, work: Path, image: Path) -> list[Target]:
    targets = []
    pki = make_pki(work) if args.tls else None
    tls_object: list[str] = []
    tls_server = ""
    if pki is not None:
        tls_object = ["--object", f"tls-creds-x509,id=tls0,dir={pki / 'server'},endpoint=server"]
        tls_server = ",tls-creds=tls0"
    qmpd_sock, qmpd_qmp = work / "qmpd-nbd.sock", work / "qmpd-qmp.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    targets.append(Target("qmpd", [
        sys.executable, "-m", "qmpd", "--log-level", "error", "--event-loop", args.qmpd_loop,
        "--qmp", f"unix:{qmpd_qmp}", *tls_object,
        "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
        "--nbd-server", f"addr.type=unix,addr.path={qmpd_sock}{tls_server}",
        "--export", "type=nbd,id=e0,node-name=f,name=bench,writable=on",
    ], work, qmpd_sock, qmpd_qmp, env, pki))
    if shutil.which("qemu-storage-daemon"):
        qsd_sock, qsd_qmp = work / "qsd-nbd.sock", work / "qsd-qmp.sock"
        targets.append(Target("qsd", [
            "qemu-storage-daemon",
            "--chardev", f"socket,id=m0,path={qsd_qmp},server=on,wait=off",
            "--monitor", "chardev=m0", *tls_object,
            "--blockdev", f"driver=file,node-name=f,filename={image},cache.direct=off",
            "--nbd-server", f"addr.type=unix,addr.path={qsd_sock}{tls_server}",
            "--export", "type=nbd,id=e0,node-name=f,name=bench,writable=on",
        ], work, qsd_sock, qsd_qmp, pki=pki))
    return targets


def qemu_img_bench(target: list[str], size: int, count: int, write: bool) -> float:
    """IOPS of ``qemu-img bench`` on ``target`` (``-f raw PATH`` or ``--image-opts ...``)."""
    stride = 4096 * STRIDE_BLOCKS % size if size > 4096 else 0
    argv = ["qemu-img", "bench", "-s", "4096", "-S", str(stride), "-d", "16",
            "-c", str(count)]
    if write:
        argv += ["-w", "--pattern=0xa5"]
    elapsed, out = run([*argv, *target])
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    seconds = float(m.group(1)) if m else elapsed
    return count / seconds


def measure(target: Target, args: argparse.Namespace, src: Path) -> dict[str, float]:
    size = args.size
    res: dict[str, float] = {}
    uri = target.uri
    requests = size // (256 * 1024)  # nbdcopy's request size
    cpu = cpu_seconds(target.pid)
    elapsed, _ = run(["nbdcopy", "-S", "0", "--flush", str(src), uri])
    res["seq_write_mibs"] = size / MiB / elapsed
    res["cpu_us_per_req_seq_write"] = (cpu_seconds(target.pid) - cpu) / requests * 1e6
    cpu = cpu_seconds(target.pid)
    elapsed, _ = run(["nbdcopy", "--no-extents", uri, "null:"])
    res["seq_read_mibs"] = size / MiB / elapsed
    res["cpu_us_per_req_seq_read"] = (cpu_seconds(target.pid) - cpu) / requests * 1e6
    res["cpu_s_per_gib_read"] = (cpu_seconds(target.pid) - cpu) / (size / (1 << 30))
    for kind, write in (("read", False), ("write", True)):
        cpu = cpu_seconds(target.pid)
        if target.pki is None:
            count = args.count
            iops = qemu_img_bench(["-f", "raw", uri], size, count, write)
        else:
            # qemu-img bench takes no --object: 4 KiB requests, 16 in flight,
            # one connection, from nbdcopy over the whole image instead.
            count = size // 4096
            small = ["--request-size=4096", "--requests=16", "--connections=1"]
            argv = (["nbdcopy", "-S", "0", *small, str(src), uri] if write
                    else ["nbdcopy", "--no-extents", *small, uri, "null:"])
            iops = count / run(argv)[0]
        res[f"rand4k_{kind}_iops"] = iops
        res[f"cpu_us_per_req_rand4k_{kind}"] = (cpu_seconds(target.pid) - cpu) / count * 1e6
    res.update(qmp_under_load(target, args))
    return res


def qmp_under_load(target: Target, args: argparse.Namespace) -> dict[str, float]:
    """QMP round trips while nbdcopy reads the export as fast as it can."""
    load = subprocess.Popen(
        ["sh", "-c", f"while :; do nbdcopy --no-extents '{target.uri}' null: || exit 1; done"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        qmp = Qmp(str(target.qmp_sock))
        samples = []
        for _ in range(args.qmp_samples):
            t0 = time.perf_counter()
            reply = qmp.cmd("query-block-exports")
            samples.append(time.perf_counter() - t0)
            assert "return" in reply, reply
        qmp.close()
    finally:
        load.terminate()
        load.wait()
        subprocess.run(["pkill", "-P", str(load.pid)], capture_output=True)
    samples.sort()
    return {
        "qmp_p50_ms": samples[len(samples) // 2] * 1e3,
        "qmp_p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e3,
        "qmp_max_ms": samples[-1] * 1e3,
    }


def ceilings(image: Path, args: argparse.Namespace) -> dict[str, float]:
    res = {}
    for _ in range(2):  # the second pass is the page-cache read
        elapsed, _ = run(["dd", f"if={image}", "of=/dev/null", "bs=1M"])
    res["pagecache_read_mibs"] = args.size / MiB / elapsed
    res["local_rand4k_read_iops"] = qemu_img_bench(["-f", "raw", str(image)], args.size,
                                                   args.count, False)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--count", type=int, default=100000, help="requests per 4k run")
    ap.add_argument("--qmp-samples", type=int, default=500)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--qmpd-loop", default="asyncio", choices=["asyncio", "uvloop"])
    ap.add_argument("--json", help="write all samples here")
    ap.add_argument("--tls", action="store_true",
                    help="NBD over TLS (same certificates for both servers)")
    args = ap.parse_args()
    for tool in ("nbdcopy", "qemu-img", "dd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is required")
    work = Path(tempfile.mkdtemp(prefix="nbdbench-", dir=args.dir))
    src, image = work / "src.img", work / "image.raw"
    samples: dict[str, list[dict[str, float]]] = {}
    targets: list[Target] = []
    try:
        with open(src, "wb") as f:
            for _ in range(args.size // (64 * MiB) or 1):
                f.write(os.urandom(min(64 * MiB, args.size)))
        shutil.copyfile(src, image)
        targets = make_targets(args, work, image)
        for rep in range(args.reps):
            order = targets[rep % len(targets):] + targets[: rep % len(targets)]
            row: dict[str, dict[str, float]] = {"ceiling": ceilings(image, args)}
            for target in order:
                target.start()
                try:
                    row[target.name] = measure(target, args, src)
                finally:
                    target.stop()
            for name, values in row.items():
                samples.setdefault(name, []).append(values)
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
                f"{n} read {v['seq_read_mibs']:.0f} MiB/s" for n, v in row.items() if n != "ceiling"),
                file=sys.stderr, flush=True)
    finally:
        for t in targets:
            t.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(samples, args)
    if args.json:
        sys.path.insert(0, str(REPO))
        from tests.bench.machine import describe

        Path(args.json).write_text(json.dumps({"machine": describe(),
                                               "args": {"size": args.size, "reps": args.reps,
                                                         "count": args.count},
                                               "samples": samples}, indent=1))
    return 0


def cell(values: list[float], fmt: str = "{:.0f}") -> str:
    med = statistics.median(values)
    if len(values) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def report(samples: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    names = [n for n in samples if n != "ceiling"]
    ceil = samples["ceiling"]
    four_k = "sequential (nbdcopy, 1 connection)" if args.tls else "random (qemu-img bench)"
    metrics = [
        ("seq write, nbdcopy (MiB/s)", "seq_write_mibs", "{:.0f}"),
        ("seq read, nbdcopy --no-extents (MiB/s)", "seq_read_mibs", "{:.0f}"),
        (f"4k {four_k} read, QD16 (IOPS)", "rand4k_read_iops", "{:.0f}"),
        (f"4k {four_k} write, QD16 (IOPS)", "rand4k_write_iops", "{:.0f}"),
        ("server CPU per seq write request (us)", "cpu_us_per_req_seq_write", "{:.0f}"),
        ("server CPU per seq read request (us)", "cpu_us_per_req_seq_read", "{:.0f}"),
        ("server CPU per 4k read (us)", "cpu_us_per_req_rand4k_read", "{:.1f}"),
        ("server CPU per 4k write (us)", "cpu_us_per_req_rand4k_write", "{:.1f}"),
        ("QMP p50 under NBD load (ms)", "qmp_p50_ms", "{:.2f}"),
        ("QMP p99 under NBD load (ms)", "qmp_p99_ms", "{:.2f}"),
        ("QMP max under NBD load (ms)", "qmp_max_ms", "{:.2f}"),
    ]
    over = " over TLS" if args.tls else ""
    print(f"\n# NBD benchmark{over}: {args.size // MiB} MiB raw image, {args.reps} repetitions "
          f"(median [min-max])\n")
    head = "| metric | " + " | ".join(names)
    if "qsd" in names and "qmpd" in names:
        head += " | qmpd/qsd"
    print(head + " |")
    print("|---" * (head.count("|")) + "|")
    for label, key, fmt in metrics:
        cells = [cell([s[key] for s in samples[n]], fmt) for n in names]
        line = f"| {label} | " + " | ".join(cells)
        if "qsd" in names and "qmpd" in names:
            ratios = [a[key] / b[key] for a, b in zip(samples["qmpd"], samples["qsd"], strict=True)
                      if b[key]]
            line += " | " + cell(ratios, "{:.2f}") if ratios else " | -"
        print(line + " |")
    print("\n# Fractions of this machine's ceilings (same repetition)\n")
    print("| ceiling | value | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    pc = [c["pagecache_read_mibs"] for c in ceil]
    lr = [c["local_rand4k_read_iops"] for c in ceil]
    print(f"| page-cache read, dd (MiB/s) | {cell(pc)} | " + " | ".join(
        "read " + cell([s["seq_read_mibs"] / c for s, c in zip(samples[n], pc, strict=True)], "{:.2f}")
        + ", write " + cell([s["seq_write_mibs"] / c for s, c in zip(samples[n], pc, strict=True)], "{:.2f}")
        for n in names) + " |")
    print(f"| local 4k read, qemu-img bench on the file (IOPS) | {cell(lr)} | " + " | ".join(
        cell([s["rand4k_read_iops"] / c for s, c in zip(samples[n], lr, strict=True)], "{:.2f}")
        for n in names) + " |")


if __name__ == "__main__":
    sys.exit(main())
