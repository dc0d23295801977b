"""``python -m tandem.train``: ``tandem train`` as a module, the entry torchrun starts on every rank.

    torchrun --nproc-per-node 8 -m tandem.train --data chat.jsonl --output-dir runs/dp --batch-size 4
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 \\
        -m tandem.train --data chat.jsonl --output-dir /shared/runs/dp --target-url http://node0:8001

Every flag is a ``tandem train`` flag (``--log-level`` too). ``tandem train --nproc-per-node N`` is the
one-node shortcut: it re-launches itself through torchrun with the same flags.
"""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> int:
    from tandem.cli import main as cli_main

    level, rest = split_log_level(list(sys.argv[1:] if argv is None else argv))
    return cli_main([*level, "train", *rest])


if __name__ == "__main__":
    sys.exit(main())
