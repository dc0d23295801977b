"""Dispatch + combine bandwidth of tandem.moe.ep.Buffer against raw `all_to_all_single` on gloo.

    .venv/bin/python -m bench.bench_ep            # 2 and 4 ranks, writes bench/results/ep_gloo.json

For each group size the ranks run, interleaved in one loop: a fresh dispatch (layout included) plus
combine, a cached dispatch plus combine, and two limits, each two raw `all_to_all_single` calls moving
exactly the same token bytes with the same split sizes: one allocating its outputs per call (as any
caller of the collective, and the Buffer, returns new tensors), one reusing preallocated buffers (the
floor no API that returns fresh tensors can reach). Each iteration's time is the slowest rank's; the
table reports medians and the ratio limit/ours (1.0 means the buffer costs nothing over the raw
collective; the target is at least 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tandem.moe.ep import Buffer

RESULTS = Path(__file__).resolve().parent / "results"


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - start)


def _rank_bench(rank: int, world: int, args) -> dict:
    torch.manual_seed(rank)
    num_experts = args.experts_per_rank * world
    x = torch.randn(args.tokens, args.hidden).to(torch.bfloat16)
    topk_idx = torch.rand(args.tokens, num_experts).topk(args.topk, dim=1).indices
    topk_weights = torch.rand(args.tokens, args.topk)
    buffer = Buffer(dist.group.WORLD)

    def fresh():
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, _, _, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
        buffer.combine(recv_x, handle)
        return handle

    handle = fresh()

    def cached():
        recv_x, *_ = buffer.dispatch(x, handle=handle)
        buffer.combine(recv_x, handle)

    # The limit: the same rows, the same split sizes, preallocated, no layout and no reduction.
    row_bytes = args.hidden * 2
    send_counts = handle.is_token_in_rank.sum(0).tolist()
    column = handle.rank_prefix_matrix[:, rank]
    recv_counts = (column - torch.cat([column.new_zeros(1), column[:-1]])).tolist()
    send = torch.randint(0, 255, (sum(send_counts), row_bytes), dtype=torch.uint8)
    recv = torch.empty(sum(recv_counts), row_bytes, dtype=torch.uint8)

    def raw_preallocated():
        dist.all_to_all_single(recv, send, recv_counts, send_counts)
        dist.all_to_all_single(send, recv, send_counts, recv_counts)

    def raw_fresh():
        # What a caller of all_to_all_single gets: a new output tensor per call, as Buffer returns.
        there = torch.empty(sum(recv_counts), row_bytes, dtype=torch.uint8)
        dist.all_to_all_single(there, send, recv_counts, send_counts)
        back = torch.empty(sum(send_counts), row_bytes, dtype=torch.uint8)
        dist.all_to_all_single(back, there, send_counts, recv_counts)

    times = {"raw_fresh": [], "raw_preallocated": [], "fresh": [], "cached": []}
    steps = (("raw_fresh", raw_fresh), ("raw_preallocated", raw_preallocated), ("fresh", fresh), ("cached", cached))
    for i in range(args.warmup + args.runs):
        for name, fn in steps:
            t = _timed(fn)
            if i >= args.warmup:
                times[name].append(t)
    moved = torch.tensor([2 * row_bytes * sum(send_counts)], dtype=torch.float64)
    dist.all_reduce(moved)
    return {"times": times, "bytes_moved_all_ranks": float(moved)}


def _worker(rank: int, world: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)  # several ranks share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        out = _rank_bench(rank, world, args)
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get(timeout=1800)
    for p in procs:
        p.join()
    med = {k: statistics.median(v) for k, v in out["times"].items()}
    rows = []
    for name, label in (("fresh", "layout + dispatch + combine"), ("cached", "cached dispatch + combine")):
        for limit, limit_label in (("raw_fresh", "raw a2a x2, new outputs"), ("raw_preallocated", "raw a2a x2, reused buffers")):
            rows.append({
                "figure": label, "ranks": world, "median_s": med[name], "limit": limit_label,
                "limit_median_s": med[limit], "ratio": med[limit] / med[name],
                "runs": out["times"][name], "limit_runs": out["times"][limit],
                "bytes_moved_all_ranks": out["bytes_moved_all_ranks"],
            })
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--experts-per-rank", type=int, default=8)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "ep_gloo.json")
    args = parser.parse_args()

    rows = [row for world in args.ranks for row in run(world, args)["rows"]]
    print(f"{'figure':<28} {'ranks':>5} {'MB moved':>9} {'ours ms':>8} {'limit ms':>9} {'ratio':>6}   limit")
    for r in rows:
        print(f"{r['figure']:<28} {r['ranks']:>5} {r['bytes_moved_all_ranks'] / 1e6:>9.1f} "
              f"{r['median_s'] * 1e3:>8.1f} {r['limit_median_s'] * 1e3:>9.1f} {r['ratio']:>6.2f}   {r['limit']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "benchmark": "tandem.moe.ep dispatch+combine vs raw all_to_all_single (gloo, CPU)",
        "ratio": "limit median time / ours median time on the same bytes (higher is better, 1.0 = no overhead)",
        "config": config, "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
