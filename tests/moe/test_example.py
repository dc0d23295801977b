"""The README's MoE example runs as shipped: two gloo ranks, DeepEP's V2 API by hand, then MoELayer training."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_moe_example_runs_on_two_gloo_ranks_and_checks_itself():
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    done = subprocess.run([sys.executable, "-m", "tandem.moe.example", "--steps", "8"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "example finished: dispatch/combine match and the loss went down" in done.stdout, done.stdout
    assert done.stdout.count("combine vs local") == 2  # both ranks ran part 1
