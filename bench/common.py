"""What every benchmark shares: realistic supervision shapes, interleaved timing, medians, the table, the JSON.

DESIGN 5: each figure is printed beside the limit it is measured against *in the same run*, as the
ratio of medians over several interleaved runs (one run of the figure, one of the limit, repeat), so
that noise from the other jobs on a shared machine falls on both alike. Absolute times are recorded in
the JSON for the curious, but the ratio is the result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class SupervisionShape(NamedTuple):
    """The geometry of one ``/generate`` answer: ``batch x seq`` tokens of a target with ``hidden`` size
    H, vocabulary V and a draft vocabulary Vd; ``dtype`` is the target's (aux and final hidden states)."""

    name: str
    hidden: int
    vocab: int
    draft_vocab: int
    seq: int
    batch: int = 1
    dtype: torch.dtype = torch.bfloat16

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def with_seq(self, seq: int) -> "SupervisionShape":
        return self._replace(seq=seq)


# Vd = 32000 is EAGLE-3's usual draft vocabulary; the targets are served in bf16 (a GPU server would).
SMOLLM2_135M = SupervisionShape("SmolLM2-135M", hidden=576, vocab=49152, draft_vocab=32000, seq=2048)
LLAMA_31_8B = SupervisionShape("Llama-3.1-8B", hidden=4096, vocab=128256, draft_vocab=32000, seq=2048)
SHAPES = (SMOLLM2_135M, LLAMA_31_8B)
QUICK_SEQ = 64


def bench_shapes(quick: bool) -> list[SupervisionShape]:
    """The realistic shapes at 2048 tokens, or the same models at ``QUICK_SEQ`` tokens for a smoke run."""
    return [s.with_seq(QUICK_SEQ) for s in SHAPES] if quick else list(SHAPES)


def make_supervision(shape: SupervisionShape, encoding: str = "full", seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``/generate`` answer of ``shape`` with every page written (an untouched page reads as the shared
    zero page, which would flatter any copy of it).

    Arguments:
        encoding: ``"full"`` (``SUPERVISION_KEYS``: ``target_probs [B,S,Vd]`` fp32) or ``"compact"``
            (``final_hidden_states [B,S,H]`` in the target dtype instead).

    Returns:
        key -> tensor in the order the server sends them.
    """
    from tandem.speculative.target import compact

    generator = torch.Generator().manual_seed(seed)
    b, s, h = shape.batch, shape.seq, shape.hidden

    def filled(*size, dtype):
        return torch.empty(size, dtype=torch.float32).uniform_(generator=generator).to(dtype)

    out = {"aux_hidden_states": filled(b, s, 3 * h, dtype=shape.dtype)}
    if encoding == "full":
        out["target_probs"] = filled(b, s, shape.draft_vocab, dtype=torch.float32)
    elif encoding == "compact":
        out[compact.FINAL_HIDDEN_KEY] = filled(b, s, h, dtype=shape.dtype)
    else:
        raise ValueError(f"unknown supervision encoding {encoding!r}")
    out["position_mask"] = torch.rand(b, s, 1, generator=generator) < 0.7
    out["input_ids"] = torch.randint(0, shape.vocab, (b, s), generator=generator)
    out["loss_mask"] = torch.ones(b, s, dtype=torch.long)
    return out


def timed(fn: Callable[[], Optional[float]]) -> float:
    """Seconds one call of ``fn`` takes; a function that returns a float times itself (setup excluded)."""
    start = time.perf_counter()
    inner = fn()
    return float(inner) if isinstance(inner, float) else time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], Optional[float]]], runs: int, warmup: int) -> dict[str, list[float]]:
    """Time every case ``runs`` times, round-robin, after ``warmup`` untimed rounds.

    Interleaving puts a figure and its limit side by side in time, so a burst of load from another
    job hits both rather than one of them.

    Returns:
        case name -> ``runs`` durations in seconds.
    """
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + runs):
        for name, fn in cases.items():
            t = timed(fn)
            if i >= warmup:
                times[name].append(t)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio_row(figure: str, ours: Sequence[float], limit_name: str, limit: Sequence[float], nbytes: int,
              target: Optional[float] = None, **extra) -> dict:
    """A table row comparing time lists ``ours`` and ``limit`` (same bytes): ratio = limit / ours of the
    medians, so 1.0 means no overhead over the limit and higher is better; ``target`` is the minimum."""
    ours_s, limit_s = median(ours), median(limit)
    ratio = limit_s / ours_s if ours_s > 0 else float("inf")
    row = {
        "figure": figure, "bytes": int(nbytes), "median_s": ours_s,
        "GB_per_s": nbytes / ours_s / 1e9 if ours_s else None,
        "limit": limit_name, "limit_median_s": limit_s, "limit_GB_per_s": nbytes / limit_s / 1e9 if limit_s else None,
        "ratio": ratio, "target": target, "meets_target": None if target is None else bool(ratio >= target),
        "runs": list(ours), "limit_runs": list(limit),
    }
    row.update(extra)
    return row


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, fmt)


def format_table(rows: list[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A Markdown table; ``columns`` are ``(header, row key, format spec)``; a missing value prints ``-``."""
    header = "| " + " | ".join(c[0] for c in columns) + " |"
    rule = "|" + "|".join(" --- " for _ in columns) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for _, key, fmt in columns) + " |")
    return "\n".join(lines)


