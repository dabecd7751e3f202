#!/usr/bin/env python3
"""Where activation's time goes, per node: syscalls, thread hops, Python, wall and CPU.

A measuring script, not a test.  In process, as ``invalidate_bench.py`` does:
K qcow2 nodes (each over a file node) opened inactive, as on a migration
destination, then ``BlockLayer.activate_all()``, measured in separate runs
(each instrument disturbs the others):

  plain     wall and CPU per node: the process (all threads) and the event
            loop's thread alone; medians of ``--reps``
  hops      jobs handed to the I/O thread pool (``IOPool.run`` wrapped by this
            script, counted by function), loop wake-ups from other threads
            (``call_soon_threadsafe``), ``run_in_executor`` calls, and the
            pool threads' CPU inside those jobs
  python    cProfile of the loop thread and of every pool job: the top
            functions by own time, per node (``--top``)
  syscalls  ``strace -f -c`` attached to this process (every thread) for the
            activation only: calls per node by kind (skipped without strace)

``--daemons K`` adds a real handover with K nodes per target (``qemu``,
``qmpd``; ``migration_bench``'s source/destination pair): ``strace -f -c``
attached to the destination from ``migrate-incoming`` until the source
completes; syscalls per node by kind side by side (those of the migration
stream and the QMP commands are included: compare at large K).

Nothing in qmpd changes: the wrappers live here and are undone after each run.

    python tests/bench/activation_profile.py                  # K = 1, 100, 1000
    python tests/bench/activation_profile.py --ks 100 --top 25 --daemons 100
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import functools
import inspect
import os
import pstats
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qmpd.block.iopool import IOPool
from tests.bench.invalidate_bench import close, open_inactive
from tests.bench.migration_bench import migrate, pair
from tests.bench.startup_bench import check_checkout, make_images

Probe = dict[str, Any]
Instrument = Callable[[], contextlib.AbstractContextManager[Probe]]


# --- instruments: each a context manager around the activation -------------------------


@contextlib.contextmanager
def plain() -> Iterator[Probe]:
    probe: Probe = {}
    wall, cpu, loop_cpu = time.perf_counter(), time.process_time(), time.thread_time()
    yield probe
    probe["wall ms"] = (time.perf_counter() - wall) * 1e3
    probe["CPU ms, all threads"] = (time.process_time() - cpu) * 1e3
    probe["CPU ms, loop thread"] = (time.thread_time() - loop_cpu) * 1e3


def job_name(fn: Callable[..., Any]) -> str:
    inner = fn.func if isinstance(fn, functools.partial) else fn
    module = getattr(inner, "__module__", None) or ""
    name = getattr(inner, "__qualname__", None) or repr(inner)
    return f"{module.rsplit('.', 1)[-1]}.{name}" if module else name


@contextlib.contextmanager
def patched(owner: Any, name: str, wrapper: Callable[[Any], Any]) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, wrapper(original))
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def pool_jobs(on_job: Callable[[str], None],
              wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Every ``IOPool.run*`` method wrapped: ``on_job`` gets each job's name, ``wrap`` its function.

    A method whose first argument is no function (a batch, say) is counted by
    its own name and left alone.
    """
    def wrapper(name: str, original: Any) -> Any:
        def convert(args: tuple[Any, ...]) -> tuple[Any, ...]:
            if args and callable(args[0]):
                on_job(job_name(args[0]))
                return (wrap(args[0]), *args[1:])
            on_job(f"IOPool.{name}")
            return args

        if inspect.iscoroutinefunction(original):
            async def wrapped_async(self: IOPool, *args: Any, **kw: Any) -> Any:
                return await original(self, *convert(args), **kw)
            return wrapped_async

        def wrapped(self: IOPool, *args: Any, **kw: Any) -> Any:
            return original(self, *convert(args), **kw)
        return wrapped

    with contextlib.ExitStack() as stack:
        for name, value in list(vars(IOPool).items()):
            if name.startswith("run") and inspect.isfunction(value):
                stack.enter_context(patched(IOPool, name, functools.partial(wrapper, name)))
        yield


@contextlib.contextmanager
def hops() -> Iterator[Probe]:
    """Count the pool jobs (by function), wake-ups of the loop and executor calls."""
    jobs: collections.Counter[str] = collections.Counter()
    counts = {"wakeups": 0, "executor": 0, "pool CPU": 0.0, "pool wall": 0.0}
    lock = threading.Lock()

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def job(*args: Any, **kw: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kw)
            finally:
                with lock:
                    counts["pool CPU"] += time.thread_time() - cpu
                    counts["pool wall"] += time.perf_counter() - wall
        return job

    def count(name: str) -> None:
        with lock:
            jobs[name] += 1

    def threadsafe(original: Any) -> Any:
        def wrapped(self: Any, *args: Any, **kw: Any) -> Any:
            with lock:
                counts["wakeups"] += 1
            return original(self, *args, **kw)
        return wrapped

    def executor(original: Any) -> Any:
        def wrapped(self: Any, *args: Any, **kw: Any) -> Any:
            counts["executor"] += 1
            return original(self, *args, **kw)
        return wrapped

    loop_class = type(asyncio.get_running_loop())
    owner = next(c for c in loop_class.__mro__ if "call_soon_threadsafe" in c.__dict__)
    owner_ex = next(c for c in loop_class.__mro__ if "run_in_executor" in c.__dict__)
    probe: Probe = {}
    with pool_jobs(count, timed), patched(owner, "call_soon_threadsafe", threadsafe), \
            patched(owner_ex, "run_in_executor", executor):
        yield probe
    probe.update({"pool jobs": sum(jobs.values()), "jobs": dict(jobs),
                  "loop wake-ups from threads": counts["wakeups"],
                  "run_in_executor calls": counts["executor"],
                  "pool CPU ms": counts["pool CPU"] * 1e3,
                  "pool wall ms": counts["pool wall"] * 1e3})


