"""The semantic checks every backend must pass, each against the plain reference in `reference.py`.

A case runs on every rank of one group with an adapter of one backend (`backends.py`) and raises on the
first disagreement. Received rows are compared after sorting by source token, so a backend whose receive
order is not fixed (DeepEP V2 outside deterministic mode) is held to the content, not the order; combines
use small-integer data where the summation order must not matter, and DeepEP V2's reference order where
it must.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from tests.moe.conformance.backends import (
    BACKENDS,
    EXPERTS_PER_RANK,
    HIDDEN,
    MAX_TOKENS,
    TOPK,
    BackendSpec,
    Dispatched,
)
from tests.moe.conformance.reference import (
    RankInput,
    align,
    destination_ranks,
    expected_combined,
    fp8_with_scales,
    ordered_reference_combine,
    received,
    selection_values,
    small_integer_rows,
    worst_case_expanded_rows,
)

Routing = Callable[[int, int, int, torch.Generator], torch.Tensor]  # (rank, num_tokens, world, gen) -> topk_idx


@dataclass
class Ctx:
    """One backend on one rank: its adapter, and how to build another buffer of the same backend."""

    spec: BackendSpec
    adapter: object
    group: dist.ProcessGroup
    rank: int
    world: int

    @property
    def num_experts(self) -> int:
        return EXPERTS_PER_RANK * self.world

    def to(self, t):
        if isinstance(t, tuple):
            return tuple(self.to(v) for v in t)
        return None if t is None else t.to(self.adapter.device)

    def rebuild(self, **v2_options):
        return self.spec.build(self.group, **v2_options)


# ----------------------------------------------------------------------------- inputs


def random_routing(rank, num, world, g, minus_one=0.25):
    idx = torch.rand(num, EXPERTS_PER_RANK * world, generator=g).topk(TOPK, dim=1).indices
    idx[torch.rand(num, TOPK, generator=g) < minus_one] = -1
    return idx


def all_to_last_rank(rank, num, world, g):
    # K distinct experts of the last rank per token: every other rank receives nothing.
    base = (world - 1) * EXPERTS_PER_RANK
    return torch.stack([torch.randperm(EXPERTS_PER_RANK, generator=g)[:TOPK] + base for _ in range(num)])


def avoid_rank_zero(rank, num, world, g):
    idx = torch.rand(num, EXPERTS_PER_RANK * world, generator=g)
    idx[:, :EXPERTS_PER_RANK] = -1.0  # rank 0's experts never win
    return idx.topk(TOPK, dim=1).indices


def some_tokens_nowhere(rank, num, world, g):
    idx = random_routing(rank, num, world, g, minus_one=0.0)
    idx[::3] = -1
    return idx


def two_on_one_rank(rank, num, world, g):
    # Selections 0 and 1 are two different experts of one rank; selection 2 is on another rank, or -1.
    owner = torch.randint(0, world, (num,), generator=g)
    pair = torch.stack([torch.randperm(EXPERTS_PER_RANK, generator=g)[:2] for _ in range(num)])
    elsewhere = (owner + torch.randint(1, world, (num,), generator=g)) % world
    third = elsewhere * EXPERTS_PER_RANK + torch.randint(0, EXPERTS_PER_RANK, (num,), generator=g)
    third[torch.rand(num, generator=g) < 0.3] = -1
    return torch.cat([pair + owner[:, None] * EXPERTS_PER_RANK, third[:, None]], dim=1)


def make_inputs(world: int, seed: int, routing: Routing = random_routing, tokens: Sequence[int] = (),
                integer: bool = True) -> List[RankInput]:
    """Every rank's inputs, identical on every rank (one seed)."""
    g = torch.Generator().manual_seed(seed)
    tokens = list(tokens) or [min(9 + 7 * r, MAX_TOKENS) for r in range(world)]
    out = []
    for r, num in enumerate(tokens):
        x = small_integer_rows(num, HIDDEN, g) if integer else torch.randn(num, HIDDEN, generator=g).bfloat16()
        out.append(RankInput(x, routing(r, num, world, g).long(), torch.rand(num, TOPK, generator=g)))
    return out


