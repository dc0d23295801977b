"""Figure 4: training throughput with a remote target and prefetch, against the same run in-process.

    .venv/bin/python -m bench.bench_train            # writes bench/results/bench_train.json

One small random Llama target (sized so its forward is no slower than a draft training step: the
condition under which the client must never wait) and the real recipe (``tandem.speculative.training.trainer
.train``), run twice on the same data:

- in-process: the target and the draft share one core; each step runs the target, then trains;
- remote: ``tandem serve-target`` in its own process on its own core (the disaggregated setting: the target
  on its own hardware), the trainer on the other, ``--prefetch-depth 2``.

Every process uses one thread, so each side has one core of this 2-core machine. A round is one run
of each kind back to back; each figure is the median over ``--runs`` rounds of the round's value, itself
the median over the steps after the first ``--skip``: tokens/s remote vs in-process; the target's forward
over the in-process training compute (the condition, at most 1); the remote step against its limit, the
in-process step minus its supervision (training compute alone); and the share of the remote step the
client spent blocked on supervision (the target: under 5%). A first row measures what two processes can
compute at once here against one (2.0 on two free cores): the ceiling of any gain from overlap. Remote
runs use what ``tandem train`` uses by default: the gloo data plane, with the row's supervision encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench import common


def write_chat_data(path: Path, count: int, answer_chars: int) -> Path:
    """Synthetic conversations whose answers fill about ``answer_chars`` byte-level tokens."""
    with open(path, "w") as handle:
        for i in range(count):
            answer = " ".join(str((i * 7 + j) % 97) for j in range(answer_chars // 3))[:answer_chars]
            messages = [{"role": "user", "content": f"count from {i}"}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def save_target(directory: Path, layers: int, hidden: int) -> Path:
    from tests.conftest import build_tiny_llama, build_tiny_tokenizer

    build_tiny_llama(seed=0, num_layers=layers, hidden=hidden).save_pretrained(directory)
    build_tiny_tokenizer().save_pretrained(directory)
    return directory


def run(root: Path, name: str, target_dir: Path, args, **overrides) -> list[dict]:
    """Train ``args.steps`` steps; the per-step metrics."""
    from tandem.speculative.training.config import TrainConfig
    from tandem.speculative.training.trainer import train
    from tests.conftest import build_tiny_tokenizer

    config = TrainConfig(
        data=str(root / "data.jsonl"), output_dir=str(root / name), target=str(target_dir), total_steps=args.steps,
        batch_size=args.batch_size, max_seq_len=args.seq, draft_vocab_size=256, warmup_steps=1,
        ttt_steps=args.ttt_steps,
        save_every=10_000, show_progress=False, **overrides,
    )
    train(config, tokenizer=build_tiny_tokenizer())
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines][args.skip :]


def round_figures(local: list[dict], remote: list[dict]) -> dict:
    """One round's figures from the per-step metrics of an in-process run and a remote run after it."""
    med = lambda rows, key: common.median([r[key] for r in rows])  # noqa: E731
    local_wait = common.median([r["step_time_s"] * r["supervision_wait_share"] for r in local])
    local_step = med(local, "step_time_s")
    return {
        "tokens_per_s": med(remote, "tokens_per_s"), "local_tokens_per_s": med(local, "tokens_per_s"),
        "forward_over_step": local_wait / (local_step - local_wait),
        "remote_step_s": med(remote, "step_time_s"), "local_train_s": local_step - local_wait,
        "blocked_share": med(remote, "supervision_wait_share"),
    }


def summarize(rounds: list[dict], encoding: str) -> list[dict]:
    """Table rows: each figure is the median over rounds of that round's value (or ratio)."""
    med = lambda key: common.median([r[key] for r in rounds])  # noqa: E731
    per_round = lambda key: [r[key] for r in rounds]  # noqa: E731
    speedup = common.median([r["tokens_per_s"] / r["local_tokens_per_s"] for r in rounds])
    step_ratio = common.median([r["local_train_s"] / r["remote_step_s"] for r in rounds])
    forward, blocked = med("forward_over_step"), med("blocked_share")
    return [
        {"figure": "tokens/s", "encoding": encoding, "ours": med("tokens_per_s"), "limit": "in-process tokens/s",
         "limit_value": med("local_tokens_per_s"), "ratio": speedup, "runs": per_round("tokens_per_s"),
         "limit_runs": per_round("local_tokens_per_s")},
        {"figure": "target forward / training step", "encoding": encoding, "ours": forward,
         "limit": "condition: at most 1",
         "limit_value": 1.0, "ratio": None, "meets_target": bool(forward <= 1.0),
         "runs": per_round("forward_over_step")},
        {"figure": "remote step time (s)", "encoding": encoding, "ours": med("remote_step_s"),
         "limit": "in-process step minus supervision", "limit_value": med("local_train_s"), "ratio": step_ratio,
         "runs": per_round("remote_step_s"), "limit_runs": per_round("local_train_s")},
        {"figure": "client blocked on supervision / step", "encoding": encoding, "ours": blocked,
         "limit": "target: under 0.05",
         "limit_value": 0.05, "ratio": None, "meets_target": bool(blocked < 0.05), "runs": per_round("blocked_share")},
    ]