@contextlib.contextmanager
def python() -> Iterator[Probe]:
    """cProfile the loop thread, and each pool job in the thread that runs it."""
    main = cProfile.Profile()
    workers: list[cProfile.Profile] = []
    local = threading.local()

    def profiled(fn: Callable[..., Any]) -> Callable[..., Any]:
        def job(*args: Any, **kw: Any) -> Any:
            prof = getattr(local, "prof", None)
            if prof is None:
                prof = local.prof = cProfile.Profile()
                workers.append(prof)
            prof.enable()
            try:
                return fn(*args, **kw)
            finally:
                prof.disable()
        return job

    probe: Probe = {}
    with pool_jobs(lambda name: None, profiled):
        main.enable()
        try:
            yield probe
        finally:
            main.disable()
    probe["loop"] = pstats.Stats(main)
    if workers:
        pool = pstats.Stats(workers[0])
        for prof in workers[1:]:
            pool.add(prof)
        probe["pool"] = pool


def parse_strace(text: str) -> dict[str, int]:
    """``strace -c`` output: calls by syscall."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) in (5, 6) and fields[0][0].isdigit() and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    return calls


@contextlib.contextmanager
def strace_attached(pid: int, out: Path) -> Iterator[Probe]:
    """``strace -f -c`` on every thread of ``pid`` for the duration of the block."""
    proc = subprocess.Popen(["strace", "-f", "-c", "-o", str(out), "-p", str(pid)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    if "attached" not in first:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"strace could not attach to {pid}: {first.strip()}")
    probe: Probe = {}
    try:
        yield probe
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    probe["syscalls"] = parse_strace(out.read_text())


def syscalls(work: Path) -> Instrument:
    return lambda: strace_attached(os.getpid(), work / f"strace-{time.monotonic_ns()}.txt")


# --- runs -------------------------------------------------------------------------------


async def activation(paths: list[Path], instrument: Instrument) -> Probe:
    layer = await open_inactive(paths)
    try:
        with instrument() as probe:
            await layer.activate_all()
    finally:
        await close(layer)
    return probe


def in_process(paths: list[Path], reps: int, work: Path) -> dict[str, Any]:
    k = len(paths)
    runs = [asyncio.run(activation(paths, plain)) for _ in range(reps)]
    result: dict[str, Any] = {m: statistics.median(r[m] for r in runs) / k for m in runs[0]}
    hop = asyncio.run(activation(paths, hops))
    result.update({m: v / k for m, v in hop.items() if m != "jobs"})
    result["jobs"] = {name: n / k for name, n in hop["jobs"].items()}
    profiled = asyncio.run(activation(paths, python))
    result["loop profile"], result["pool profile"] = profiled["loop"], profiled.get("pool")
    if shutil.which("strace"):
        traced = asyncio.run(activation(paths, syscalls(work)))["syscalls"]
        idle = asyncio.run(nothing(syscalls(work)))["syscalls"]
        result["syscalls"] = {name: max(n - idle.get(name, 0), 0) / k
                              for name, n in traced.items()}
    return result


async def nothing(instrument: Instrument) -> Probe:
    """The instrument around no work: strace's own attach and detach, to subtract."""
    with instrument() as probe:
        await asyncio.sleep(0)
    return probe


def handover(target: str, paths: list[Path], work: Path) -> dict[str, Any]:
    """A real migration to ``target``'s destination under strace."""
    with pair(target, paths, work) as (src, dst):
        out = work / f"strace-{target}-{time.monotonic_ns()}.txt"
        with strace_attached(dst.proc.pid, out) as probe:
            times = migrate(src, dst, target)
    k = len(paths)
    return {"stop_to_resume under strace": times["stop_to_resume"],
            "syscalls": {name: n / k for name, n in probe["syscalls"].items()}}


# --- report -----------------------------------------------------------------------------

SCALARS = [("wall ms", "wall"), ("CPU ms, all threads", "CPU, all threads"),
           ("CPU ms, loop thread", "CPU, loop thread"), ("pool jobs", "pool jobs (thread hops)"),
           ("loop wake-ups from threads", "loop wake-ups from threads"),
           ("run_in_executor calls", "run_in_executor calls"),
           ("pool CPU ms", "CPU in pool jobs"),
           ("pool wall ms", "wall in pool jobs, summed over threads")]


