"""``tandem train --nproc-per-node N``: re-launch the same command under torchrun on this node."""

from __future__ import annotations

import subprocess
import sys


def torchrun_command(train_argv: list[str], nproc_per_node: int, log_level: str) -> list[str]:
    """The torchrun command line that runs ``tandem train train_argv`` on ``nproc_per_node`` local ranks.

    ``--standalone``: one node, rendezvous on a free local port (no address or port to choose).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "tandem.train", "--log-level", log_level, *train_argv]


def relaunch_with_torchrun(train_argv: list[str], nproc_per_node: int, log_level: str) -> int:
    """Run ``tandem train`` under torchrun and return its exit status (the ranks' logs pass through)."""
    return subprocess.call(torchrun_command(train_argv, nproc_per_node, log_level))
