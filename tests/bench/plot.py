#!/usr/bin/env python3
"""Benchmark JSON to SVG plots: qmpd and QEMU on the same axes, machine and date on each.

Needs matplotlib (``pip install .[bench]``; not a runtime dependency).  Reads
what the benchmarks write with ``--json``:

    python tests/bench/qmp_bench.py --json qmp.json
    python tests/bench/nbd_bench.py --json nbd.json
    python tests/bench/migration_bench.py --parts migration --json migration.json
    python tests/bench/plot.py --qmp qmp.json --nbd nbd.json --migration migration.json \\
        --out tests/bench/results

and writes, for each file given:

  qmp-latency.svg          QMP round-trip latency (p50, p99) and server CPU per
                           command, qmpd against qemu-system-x86_64 -M none
  nbd-throughput.svg       NBD sequential MiB/s and random 4k IOPS, qmpd against
                           qemu-storage-daemon
  migration-downtime.svg   handover downtime against K nodes (the source's
                           query-migrate downtime, and STOP -> RESUME), log-log
  activation-per-node.svg  the destination's MIGRATION active -> RESUME per node
                           against K (activating K nodes, divided by K)

Medians are plotted, with the range of the repetitions as error bars.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("svg")
import matplotlib.pyplot as plt

#: One colour per program, on every plot.
COLOURS = {"qmpd": "#1f77b4", "qemu": "#d62728", "qsd": "#d62728"}
LABELS = {"qmpd": "qmpd", "qemu": "QEMU 7.2 (qemu-system-x86_64 -M none)",
          "qsd": "QEMU 7.2 (qemu-storage-daemon)"}


def machine_note(doc: dict[str, Any]) -> str:
    """The machine and date line every plot carries."""
    m = doc.get("machine") or {}
    first = [m.get("cpu", "unknown CPU"), f"{m.get('cpus', '?')} CPUs",
             f"Linux {m.get('kernel', '?')}"]
    second = [f"run {m.get('date', 'at an unknown date')}", f"Python {m.get('python', '?')}"]
    if m.get("qemu"):
        second.append(m["qemu"].replace("QEMU emulator version", "QEMU"))
    return " · ".join(first) + "\n" + " · ".join(second)


def _finish(fig: Any, doc: dict[str, Any], out: Path) -> Path:
    fig.text(0.01, 0.01, machine_note(doc), fontsize=7, color="#555")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    # No timestamp or random ids in the file: the same data gives the same SVG.
    fig.savefig(out, format="svg", metadata={"Date": None})
    plt.close(fig)
    return out


def _spread(values: list[float]) -> tuple[float, float, float]:
    """Median, and the distances down to the minimum and up to the maximum."""
    med = statistics.median(values)
    return med, med - min(values), max(values) - med


def _bars(ax: Any, groups: list[str], series: dict[str, list[list[float]]], unit: str) -> None:
    """Grouped bars: one group per measurement, one bar per program."""
    width = 0.8 / max(1, len(series))
    for i, (program, per_group) in enumerate(series.items()):
        xs, meds, lows, highs = [], [], [], []
        for g, values in enumerate(per_group):
            if not values:
                continue
            med, low, high = _spread(values)
            xs.append(g + (i - (len(series) - 1) / 2) * width)
            meds.append(med)
            lows.append(low)
            highs.append(high)
        ax.bar(xs, meds, width, yerr=[lows, highs], capsize=3,
               color=COLOURS.get(program, "#777"), label=LABELS.get(program, program))
        for x, med in zip(xs, meds, strict=True):
            ax.annotate(f"{med:,.0f}" if med >= 10 else f"{med:.2g}", (x, med),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(unit)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_qmp(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """qmp_bench.py --json: latency and server CPU per command."""
    targets = [t for t in ("qmpd", "qemu") if t in doc["meta"]["targets"]]

    def values(key: str, target: str) -> list[float]:
        return [r["results"][target][key] for r in doc["reps"]
                if r["results"].get(target, {}).get(key) is not None]

    latency = [("seq_version_p50_us", "query-version\np50"),
               ("seq_version_p99_us", "query-version\np99"),
               ("seq_status_p50_us", "query-status\np50"),
               ("req1024_p50_us", "1 KiB request\np50"),
               ("multi_p50_us", f"{doc['meta']['args']['clients']} clients\np50")]
    cpu = [("seq_version_server_cpu_us", "query-version"),
           ("seq_status_server_cpu_us", "query-status"),
           ("pipe_all_server_cpu_us", "pipelined")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2),
                                      gridspec_kw={"width_ratios": [5, 3]})
    _bars(left, [label for _, label in latency],
          {t: [values(k, t) for k, _ in latency] for t in targets}, "µs (lower is better)")
    left.set_title("QMP round-trip latency", fontsize=10)
    _bars(right, [label for _, label in cpu],
          {t: [values(k, t) for k, _ in cpu] for t in targets}, "µs (lower is better)")
    right.set_title("server CPU per command", fontsize=10)
    return [_finish(fig, doc, out_dir / "qmp-latency.svg")]


def plot_nbd(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """nbd_bench.py --json: sequential throughput and 4k IOPS."""
    samples = doc["samples"]
    targets = [t for t in ("qmpd", "qsd") if t in samples]

    def values(key: str, target: str) -> list[float]:
        return [s[key] for s in samples[target] if s.get(key) is not None]

    seq = [("seq_read_mibs", "sequential read"), ("seq_write_mibs", "sequential write")]
    rand = [("rand4k_read_iops", "random 4k read"), ("rand4k_write_iops", "random 4k write")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    _bars(left, [label for _, label in seq],
          {t: [values(k, t) for k, _ in seq] for t in targets}, "MiB/s (higher is better)")
    left.set_title(f"NBD throughput ({doc['args']['size'] >> 20} MiB, nbdcopy)", fontsize=10)
    _bars(right, [label for _, label in rand],
          {t: [values(k, t) for k, _ in rand] for t in targets}, "IOPS (higher is better)")
    right.set_title("NBD 4k requests", fontsize=10)
    return [_finish(fig, doc, out_dir / "nbd-throughput.svg")]


def _by_k(doc: dict[str, Any], target: str, metric: str,
          per_node: bool = False) -> tuple[list[int], list[float], list[float], list[float]]:
    ks, meds, lows, highs = [], [], [], []
    for k_text, runs in sorted(doc["migration"].get(target, {}).items(), key=lambda i: int(i[0])):
        k = int(k_text)
        vals = [r[metric] / (k if per_node else 1) for r in runs if r.get(metric) is not None]
        if not vals:
            continue
        med, low, high = _spread(vals)
        ks.append(k)
        meds.append(med)
        lows.append(low)
        highs.append(high)
    return ks, meds, lows, highs


def _lines(ax: Any, doc: dict[str, Any], metrics: list[tuple[str, str, str]],
           per_node: bool = False) -> None:
    for target in ("qmpd", "qemu"):
        for metric, text, style in metrics:
            ks, meds, lows, highs = _by_k(doc, target, metric, per_node)
            if ks:
                ax.errorbar(ks, meds, yerr=[lows, highs], capsize=3, marker="o",
                            linestyle=style, color=COLOURS[target],
                            label=f"{LABELS[target]}: {text}")
    ax.set_xscale("log")
    if per_node:
        ax.set_yscale("log")
    else:
        # query-migrate's downtime is whole ms, often 0 for a few nodes: linear below 1 ms.
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0)
    ax.set_xlabel("K (qcow2 nodes handed over)")
    ax.grid(which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_migration(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """migration_bench.py --json: downtime against K, and activation per node."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, doc, [("downtime", "downtime (source's query-migrate)", "-"),
                     ("stop_to_resume", "source STOP -> destination RESUME", "--")])
    ax.set_ylabel("ms (lower is better)")
    ax.set_title("Migration handover downtime against K", fontsize=10)
    paths = [_finish(fig, doc, out_dir / "migration-downtime.svg")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, doc, [("dst_active_to_resume", "destination active -> RESUME, per node", "-")],
           per_node=True)
    ax.set_ylabel("ms per node (lower is better)")
    ax.set_title("Activation on the destination, per node", fontsize=10)
    paths.append(_finish(fig, doc, out_dir / "activation-per-node.svg"))
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qmp", type=Path, help="qmp_bench.py --json output")
    ap.add_argument("--nbd", type=Path, help="nbd_bench.py --json output")
    ap.add_argument("--migration", type=Path, help="migration_bench.py --json output")
    ap.add_argument("--out", type=Path, default=Path("tests/bench/results"), help="directory for the SVGs")
    args = ap.parse_args(argv)
    if not (args.qmp or args.nbd or args.migration):
        ap.error("give at least one of --qmp, --nbd, --migration")
    args.out.mkdir(parents=True, exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "qmpd"  # stable element ids from one run to the next
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable files
    written: list[Path] = []
    for path, plot in ((args.qmp, plot_qmp), (args.nbd, plot_nbd),
                       (args.migration, plot_migration)):
        if path is not None:
            written += plot(json.loads(path.read_text()), args.out)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