def merged_rows(per_k: dict[int, dict[str, float]], limit: int) -> list[tuple[str, list[float]]]:
    names = collections.Counter[str]()
    for counts in per_k.values():
        names.update(counts)
    return [(name, [per_k[k].get(name, 0.0) for k in per_k])
            for name, _ in names.most_common(limit)]


def report(results: dict[int, dict[str, Any]], top: int) -> None:
    ks = list(results)
    head = f"{'per node (ms, or counts)':40}" + "".join(f" {'K=' + str(k):>10}" for k in ks)
    print(head)
    for key, label in SCALARS:
        print(f"{label:40}" + "".join(f" {results[k][key]:10.3f}" for k in ks))
    print("\npool jobs per node, by function")
    for name, values in merged_rows({k: results[k]["jobs"] for k in ks}, 12):
        print(f"  {name:38}" + "".join(f" {v:10.2f}" for v in values))
    if all("syscalls" in results[k] for k in ks):
        total = [sum(results[k]["syscalls"].values()) for k in ks]
        print("\nsyscalls per node (strace -f -c, all threads; less those of an empty run)")
        print(f"  {'total':38}" + "".join(f" {v:10.2f}" for v in total))
        for name, values in merged_rows({k: results[k]["syscalls"] for k in ks}, 15):
            print(f"  {name:38}" + "".join(f" {v:10.2f}" for v in values))
    else:
        print("\nsyscalls: strace not found, skipped")
    k = ks[-1]
    print_profile(results[k]["loop profile"], k, top,
                  f"Python, K={k}: the event loop's thread, top {top} functions by own time "
                  f"(cProfile)")
    if results[k]["pool profile"] is not None:
        print_profile(results[k]["pool profile"], k, max(top // 3, 5),
                      f"Python, K={k}: the pool jobs (their times include waits for the GIL "
                      f"and the CPU)")


def print_profile(stats: pstats.Stats, k: int, top: int, title: str) -> None:
    """The top functions by own time, per node; this script's wrappers left out."""
    rows = [(where, row) for where, row in stats.stats.items()  # type: ignore[attr-defined]
            if where[0] != __file__]
    rows.sort(key=lambda item: item[1][2], reverse=True)
    print(f"\n{title}")
    print(f"  {'own us/node':>11} {'cum us/node':>11} {'calls/node':>10}  function")
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in rows[:top]:
        where = f"{Path(filename).name}:{line}({func})" if line else func
        print(f"  {tottime / k * 1e6:11.1f} {cumtime / k * 1e6:11.1f} {ncalls / k:10.2f}  {where}")


def report_daemons(results: dict[str, dict[str, Any]], k: int) -> None:
    targets = list(results)
    print(f"\nhandover with K={k}: destination syscalls per node "
          f"(strace -f -c from migrate-incoming to completed)")
    print(f"  {'':38}" + "".join(f" {t:>10}" for t in targets))
    print(f"  {'STOP->RESUME ms under strace':38}" + "".join(
        f" {results[t]['stop_to_resume under strace']:10.1f}" for t in targets))
    print(f"  {'total':38}" + "".join(
        f" {sum(results[t]['syscalls'].values()):10.2f}" for t in targets))
    merged = {i: results[t]["syscalls"] for i, t in enumerate(targets)}
    for name, values in merged_rows(merged, 20):
        print(f"  {name:38}" + "".join(f" {v:10.2f}" for v in values))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="1,100,1000")
    ap.add_argument("--reps", type=int, default=5, help="plain runs per K (default 5)")
    ap.add_argument("--top", type=int, default=20, help="Python functions shown")
    ap.add_argument("--daemons", type=int, default=0,
                    help="also a real handover with this many nodes, qemu and qmpd, under strace")
    ap.add_argument("--dir", default="/tmp")
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (min(hard, max(soft, 4 * max([*ks, args.daemons]) + 256)), hard))
    work = Path(tempfile.mkdtemp(prefix="qactprof", dir=args.dir))
    try:
        print(f"qmpd from {check_checkout(work)}", flush=True)
        images = make_images(work, max([*ks, args.daemons]))
        os.sync()  # as on a destination: no dirty page cache of ours for activation to flush
        results = {k: in_process(images[:k], args.reps, work) for k in ks}
        print(f"in-process BlockLayer.activate_all() of K qcow2-over-file nodes, "
              f"plain figures medians of {args.reps}")
        report(results, args.top)
        if args.daemons:
            targets = ["qemu", "qmpd"] if shutil.which("qemu-system-x86_64") else ["qmpd"]
            if not shutil.which("strace"):
                print("\n--daemons needs strace: skipped")
            else:
                report_daemons({t: handover(t, images[:args.daemons], work) for t in targets},
                               args.daemons)
        print(f"\n(load average {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