def machine() -> dict:
    """Where the figures were taken (a ratio is only comparable with one from the same kind of machine)."""
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({platform.processor() or platform.machine()})")
    return {
        "device": device, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(), "host": socket.gethostname(),
    }


def write_report(name: str, title: str, rows: list[dict], config: dict, out: Optional[Path] = None,
                 table: str = "", notes: Sequence[str] = ()) -> Path:
    """Write ``bench/results/<name>.json`` (or ``out``): the rows, the run's configuration, the machine,
    the command line that made it and the printed table."""
    path = Path(out) if out is not None else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": title, "command": " ".join([Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]]),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()},
        "notes": list(notes), "table": table, "rows": rows,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def parser(description: str, runs: int, warmup: int = 1) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--runs``, ``--warmup``, ``--quick`` (a smoke run in seconds:
    small shapes, few runs, nothing written unless ``--out`` is given) and ``--out``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--runs", type=int, default=runs,
                   help=f"timed runs per case; the median is reported (default: {runs})")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds first (default: {warmup})")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 runs, no results file unless --out")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/<name>.json)")
    return p


def settle(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--quick`` to the run counts."""
    if args.quick:
        args.runs, args.warmup = min(args.runs, 2), 0
    return args


def should_write(args: argparse.Namespace) -> bool:
    """A quick run is a smoke test: it writes only where it was told to."""
    return not args.quick or args.out is not None


def publish(name: str, title: str, rows: list[dict], args: argparse.Namespace, table: str,
            notes: Sequence[str] = ()) -> None:
    """Print a benchmark's table, then write ``bench/results/<name>.json`` unless this is a quick run
    (``should_write``) and say where."""
    print(table)
    if should_write(args):
        print(f"wrote {write_report(name, title, rows, vars(args), args.out, table, notes)}")


def buffer_address(buffer) -> int:
    """The address of a buffer's first byte (to tell a view of a tensor's memory from a copy)."""
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data) if memoryview(buffer).nbytes else 0


def fill(buffer: bytearray, value: int = 1) -> bytearray:
    """Write every page of ``buffer`` so that timed code never pays its first-touch page faults."""
    np.frombuffer(buffer, dtype=np.uint8)[:] = value
    return buffer


TRANSFER_COLUMNS = (
    ("shape", "shape", "s"), ("figure", "figure", "s"), ("MB", "MB", ",.0f"), ("GB/s", "GB_per_s", ".2f"),
    ("limit", "limit", "s"), ("limit GB/s", "limit_GB_per_s", ".2f"), ("ratio", "ratio", ".2f"),
    ("target", "target", ".1f"), ("meets", "meets_target", ""),
)


def run_shape_bench(name: str, title: str, description: str, bench_shape, argv=None,
                    columns: Sequence[tuple[str, str, str]] = TRANSFER_COLUMNS, runs: int = 9) -> list[dict]:
    """The ``main`` of a per-shape benchmark: parse flags, run ``bench_shape(shape, runs, warmup)`` for
    each supervision shape, print the table and write ``bench/results/<name>.json``."""
    args = settle(parser(description, runs=runs).parse_args(argv))
    rows = [row for shape in bench_shapes(args.quick) for row in bench_shape(shape, args.runs, args.warmup)]
    for row in rows:
        row["MB"] = row["bytes"] / 1e6
    publish(name, title, rows, args, format_table(rows, columns))
    return rows