# ----------------------------------------------------------------------------- checks


def _cpu(t):
    return tuple(v.cpu() for v in t) if isinstance(t, tuple) else t.cpu()


def check_dispatch(ctx: Ctx, got: Dispatched, inputs, alignment: int = 1) -> torch.Tensor:
    """Compare one dispatch with the reference; returns the permutation that sorts its rows by source."""
    exp = received(inputs, ctx.rank, ctx.num_experts, MAX_TOKENS)
    source = ctx.adapter.sources(got.handle, ctx.rank).cpu()
    order = source.argsort()
    assert torch.equal(source[order], exp.source), (source[order], exp.source)
    recv_x = _cpu(got.recv_x)
    if isinstance(recv_x, tuple):
        data, scales = fp8_received(inputs, exp)
        assert torch.equal(recv_x[0][order].view(torch.uint8), data.view(torch.uint8))
        assert torch.equal(recv_x[1][order], scales)
    else:
        assert recv_x.shape == exp.x.shape and torch.equal(recv_x[order], exp.x)
    local = got.recv_topk_idx.cpu()[order]
    assert torch.equal(local, exp.local_idx), (local, exp.local_idx)
    weights = got.recv_topk_weights.cpu()[order]
    # Only the selections held here are specified (DeepEP's own tests mask the others the same way).
    assert torch.equal(weights.masked_fill(local < 0, 0), exp.weights)
    assert got.expert_counts == [align(c, alignment) for c in exp.expert_counts], (got.expert_counts, exp.expert_counts)
    return order


