"""Every benchmark's ``--quick`` version runs to the end, prints its result line in the agreed form, and
the optimised way agrees with the naive way. Speed itself is never asserted here: ratios are measured
by the full benchmarks and reported in the issue notes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(-?[0-9.]+(?:e[-+][0-9]+)?|nan)"


def run_quick(name: str, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", "--quick", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["patch_sweep", "step_importance", "hooked_loop"])
def test_speed_benchmarks_agree_with_the_naive_way(name):
    last = run_quick(name)
    match = re.fullmatch(rf"speedup {NUMBER}x max_abs_diff {NUMBER}", last)
    assert match, last
    assert float(match.group(2)) <= 1e-4, last


def test_memory_benchmark_reports_a_ratio():
    last = run_quick("memory")
    match = re.fullmatch(rf"memory_ratio {NUMBER}", last)
    assert match and float(match.group(1)) > 0, last


@pytest.mark.parametrize("model", ["bench", "toy"])
def test_attribution_benchmark_reports_rank_agreement(model):
    last = run_quick("attribution", "--model", model)
    match = re.fullmatch(rf"speedup {NUMBER}x spearman {NUMBER} top10_overlap {NUMBER}", last)
    assert match, last
    assert -1 <= float(match.group(2)) <= 1 and 0 <= float(match.group(3)) <= 1, last
