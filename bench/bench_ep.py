"""Dispatch + combine bandwidth of tandem.moe.ep's V1 `Buffer` and V2 `ElasticBuffer` against raw
`all_to_all_single` on gloo.

    .venv/bin/python -m bench.bench_ep            # 2 and 4 ranks, writes bench/results/bench_ep.json
    .venv/bin/python -m bench.bench_ep --quick    # smoke run: tiny shapes, 2 ranks, nothing written

For each group size the ranks run, interleaved in one loop: a fresh dispatch (layout included) plus
combine and a cached dispatch plus combine through each API (V2: one `dispatch` call in the plain layout,
combine in DeepEP V2's reference order), and two limits, each two raw `all_to_all_single` calls moving
exactly the same token bytes with the same split sizes (both APIs move the same rows): one allocating
its outputs per call (as any caller of the collective, and the Buffer, returns new tensors), one reusing
preallocated buffers (the floor no API that returns fresh tensors can reach). Each iteration's time is
the slowest rank's; the table reports medians and the ratio limit/ours (1.0 means the buffer costs
nothing over the raw collective; the target is at least 0.8).

The ranks run with glibc's allocator told to keep freed memory (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`, unless already set), as PyTorch's caching allocator does on a GPU. With the
defaults, a fresh multi-MB tensor is sometimes mmapped and page-faulted in and sometimes reused, depending
on the sizes freed just before (glibc moves its threshold as it goes); the limit then swung between
runs by up to 50 %, and a ratio against it measured glibc, not the exchange.

Alongside, each rank times the local work the raw collective does not do, on the same data: the layout
(`get_dispatch_layout`), the gather of the rows to send, and the combine's reduction of the returned
copies (the scatter-add it does now, and the gather-and-add it did before, for comparison), one rank at
a time, reporting each rank's fastest run: other jobs on the machine only ever add time to a step timed
alone. Here all ranks share one physical core, so these add up across ranks
instead of overlapping: their sum is a floor under ours minus the limit.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench import common
from tandem.moe.ep import Buffer, ElasticBuffer, reduction
from tandem.moe.ep.layout import send_order
from tandem.moe.ep.workspace import Workspace


def _slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - start)


def _cached_round_trip(buffer, x: torch.Tensor, handle):
    """
    The timed step of a cached dispatch plus combine along `handle`. V1's `Buffer` and V2's `ElasticBuffer`
    take the same call here (the handle replaces the routing; `recv_x` comes first), so one step serves both.

    Arguments:
        buffer: a `Buffer` or an `ElasticBuffer`.
        x: `[num_tokens, hidden]` with `torch.bfloat16`, the tokens to dispatch.
        handle: the handle of an earlier fresh dispatch of `buffer`.
    """
    def step():
        recv_x, *_ = buffer.dispatch(x, handle=handle)
        buffer.combine(recv_x, handle)

    return step


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
    cached = _cached_round_trip(buffer, x, handle)

    elastic = ElasticBuffer(dist.group.WORLD, num_max_tokens_per_rank=args.tokens, hidden=args.hidden,
                            num_topk=args.topk)

    def v2_fresh():
        recv_x, _, _, v2_handle, _ = elastic.dispatch(x, topk_idx=topk_idx, topk_weights=topk_weights,
                                                      num_experts=num_experts)
        elastic.combine(recv_x, v2_handle)
        return v2_handle

    v2_handle = v2_fresh()
    v2_cached = _cached_round_trip(elastic, x, v2_handle)

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

    # The local work alone, on the same routing: what no raw collective does.
    order = send_order(handle.is_token_in_rank)
    gathered = torch.empty(order.numel(), args.hidden, dtype=x.dtype)
    landing = torch.randn(order.numel() + 1, args.hidden).to(x.dtype)
    scratch = Workspace()

    def layout():
        buffer.get_dispatch_layout(topk_idx, num_experts)

    def gather():
        torch.index_select(x, 0, order, out=gathered)

    mode = reduction.choose(handle.is_token_in_rank, (None, None), x.dtype, x.device, False, False)

    def scatter_reduction():  # what V1's combine does now (the own copies are added from x there)
        reduction.reduce(mode, scratch, landing, handle, order, (None, None), None, False)

    def gather_reduction():  # what it did before: gather each column, add (fp32 beyond two copies)
        reduction.sum_gathered(scratch, landing, handle, (None, None))

    steps = (("raw_fresh", raw_fresh), ("raw_preallocated", raw_preallocated), ("fresh", fresh), ("cached", cached),
             ("v2_fresh", v2_fresh), ("v2_cached", v2_cached))
    times = {name: [] for name, _ in steps}
    local = {name: [] for name in ("layout", "gather", "reduction", "gather_reduction")}
    for i in range(args.warmup + args.runs):
        for name, fn in steps:
            t = _timed(fn)
            if i >= args.warmup:
                times[name].append(t)
        for name, fn in (("layout", layout), ("gather", gather), ("reduction", scatter_reduction),
                         ("gather_reduction", gather_reduction)):
            for turn in range(world):  # one rank at a time: its own cost, not its share of a busy core
                dist.barrier()
                if turn == rank:
                    start = time.perf_counter()
                    fn()
                    if i >= args.warmup:
                        local[name].append(time.perf_counter() - start)
    # Every rank's fastest local time (other jobs only ever add to it), so the table can show their sum.
    local_fastest = torch.tensor([min(local[k]) for k in local], dtype=torch.float64)
    all_local = [torch.empty_like(local_fastest) for _ in range(world)]
    dist.all_gather(all_local, local_fastest)
    moved = torch.tensor([2 * row_bytes * sum(send_counts)], dtype=torch.float64)
    dist.all_reduce(moved)
    per_rank = torch.stack(all_local)  # [rank, part]
    return {
        "times": times, "bytes_moved_all_ranks": float(moved),
        "local_work_s": {k: per_rank[:, j].tolist() for j, k in enumerate(local)},
    }


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


# Keep freed memory in the process (see the module docstring); 32 MiB is glibc's largest mmap threshold.
_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def run(world: int, args) -> dict:
    """Spawn `world` gloo ranks, run the interleaved loop, and return rank 0's report."""
    for key, value in _ALLOCATOR_ENV.items():
        os.environ.setdefault(key, value)  # read by each spawned rank's allocator at start-up
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    out = queue.get(timeout=1800)
    for p in procs:
        p.join()
    rows = []
    for name, label in FIGURES:
        for limit, limit_label in (("raw_fresh", "raw a2a x2, new outputs"),
                                   ("raw_preallocated", "raw a2a x2, reused buffers")):
            rows.append(common.ratio_row(
                label, out["times"][name], limit_label, out["times"][limit], int(out["bytes_moved_all_ranks"]),
                target=TARGET, ranks=world,
            ))
    work = out["local_work_s"]
    local = {"ranks": world, "fastest_s_per_rank": work}
    for part in work:
        local[f"{part}_max_ms"] = max(work[part]) * 1e3
        local[f"{part}_sum_ms"] = sum(work[part]) * 1e3
    local["limit_ms"] = common.median(out["times"]["raw_preallocated"]) * 1e3
    local["budget_ms"] = local["limit_ms"] * (1 / TARGET - 1)  # what ours may add to the limit and still meet it
    return {"rows": rows, "local_work": local}


