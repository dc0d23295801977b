"""Every benchmark still runs: each ``bench/bench_*.py`` that takes ``--quick`` runs a tiny version of
itself (small shapes, one or two runs, nothing written) and prints its table. The figures themselves are
not checked here -- benchmarks are not timed tests -- only that the code paths they drive work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import run_all

ROOT = Path(__file__).resolve().parent.parent
QUICK_MODULES = [m for m in run_all.discover() if run_all.takes_quick(m)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("module", QUICK_MODULES)
def test_benchmark_runs_in_quick_mode_and_prints_its_table(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", f"bench.{module}", "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=280)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "| --- |" in out.stdout  # the table


def test_the_runner_finds_the_figures():
    modules = run_all.discover()
    for figure in ("bench_wire", "bench_http", "bench_pg", "bench_train", "bench_bytes"):
        assert figure in modules
    assert not any("gpu_check" in m for m in modules)
