"""Run every benchmark (``bench/bench_*.py``), each in its own process; ``make bench`` runs this.

    .venv/bin/python -m bench.run_all              # every figure; writes bench/results/*.json
    .venv/bin/python -m bench.run_all --quick      # smoke run of the modules that take --quick (no files written)
    .venv/bin/python -m bench.run_all --only wire http

Each module prints its own table (the figure, the limit measured in the same run, their ratio) and
writes its JSON; this runner prints them one after another and a line per module with its exit status
and wall time. A separate process per module keeps one benchmark's memory and threads out of the next.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
# Modules under bench/ named bench_*.py that are not benchmarks of a figure.
SKIP = frozenset({"bench_gpu_check"})


def discover() -> list[str]:
    """The benchmark module names (``bench_wire``, ...), sorted."""
    return sorted(p.stem for p in BENCH_DIR.glob("bench_*.py") if p.stem not in SKIP and "gpu_check" not in p.stem)


def takes_quick(module: str) -> bool:
    """Whether a module's command line has ``--quick`` (modules of other authors may not)."""
    source = (BENCH_DIR / f"{module}.py").read_text()
    # common.parser() and common.run_shape_bench() both give a module the shared --quick flag.
    return any(mark in source for mark in ('"--quick"', "common.parser(", "common.run_shape_bench("))


def run(module: str, quick: bool, timeout_s: float) -> tuple[int, float]:
    cmd = [sys.executable, "-m", f"bench.{module}", *(["--quick"] if quick else [])]
    print(f"\n## {module}: {' '.join(['python', *cmd[1:]])}", flush=True)
    start = time.perf_counter()
    try:
        code = subprocess.run(cmd, cwd=BENCH_DIR.parent, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        print(f"{module}: timed out after {timeout_s:.0f} s", flush=True)
        code = 124
    return code, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --quick to each module that takes it, skip the rest")
    p.add_argument("--only", nargs="+", default=None, help="module names, with or without the bench_ prefix")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one module may run (default: 900)")
    args = p.parse_args(argv)
    modules = discover()
    if args.only:
        wanted = {m if m.startswith("bench_") else f"bench_{m}" for m in args.only}
        unknown = wanted - set(modules)
        if unknown:
            p.error(f"unknown benchmark(s) {sorted(unknown)}; known: {modules}")
        modules = [m for m in modules if m in wanted]
    results = []
    for module in modules:
        if args.quick and not takes_quick(module):
            print(f"\n## {module}: skipped (no --quick)", flush=True)
            continue
        results.append((module, *run(module, args.quick, args.timeout)))
    print("\n| module | exit | wall s |\n| --- | --- | --- |")
    for module, code, wall in results:
        print(f"| {module} | {code} | {wall:.0f} |")
    return 1 if any(code != 0 for _, code, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
