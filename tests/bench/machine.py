"""The machine and date a benchmark ran on, for its ``--json`` output (and the plots)."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from typing import Any


def describe() -> dict[str, Any]:
    """CPU model and count, kernel, Python, QEMU's version and the UTC date and time."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    qemu = ""
    if shutil.which("qemu-system-x86_64"):
        out = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                             text=True, check=False).stdout
        qemu = out.splitlines()[0] if out else ""
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),  # the machine's, whatever the bench pins itself to
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def drop_caches() -> bool:
    """Write back and drop the page cache before a run (root only; False otherwise).

    On the VM these benchmarks were tuned on, runs that follow others were
    bimodal (some 2 to 3 times slower, for QEMU and qmpd alike) until the
    page cache was dropped between them."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True
