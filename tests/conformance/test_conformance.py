"""Differential conformance: qmpd must answer every scripted case like QEMU 7.2.

For each case in ``cases/``:

* ``test_qmpd_matches_qemu[case]`` runs qmpd and compares its transcript with
  a live ``qemu-system-x86_64 -M none`` run (both run at the same time), or,
  when QEMU is not installed or the case is marked ``slow``, with the stored
  golden transcript in ``golden/``.  Steps listed under ``known_differences``
  are left out, and each of them must name its README section.
* ``test_golden_matches_live_qemu[case]`` checks that ``golden/<case>.jsonl``
  still matches what live QEMU does, so the goldens cannot rot.  Without QEMU
  it is skipped, or fails when ``CI=true``.

Cases marked ``qmpd_slow`` run only with ``QMPD_SLOW=1``.  See README.md.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qmpd_conformance_harness", _HERE / "harness.py")
assert _spec is not None and _spec.loader is not None
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness
_spec.loader.exec_module(harness)

CASES = harness.all_case_names()
QEMU = harness.qemu_binary()
SLOW = os.environ.get("QMPD_SLOW") == "1"
CI = os.environ.get("CI", "").lower() == "true"

# Live QEMU transcripts made by test_qmpd_matches_qemu, reused by
# test_golden_matches_live_qemu so every case starts QEMU only once.
_live_qemu: dict[str, list[dict[str, Any]]] = {}


def _no_qemu(what: str) -> None:
    reason = f"{harness.QEMU_NAME} is not on PATH: {what} skipped"
    if CI:
        pytest.fail(reason + " (CI=true: QEMU is required)")
    pytest.skip(reason)


def _report(title: str, diffs: list[str]) -> str:
    return f"{title}: {len(diffs)} differing step(s)\n\n" + "\n\n".join(diffs)


def test_case_inventory() -> None:
    """Every case has a golden, every golden a case; known differences are documented."""
    goldens = sorted(p.stem for p in harness.GOLDEN_DIR.glob("*.jsonl"))
    assert CASES, "no cases found"
    assert goldens == CASES, "cases/ and golden/ disagree"
    problems = {n: harness.check_known_differences(harness.load_case(n)) for n in CASES}
    problems = {n: p for n, p in problems.items() if p}
    assert not problems, problems


@pytest.mark.parametrize("name", CASES)
def test_qmpd_matches_qemu(name: str) -> None:
    case = harness.load_case(name)
    if case.get("qmpd_slow") and not SLOW:
        pytest.skip("slow case: set QMPD_SLOW=1 to run it")
    live = bool(QEMU) and not case.get("slow")
    if live:
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            ref_future = ex.submit(harness.run_case, case, "qemu")
            act_future = ex.submit(harness.run_case, case, "qmpd")
            ref = ref_future.result()
            act = act_future.result()
        _live_qemu[name] = ref
        ref_name = "QEMU"
    else:
        ref = harness.read_transcript(harness.GOLDEN_DIR / f"{name}.jsonl")
        act = harness.run_case(case, "qmpd")
        ref_name = "golden"
    diffs = harness.compare(ref, act, case, exclude=harness.known_difference_steps(case),
                            names=(ref_name, "qmpd"))
    if diffs:
        pytest.fail(_report(f"qmpd differs from {ref_name} in case {name}", diffs),
                    pytrace=False)


@pytest.mark.qemu
@pytest.mark.parametrize("name", CASES)
def test_golden_matches_live_qemu(name: str) -> None:
    case = harness.load_case(name)
    if case.get("slow"):
        pytest.skip("QEMU needs too long for this case; recheck with "
                    "`harness.py check --slow " + name + "`")
    if not QEMU:
        _no_qemu("golden freshness check")
    live = _live_qemu.pop(name, None)
    if live is None:
        live = harness.run_case(case, "qemu")
    golden = harness.read_transcript(harness.GOLDEN_DIR / f"{name}.jsonl")
    diffs = harness.compare(golden, live, case, names=("golden", "QEMU"))
    if diffs:
        pytest.fail(_report(f"golden/{name}.jsonl no longer matches live QEMU "
                            "(regenerate with `harness.py capture`)", diffs), pytrace=False)
