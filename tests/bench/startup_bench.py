#!/usr/bin/env python3
"""Start-up and node opening: qmpd next to qemu-storage-daemon and QEMU 7.2 (not a pytest test).

Issue 10's non-migration targets, measured in one run on one machine:

* ``exec->listening``: from exec to a QMP socket that answers with its greeting,
  with one ``--chardev socket,...,server=on,wait=off --monitor`` (the default
  configuration of each), and the idle RSS a second later;
* ``first add``: the first ``blockdev-add`` of a qcow2 over a file node in a
  fresh daemon;
* ``add per node``: K more such ``blockdev-add``, sequential round trips, per node;
* ``query-named-block-nodes`` with K qcow2 nodes (and their K file nodes) open.

Targets: ``qmpd`` (this checkout), ``qsd`` (qemu-storage-daemon), ``qemu``
(qemu-system-x86_64 -M none).  Each runs ``--reps`` times, in rotating order;
medians, and the ratio qmpd/target taken per repetition (then the median).
``migration_bench.py`` runs the same measurement (this module's :func:`one_run`)
next to the migration downtimes, with the issue's targets.

Usage: python tests/bench/startup_bench.py [--reps 5] [--nodes 1000] [--dir /dev/shm]
           [--targets qmpd,qsd,qemu]

The helpers here (checkout check, children's environment, images, argv) are
shared by the other start-and-measure benches of this directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.support.qmp import QmpClient

REPO = Path(__file__).resolve().parents[2]
QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
BINARIES = {"qemu": QEMU, "qsd": QSD}


# --- shared helpers -------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """The environment of a ``python -m qmpd`` child: this checkout first on the path."""
    env = dict(os.environ)
    rest = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + rest if rest else "")
    return env


def check_checkout(cwd: Path) -> str:
    """Where the qmpd package of this process and of its children comes from: this checkout.

    Children run ``python -m qmpd`` with :func:`child_env` in ``cwd`` (``-m``
    puts the working directory first on the path, so never a checkout's root).
    Exits if either would import another copy (an installed or editable qmpd).
    Compiles the package's bytecode first, as installing it would.
    """
    import compileall

    import qmpd

    # pip compiles an installed wheel's bytecode; without it (a fresh checkout,
    # or PYTHONDONTWRITEBYTECODE) every start would compile qmpd's sources again.
    compileall.compile_dir(str(REPO / "qmpd"), quiet=1)
    here = Path(qmpd.__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", "import qmpd; print(qmpd.__file__)"],
                         env=child_env(), cwd=cwd, capture_output=True, text=True, check=True)
    child = Path(out.stdout.strip()).resolve().parent
    if here != REPO / "qmpd" or child != REPO / "qmpd":
        raise SystemExit(f"qmpd imported from {here} (bench) and {child} (daemons), "
                         f"not from this checkout {REPO}")
    return str(child)


def make_images(work: Path, count: int, size: str = "1G") -> list[Path]:
    """``count`` empty qcow2 images of ``size`` in ``work/images`` (made once,
    reused by later calls)."""
    base = work / "images"
    base.mkdir(exist_ok=True)
    template = base / f"template-{size}.qcow2"
    if not template.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), size],
                       check=True)
    images = []
    for i in range(count):
        image = base / f"img-{size}-{i}.qcow2"
        if not image.exists():
            shutil.copyfile(template, image)
        images.append(image)
    return images


def qcow2_node(i: int, image: Path) -> dict[str, object]:
    """blockdev-add arguments: qcow2 ``q<i>`` over file ``f<i>``."""
    return {"driver": "qcow2", "node-name": f"q{i}",
            "file": {"driver": "file", "node-name": f"f{i}", "filename": str(image)}}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def argv(target: str, sock: Path) -> list[str]:
    """Each target's command line with one QMP monitor on a unix socket."""
    chardev = f"socket,id=m0,path={sock},server=on,wait=off"
    if target == "qsd":
        return [QSD, "--chardev", chardev, "--monitor", "chardev=m0"]
    if target == "qemu":
        return [QEMU, "-M", "none", "-nodefaults", "-display", "none",
                "-chardev", chardev, "-mon", "chardev=m0,mode=control"]
    return [sys.executable, "-m", "qmpd", "--chardev", chardev, "--monitor", "chardev=m0"]


def rotated(targets: list[str], rep: int) -> list[str]:
    """The order of the targets in repetition ``rep``: rotated, so noise hits all alike."""
    shift = rep % len(targets)
    return targets[shift:] + targets[:shift]


# --- the measurement ------------------------------------------------------------------


def one_run(target: str, work: Path, images: list[Path], settle: float = 1.0
            ) -> dict[str, float]:
    """Start ``target`` fresh; time exec->greeting, idle RSS, the adds and the query."""
    sock = work / f"{target}.sock"
    sock.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(argv(target, sock), env=child_env(), cwd=work,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        client = QmpClient(str(sock), timeout=60, wait=30, proc=proc, check_schema=False)
        listening = time.perf_counter() - start
        time.sleep(settle)
        idle_rss = rss_kib(proc.pid)
        client.negotiate()
        t = time.perf_counter()
        client.ok("blockdev-add", qcow2_node(0, images[0]))
        first = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(1, len(images)):
            client.ok("blockdev-add", qcow2_node(i, images[i]))
        per_node = (time.perf_counter() - t) / max(len(images) - 1, 1)
        queries = []
        for _ in range(5):
            t = time.perf_counter()
            client.ok("query-named-block-nodes")
            queries.append(time.perf_counter() - t)
        client.cmd("quit")
        client.close()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"exec->listening ms": listening * 1e3, "idle RSS MiB": idle_rss / 1024,
            "first add ms": first * 1e3, "add per node ms": per_node * 1e3,
            "query-named-block-nodes ms": statistics.median(queries) * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--targets", default="qmpd,qsd,qemu",
                    help="qmpd first; the others are compared with it (default qmpd,qsd,qemu)")
    args = ap.parse_args()
    targets = args.targets.split(",")
    missing = [BINARIES[t] for t in targets if t in BINARIES and shutil.which(BINARIES[t]) is None]
    if missing or shutil.which("qemu-img") is None or targets[0] != "qmpd":
        print(f"needs qmpd first in --targets, qemu-img and {', '.join(missing) or 'QEMU 7.2'}",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="startup-bench.", dir=args.dir or None))
    try:
        print(f"qmpd from {check_checkout(work)}")
        images = make_images(work, args.nodes)
        runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        for rep in range(args.reps):
            for target in rotated(targets, rep):
                runs[target].append(one_run(target, work, images))
        metrics = list(runs["qmpd"][0])
        others = targets[1:]
        print(f"K = {args.nodes} qcow2-over-file nodes, {args.reps} repetitions, medians")
        print(f"{'metric':30}" + "".join(f" {t:>10}" for t in targets)
              + "".join(f" {'qmpd/' + t:>10}" for t in others))
        for m in metrics:
            line = f"{m:30}" + "".join(
                f" {statistics.median(r[m] for r in runs[t]):10.2f}" for t in targets)
            for t in others:
                ratio = statistics.median(a[m] / b[m] for a, b in
                                          zip(runs["qmpd"], runs[t], strict=True) if b[m] > 0)
                line += f" {ratio:9.2f}x"
            print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