COLUMNS = (
    ("target layers", "target_layers", "d"), ("encoding", "encoding", "s"), ("figure", "figure", "s"),
    ("remote", "ours", ".3f"), ("limit", "limit", "s"),
    ("limit value", "limit_value", ".3f"), ("ratio", "ratio", ".2f"), ("meets", "meets_target", ""),
)


def _matmul_rate(core, seconds: float, queue) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    a = torch.randn(384, 384)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ a
        n += 1
    queue.put(n / seconds)


def parallel_capacity(seconds: float = 2.0) -> dict:
    """Combined matmul throughput of two single-thread processes on the two cores over that of one alone.

    The ceiling of what overlapping the target with training can gain here: 2.0 on two free cores, about
    1.0 where the two vCPUs share one physical core or the host is busy.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    cores = sorted(os.sched_getaffinity(0))[:2] if hasattr(os, "sched_getaffinity") else [None, None]
    rates = {}
    for label, use in (("one", cores[:1]), ("two", cores[:2])):
        queue = ctx.Queue()
        procs = [ctx.Process(target=_matmul_rate, args=(c, seconds, queue)) for c in use]
        for proc in procs:
            proc.start()
        rates[label] = sum(queue.get(timeout=60) for _ in procs)
        for proc in procs:
            proc.join()
    return {"figure": "machine: 2 processes' compute / 1 process", "encoding": "-", "target_layers": None,
            "ours": rates["two"] / rates["one"], "limit": "2.0 on two free cores", "limit_value": 2.0, "ratio": None}


def pin_cores(server_pid: int, pin: bool) -> None:
    """Trainer (and the in-process run) on core 0, server on core 1: the scheduler must not stack them on
    one core while the other idles, which would charge the remote run for a placement accident."""
    if not pin or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        return
    first, second = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, {first})
    os.sched_setaffinity(server_pid, {second})


def bench_target(root: Path, data: Path, layers: int, args) -> list[dict]:
    """Rounds of in-process and remote runs with a ``layers``-layer target; the table rows."""
    from tandem.speculative.remote.launch import start_target_server

    root.mkdir(parents=True)
    (root / "data.jsonl").write_bytes(data.read_bytes())
    target_dir = save_target(root / "target", layers, args.hidden)
    server = start_target_server(str(target_dir), log_path=root / "serve.log",
                                 extra_args=("--device", "cpu", "--dtype", "float32"))
    pin_cores(server.proc.pid, args.pin)
    rounds: dict[str, list[dict]] = {encoding: [] for encoding in args.encodings}
    try:
        # Rounds: an in-process run, then each remote run, so each ratio compares runs minutes apart.
        for r in range(args.runs):
            local = run(root, f"in_process_{r}", target_dir, args)
            for encoding in args.encodings:
                remote = run(root, f"remote_{encoding}_{r}", target_dir, args, target_urls=[server.url],
                             prefetch_depth=2, supervision_encoding=encoding)
                rounds[encoding].append(round_figures(local, remote))
    finally:
        server.stop()
    rows = [row for encoding in args.encodings for row in summarize(rounds[encoding], encoding)]
    for row in rows:
        row["target_layers"] = layers
    return rows


def main(argv=None) -> list[dict]:
    p = common.parser(__doc__.split("\n")[0], runs=3, warmup=0)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run (a round is one run of each kind)")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the medians (start-up, empty prefetch)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ttt-steps", type=int, default=7)
    p.add_argument("--layers", type=int, nargs="+", default=[8, 28],
                   help="target decoder layers, one configuration each (default: 8 and 28: forward ~1/4 and ~1 step)")
    p.add_argument("--hidden", type=int, default=256, help="target (and draft) hidden size")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True, help="one core each (default: on)")
    p.add_argument("--encodings", nargs="+", default=["full", "compact"], choices=["full", "compact"])
    args = common.settle(p.parse_args(argv))
    if args.quick:
        args.runs, args.steps, args.skip, args.seq, args.ttt_steps, args.layers, args.hidden = 1, 3, 1, 48, 2, [4], 64
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the server: one core each
    rows: list[dict] = [parallel_capacity(0.5 if args.quick else 2.0)]
    with tempfile.TemporaryDirectory(prefix="tandem-bench-train-") as tmp:
        root = Path(tmp)
        write_chat_data(root / "data.jsonl", count=64, answer_chars=args.seq)
        for layers in args.layers:
            rows += bench_target(root / f"layers_{layers}", root / "data.jsonl", layers, args)
    common.publish("bench_train", "remote training with prefetch vs in-process", rows, args,
                   common.format_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
