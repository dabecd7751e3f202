"""tests/bench/plot.py: the committed benchmark JSON makes the README's plots,
qmpd and QEMU on the same axes, with the machine and the date on each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.tools import IN_CI

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "bench" / "results"
PLOTS = ["qmp-latency.svg", "nbd-throughput.svg", "migration-downtime.svg",
         "activation-per-node.svg"]


@pytest.fixture(scope="module", autouse=True)
def matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("matplotlib (the 'bench' extra) is required in CI")
        pytest.skip("matplotlib is not installed (pip install .[bench])")


def test_plots_from_the_committed_data(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "tests" / "bench" / "plot.py"),
         "--qmp", str(DATA / "qmp.json"), "--nbd", str(DATA / "nbd.json"),
         "--migration", str(DATA / "migration.json"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=120).stdout
    assert sorted(Path(line).name for line in out.split()) == sorted(PLOTS)
    for name in PLOTS:
        svg = (tmp_path / name).read_text()
        source = "migration" if "migration" in name or "activation" in name else name.split("-")[0]
        machine = json.loads((DATA / f"{source}.json").read_text())["machine"]
        assert svg.startswith("<?xml") and "<svg" in svg
        assert ">qmpd<" in svg or "qmpd: " in svg, name
        assert "QEMU 7.2 (" in svg, name
        assert machine["date"] in svg and machine["cpu"] in svg, name
        # The README shows the committed copy: it exists beside its data.
        assert (DATA / name).is_file(), name


def test_a_missing_input_is_refused(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(REPO / "tests" / "bench" / "plot.py"),
                          "--out", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "give at least one of" in res.stderr