def fp8_received(inputs, exp):
    """The FP8 rows and scales the reference receives (the FP8 case casts every rank's x the same way)."""
    parts = [fp8_with_scales(x) for x, _, _ in inputs]
    by_source = {}
    for src, (data, scales) in enumerate(parts):
        for t in range(data.size(0)):
            by_source[src * MAX_TOKENS + t] = (data[t], scales[t])
    rows = [by_source[int(s)] for s in exp.source]
    empty = (torch.empty(0, HIDDEN, dtype=torch.float8_e4m3fn), torch.empty(0, HIDDEN // 128))
    if not rows:
        return empty
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def check_combine(ctx: Ctx, got: Dispatched, inputs, bias=None, with_weights: bool = True) -> None:
    """Expert output = received row x (rank + 1); the combine must be the exact sum over ranks + bias."""
    x, idx, w = inputs[ctx.rank]
    y = (_as_rows(got.recv_x).float() * (ctx.rank + 1)).to(torch.bfloat16)
    weights = got.recv_topk_weights if with_weights else None
    combined, combined_w = ctx.adapter.combine(y, got.handle, topk_weights=weights, bias=ctx.to(bias))
    expected = expected_combined(x, idx, ctx.world, EXPERTS_PER_RANK, lambda r: r + 1,
                                 bias if isinstance(bias, tuple) else (bias,))
    assert torch.equal(combined.cpu(), expected), (combined.cpu() - expected).abs().max()
    if with_weights:
        assert torch.equal(combined_w.cpu(), torch.where(idx >= 0, w, 0.0))


def _as_rows(recv_x):
    return recv_x[0] if isinstance(recv_x, tuple) else recv_x


def dispatch_inputs(ctx: Ctx, inputs, **options) -> Dispatched:
    x, idx, w = inputs[ctx.rank]
    return ctx.adapter.dispatch(ctx.to(x), ctx.to(idx), ctx.to(w), ctx.num_experts, **options)


# ----------------------------------------------------------------------------- cases for every backend


def case_random_routing_with_minus_one(ctx: Ctx):
    inputs = make_inputs(ctx.world, 1)
    got = dispatch_inputs(ctx, inputs)
    check_dispatch(ctx, got, inputs)
    check_combine(ctx, got, inputs)


def case_skewed_routing_every_token_to_one_rank(ctx: Ctx):
    inputs = make_inputs(ctx.world, 2, all_to_last_rank)
    got = dispatch_inputs(ctx, inputs)
    check_dispatch(ctx, got, inputs)
    if ctx.rank != ctx.world - 1:
        assert _as_rows(got.recv_x).size(0) == 0
    check_combine(ctx, got, inputs)


def case_ranks_that_send_or_receive_nothing(ctx: Ctx):
    tokens = [12, 0] + [5] * (ctx.world - 2)  # rank 1 sends nothing; no token picks rank 0's experts
    inputs = make_inputs(ctx.world, 3, avoid_rank_zero, tokens)
    got = dispatch_inputs(ctx, inputs)
    check_dispatch(ctx, got, inputs)
    if ctx.rank == 0:
        assert _as_rows(got.recv_x).size(0) == 0
    check_combine(ctx, got, inputs)


def case_tokens_with_no_expert_get_only_the_bias(ctx: Ctx):
    inputs = make_inputs(ctx.world, 4, some_tokens_nowhere)
    got = dispatch_inputs(ctx, inputs)
    check_dispatch(ctx, got, inputs)
    num = inputs[ctx.rank].x.size(0)
    bias = small_integer_rows(num, HIDDEN, torch.Generator().manual_seed(40 + ctx.rank))
    check_combine(ctx, got, inputs, bias=bias)


def case_duplicate_experts_on_one_rank_travel_once(ctx: Ctx):
    inputs = make_inputs(ctx.world, 5, two_on_one_rank)
    got = dispatch_inputs(ctx, inputs)
    check_dispatch(ctx, got, inputs)
    expected_rows = sum(int(destination_ranks(i, ctx.world, EXPERTS_PER_RANK)[:, ctx.rank].sum())
                        for _, i, _ in inputs)
    assert _as_rows(got.recv_x).size(0) == expected_rows
    check_combine(ctx, got, inputs)


def case_expert_alignment_rounds_counts_up(ctx: Ctx):
    inputs = make_inputs(ctx.world, 6)
    got = dispatch_inputs(ctx, inputs, expert_alignment=8)
    check_dispatch(ctx, got, inputs, alignment=8)
    check_combine(ctx, got, inputs)


def case_fp8_tuple_rows_and_scales_arrive_unchanged(ctx: Ctx):
    inputs = make_inputs(ctx.world, 7, integer=False)
    x, idx, w = inputs[ctx.rank]
    fp8 = ctx.to(fp8_with_scales(x))
    got = ctx.adapter.dispatch(fp8, ctx.to(idx), ctx.to(w), ctx.num_experts)
    assert isinstance(got.recv_x, tuple)
    order = check_dispatch(ctx, got, inputs)
    cached = _cpu(ctx.adapter.cached(fp8, got.handle))
    assert torch.equal(cached[0][order].view(torch.uint8), _cpu(got.recv_x)[0][order].view(torch.uint8))
    assert torch.equal(cached[1], _cpu(got.recv_x)[1])


def case_bias_in_combine_one_and_two_tensors(ctx: Ctx):
    inputs = make_inputs(ctx.world, 8)
    got = dispatch_inputs(ctx, inputs)
    num = inputs[ctx.rank].x.size(0)
    g = torch.Generator().manual_seed(80 + ctx.rank)
    check_combine(ctx, got, inputs, bias=small_integer_rows(num, HIDDEN, g), with_weights=False)
    check_combine(ctx, got, inputs, bias=(small_integer_rows(num, HIDDEN, g), small_integer_rows(num, HIDDEN, g)))


def case_cached_dispatch_repeats_the_routing(ctx: Ctx):
    inputs = make_inputs(ctx.world, 9)
    got = dispatch_inputs(ctx, inputs)
    x2 = small_integer_rows(inputs[ctx.rank].x.size(0), HIDDEN, torch.Generator().manual_seed(90 + ctx.rank))
    cached = ctx.adapter.cached(ctx.to(x2), got.handle)
    again = [RankInput(small_integer_rows(i.x.size(0), HIDDEN, torch.Generator().manual_seed(90 + r)),
                       i.topk_idx, i.topk_weights) for r, i in enumerate(inputs)]
    check_dispatch(ctx, got._replace(recv_x=cached), again)
    check_combine(ctx, got._replace(recv_x=cached), again, with_weights=False)


def case_deterministic_combine_is_bit_identical_across_runs(ctx: Ctx):
    adapter = ctx.rebuild(deterministic=True) if ctx.spec.api == "v2" else ctx.adapter
    inputs = make_inputs(ctx.world, 10, integer=False)
    x, idx, w = (ctx.to(t) for t in inputs[ctx.rank])
    results = []
    for _ in range(3):
        got = adapter.dispatch(x, idx, w, ctx.num_experts)
        y = (got.recv_x.float() * 1.37 + 0.1).bfloat16()  # inexact sums: the order shows in the bits
        results.append(adapter.combine(y, got.handle, topk_weights=got.recv_topk_weights))
    for combined, weights in results[1:]:
        assert torch.equal(combined, results[0][0]) and torch.equal(weights, results[0][1])


def case_v1_and_v2_agree_on_the_same_routing(ctx: Ctx):
    partner = next(b for b in BACKENDS if b.api != ctx.spec.api and b.module == ctx.spec.module)
    other = partner.build(ctx.group)
    for integer in (True, False):
        inputs = make_inputs(ctx.world, 11, integer=integer)
        outs = []
        for adapter in (ctx.adapter, other):
            x, idx, w = inputs[ctx.rank]
            got = adapter.dispatch(ctx.to(x), ctx.to(idx), ctx.to(w), ctx.num_experts)
            order = adapter.sources(got.handle, ctx.rank).cpu().argsort()
            combined, weights = adapter.combine(got.recv_x, got.handle, topk_weights=got.recv_topk_weights)
            outs.append((got.recv_x.cpu()[order], combined.cpu(), weights.cpu()))
        (rows_a, comb_a, w_a), (rows_b, comb_b, w_b) = outs
        assert torch.equal(rows_a, rows_b) and torch.equal(w_a, w_b)
        if integer:
            assert torch.equal(comb_a, comb_b)
        else:  # three or more copies may be added in another order: within one bf16 rounding
            torch.testing.assert_close(comb_a.float(), comb_b.float(), rtol=2 ** -7, atol=1e-6)


# ----------------------------------------------------------------------------- V2-only cases


def _order_dtype(ctx: Ctx) -> torch.dtype:
    # A bf16 result hides almost every fp32 rounding difference, so the portable backends (which take fp32)
    # are checked in fp32, where any other order shows; native kernels take bf16 only.
    return torch.bfloat16 if ctx.spec.native else torch.float32


def _local_partials(ctx: Ctx, got: Dispatched, dtype: torch.dtype) -> torch.Tensor:
    """What an expert layer returns in the plain layout: per received row, its local selections' values
    added in top-k order in fp32 and rounded once."""
    source = ctx.adapter.sources(got.handle, ctx.rank).cpu()
    values = selection_values(source, TOPK, HIDDEN, dtype)
    local = got.recv_topk_idx.cpu()[: source.numel()]
    acc = torch.zeros(source.numel(), HIDDEN)
    for k in range(TOPK):
        acc += torch.where(local[:, k, None] >= 0, values[:, k].float(), 0.0)
    return acc.to(dtype)


def case_v2_combine_follows_the_reference_order_bit_for_bit(ctx: Ctx):
    dtype = _order_dtype(ctx)
    inputs = make_inputs(ctx.world, 12, integer=False)
    x, idx, w = inputs[ctx.rank]
    got = dispatch_inputs(ctx, [RankInput(i.x.to(dtype), i.topk_idx, i.topk_weights) for i in inputs])
    y = _local_partials(ctx, got, dtype)
    g = torch.Generator().manual_seed(120 + ctx.rank)
    b0, b1 = ((torch.randn(x.size(0), HIDDEN, generator=g) * torch.exp2(
        torch.randint(-20, 21, (x.size(0), HIDDEN), generator=g))).to(dtype) for _ in range(2))
    values = selection_values(ctx.rank * MAX_TOKENS + torch.arange(x.size(0)), TOPK, HIDDEN, dtype)
    for bias in (None, b0, (b0, b1)):
        combined, _ = ctx.adapter.combine(ctx.to(y), got.handle, bias=ctx.to(bias))
        expected = ordered_reference_combine(values, idx, EXPERTS_PER_RANK,
                                             bias if isinstance(bias, tuple) else (bias,), reduce_per_rank=True)
        assert torch.equal(combined.cpu(), expected), (combined.cpu().float() - expected.float()).abs().max()


def case_v2_expanded_layout_and_its_combines(ctx: Ctx):
    dtype = _order_dtype(ctx)
    inputs = make_inputs(ctx.world, 13, two_on_one_rank, integer=False)
    inputs = [RankInput(i.x.to(dtype), i.topk_idx, i.topk_weights) for i in inputs]
    x, idx, w = inputs[ctx.rank]
    alignment = 4
    got = dispatch_inputs(ctx, inputs, expert_alignment=alignment, do_expand=True)
    exp = received(inputs, ctx.rank, ctx.num_experts, MAX_TOKENS)
    handle = got.handle
    assert got.recv_topk_idx is None and got.recv_topk_weights.dim() == 1
    slots = handle.recv_src_metadata[: exp.source.numel(), 2:].cpu().long()
    order = ctx.adapter.sources(handle, ctx.rank).cpu().argsort()
    slots = slots[order]
    recv_x, recv_w = got.recv_x.cpu(), got.recv_topk_weights.cpu()
    assert torch.equal(slots >= 0, exp.local_idx >= 0)
    for k in range(TOPK):
        held = slots[:, k] >= 0
        assert torch.equal(recv_x[slots[held, k]], exp.x[held])
        assert torch.equal(recv_w[slots[held, k]], exp.weights[held, k])
    # Each expert's rows: [psum - count, psum), in the aligned block that starts where the last one ended.
    psum, unaligned = handle.psum_num_recv_tokens_per_expert.cpu(), handle.num_unaligned_recv_tokens_per_expert.cpu()
    assert unaligned.tolist() == exp.expert_counts
    start = 0
    for e, count in enumerate(exp.expert_counts):
        assert int(psum[e]) == start + count
        rows = slots[exp.local_idx == e]
        assert sorted(rows.tolist()) == list(range(start, start + count))
        start = align(start + count, alignment)
    cached_x = ctx.adapter.cached(ctx.to(x), handle, topk_weights=ctx.to(w), do_expand=True,
                                  do_zero_padding=True).cpu()
    used = torch.zeros(cached_x.size(0), dtype=torch.bool)
    used[slots[slots >= 0]] = True
    assert torch.equal(cached_x[used], recv_x[used]) and not cached_x[~used].any()

    # Expert outputs in the expanded layout: each slot holds its selection's value.
    values = selection_values(exp.source, TOPK, HIDDEN, dtype)
    y = torch.zeros_like(recv_x)
    for k in range(TOPK):
        held = slots[:, k] >= 0
        y[slots[held, k]] = values[held, k]
    all_values = selection_values(ctx.rank * MAX_TOKENS + torch.arange(x.size(0)), TOPK, HIDDEN, dtype)
    combined, combined_w = ctx.adapter.combine(ctx.to(y), handle, topk_weights=got.recv_topk_weights)
    assert torch.equal(combined.cpu(), ordered_reference_combine(all_values, idx, EXPERTS_PER_RANK, None, True))
    assert torch.equal(combined_w.cpu(), torch.where(idx >= 0, w, 0.0))
    single = ctx.rebuild(allow_multiple_reduction=False)
    got_single = single.dispatch(ctx.to(x), ctx.to(idx), ctx.to(w), ctx.num_experts, expert_alignment=alignment,
                                 do_expand=True)
    y_single = torch.zeros_like(y)
    slots_single = got_single.handle.recv_src_metadata[: exp.source.numel(), 2:].cpu().long()[
        single.sources(got_single.handle, ctx.rank).cpu().argsort()]
    for k in range(TOPK):
        held = slots_single[:, k] >= 0
        y_single[slots_single[held, k]] = values[held, k]
    combined_single, _ = single.combine(ctx.to(y_single), got_single.handle)
    assert torch.equal(combined_single.cpu(), ordered_reference_combine(all_values, idx, EXPERTS_PER_RANK, None, False))


def case_v2_handle_fields_and_cumulative_stats(ctx: Ctx):
    inputs = make_inputs(ctx.world, 14)
    x, idx, w = inputs[ctx.rank]
    stats = ctx.to(torch.full((EXPERTS_PER_RANK,), 5, dtype=torch.int32))
    got = dispatch_inputs(ctx, inputs, cumulative_local_expert_recv_stats=stats)
    exp = received(inputs, ctx.rank, ctx.num_experts, MAX_TOKENS)
    handle = got.handle
    per_source = [sum(1 for s in exp.source.tolist() if s // MAX_TOKENS == src) for src in range(ctx.world)]
    psum = torch.tensor(per_source).cumsum(0)
    assert handle.psum_num_recv_tokens_per_scaleup_rank.cpu().tolist() == psum.tolist()
    assert stats.cpu().tolist() == [5 + c for c in exp.expert_counts]
    metadata = handle.recv_src_metadata.cpu()
    assert metadata.shape == (exp.source.numel(), 2 + TOPK)
    assert torch.equal(metadata[:, 1].long(), metadata[:, 0].long() // MAX_TOKENS)
    assert torch.equal(handle.psum_num_recv_tokens_per_expert.cpu(),
                       torch.tensor(got.expert_counts).cumsum(0).to(torch.int32))
    assert torch.equal(handle.topk_idx.cpu(), idx)


def case_v2_without_cpu_sync_shapes_are_worst_case(ctx: Ctx):
    inputs = make_inputs(ctx.world, 15)
    exact = dispatch_inputs(ctx, inputs)
    padded = dispatch_inputs(ctx, inputs, do_cpu_sync=False)
    num = exact.recv_x.size(0)
    assert padded.recv_x.size(0) == ctx.world * MAX_TOKENS
    assert int(padded.handle.psum_num_recv_tokens_per_scaleup_rank[-1]) == num
    exact_order = ctx.adapter.sources(exact.handle, ctx.rank).cpu().argsort()
    padded_order = ctx.adapter.sources(padded.handle, ctx.rank).cpu().argsort()
    assert torch.equal(padded.recv_x[:num].cpu()[padded_order], exact.recv_x.cpu()[exact_order])
    check_combine(ctx, padded, inputs)
    expanded = dispatch_inputs(ctx, inputs, do_cpu_sync=False, do_expand=True, expert_alignment=4)
    rows = worst_case_expanded_rows(ctx.world, MAX_TOKENS, TOPK, EXPERTS_PER_RANK, 4)
    assert expanded.recv_x.size(0) == rows and expanded.recv_topk_weights.size(0) == rows


CASES: Dict[str, Tuple[Tuple[str, ...], Callable[[Ctx], None]]] = {
    name[len("case_"):]: (("v2",) if name.startswith("case_v2_") else ("v1", "v2"), fn)
    for name, fn in list(globals().items()) if name.startswith("case_")
}
# V1 <-> V2 agreement is run once, from the V2 side of each implementation.
CASES["v1_and_v2_agree_on_the_same_routing"] = (("v2",), case_v1_and_v2_agree_on_the_same_routing)
