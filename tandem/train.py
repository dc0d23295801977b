"""``python -m tandem.train``: ``tandem train`` as a module, the entry torchrun starts on every rank.

    torchrun --nproc-per-node 8 -m tandem.train --data chat.jsonl --output-dir runs/dp --batch-size 4
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 \\
        -m tandem.train --data chat.jsonl --output-dir /shared/runs/dp --target-url http://node0:8001

Every flag is a ``tandem train`` flag (``--log-level`` too). ``tandem train --nproc-per-node N`` is the
one-node shortcut: it re-launches itself through torchrun with the same flags.
"""

from __future__ import annotations

import subprocess
import sys


def split_log_level(argv: list[str]) -> tuple[list[str], list[str]]:
    """``(["--log-level", X] or [], the other arguments)``: the log level is a top-level ``tandem`` flag."""
    rest, level = [], []
    args = iter(argv)
    for arg in args:
        if arg == "--log-level":
            level = [arg, next(args, "INFO")]
        elif arg.startswith("--log-level="):
            level = ["--log-level", arg.split("=", 1)[1]]
        else:
            rest.append(arg)
    return level, rest


def torchrun_command(train_argv: list[str], nproc_per_node: int, log_level: str) -> list[str]:
    """The torchrun command line that runs ``tandem train train_argv`` on ``nproc_per_node`` local ranks.

    ``--standalone``: one node, rendezvous on a free local port (no address or port to choose).
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
            "-m", "tandem.train", "--log-level", log_level, *train_argv]


def relaunch_with_torchrun(train_argv: list[str], nproc_per_node: int, log_level: str) -> int:
    """Run ``tandem train`` under torchrun and return its exit status (the ranks' logs pass through)."""
    return subprocess.call(torchrun_command(train_argv, nproc_per_node, log_level))


def main(argv: list[str] | None = None) -> int:
    from tandem.cli import main as cli_main

    level, rest = split_log_level(list(sys.argv[1:] if argv is None else argv))
    return cli_main([*level, "train", *rest])


if __name__ == "__main__":
    sys.exit(main())