TARGET = 0.8
FIGURES = (
    ("fresh", "V1 layout + dispatch + combine"), ("cached", "V1 cached dispatch + combine"),
    ("v2_fresh", "V2 dispatch + combine"), ("v2_cached", "V2 cached dispatch + combine"),
)
COLUMNS = (
    ("figure", "figure", "s"), ("ranks", "ranks", "d"), ("MB", "MB", ",.1f"), ("ours ms", "ms", ".1f"),
    ("limit", "limit", "s"), ("limit ms", "limit_ms", ".1f"), ("ratio", "ratio", ".2f"),
    ("target", "target", ".1f"), ("meets", "meets_target", ""),
)
LOCAL_COLUMNS = (
    ("ranks", "ranks", "d"), ("layout ms", "layout_max_ms", ".2f"), ("(sum)", "layout_sum_ms", ".1f"),
    ("row gather ms", "gather_max_ms", ".2f"), ("(sum)", "gather_sum_ms", ".1f"),
    ("scatter-add reduction ms", "reduction_max_ms", ".2f"), ("(sum)", "reduction_sum_ms", ".1f"),
    ("gather reduction (before) ms", "gather_reduction_max_ms", ".2f"), ("(sum)", "gather_reduction_sum_ms", ".1f"),
    ("limit ms", "limit_ms", ".1f"), ("0.8x budget ms", "budget_ms", ".1f"),
)


def main(argv=None) -> list[dict]:
    parser = common.parser(__doc__.split("\n")[0], runs=15, warmup=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="group sizes (default: 2 4)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank (default: 2048)")
    parser.add_argument("--hidden", type=int, default=2048, help="hidden size, bf16 rows (default: 2048)")
    parser.add_argument("--topk", type=int, default=4, help="experts per token (default: 4)")
    parser.add_argument("--experts-per-rank", type=int, default=8, help="(default: 8)")
    args = common.settle(parser.parse_args(argv))
    if args.quick:
        args.tokens, args.hidden, args.ranks, args.warmup = 128, 256, [2], 1

    results = [run(world, args) for world in args.ranks]
    rows = [row for result in results for row in result["rows"]]
    for row in rows:
        row["MB"], row["ms"], row["limit_ms"] = row["bytes"] / 1e6, row["median_s"] * 1e3, row["limit_median_s"] * 1e3
    local = [result["local_work"] for result in results]
    table = (common.format_table(rows, COLUMNS) + "\n\nLocal work no raw collective does, each rank timed alone "
             "(slowest rank; sum over ranks, which share one core here):\n" + common.format_table(local, LOCAL_COLUMNS))
    common.publish(
        "bench_ep", "tandem.moe.ep dispatch+combine vs raw all_to_all_single (gloo, CPU)",
        rows + [{"figure": "local work", **entry} for entry in local], args, table,
        notes=[f"allocator: {k}={os.environ.get(k)}" for k in _ALLOCATOR_ENV],
    )
    return rows


if __name__ == "__main__":
    main()
