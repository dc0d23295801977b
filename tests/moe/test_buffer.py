"""tandem.moe.ep.Buffer on real gloo groups of 2 and 4 ranks, against a plain single-process reference.

Every rank builds every rank's inputs from one seed, so each can compute the global reference itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tandem.moe.ep import Buffer, DispatchHandle, EventOverlap
from tests.moe.dist_utils import assert_scenario, scenario_fixtures

HIDDEN = 256
EXPERTS_PER_RANK = 4
TOPK = 3


# ----------------------------------------------------------------------------- inputs and reference


def make_inputs(world_size, tokens=None, seed=0, dtype=torch.bfloat16):
    """Per-rank (x, topk_idx with some -1, topk_weights), identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    num_experts = EXPERTS_PER_RANK * world_size
    tokens = tokens or [7 + 5 * r for r in range(world_size)]
    out = []
    for num in tokens:
        x = torch.randn(num, HIDDEN, generator=g).to(dtype)
        idx = torch.rand(num, num_experts, generator=g).topk(TOPK, dim=1).indices
        idx[torch.rand(num, TOPK, generator=g) < 0.25] = -1
        w = torch.rand(num, TOPK, generator=g)
        out.append((x, idx, w))
    return out, num_experts


def ref_in_expert(idx, num_experts):
    onehot = F.one_hot(idx.clamp(min=0), num_experts) * (idx >= 0)[..., None]
    return onehot.sum(1) > 0


def ref_in_rank(idx, num_experts, world_size):
    return ref_in_expert(idx, num_experts).view(idx.size(0), world_size, num_experts // world_size).any(2)


def ref_received(inputs, num_experts, world_size, rank):
    """Rows, local top-k ids and masked weights that `rank` must receive, source rank by source rank."""
    e_local = num_experts // world_size
    xs, ids, ws = [], [], []
    for x, idx, w in inputs:
        m = ref_in_rank(idx, num_experts, world_size)[:, rank]
        local = idx[m] - rank * e_local
        here = (idx[m] >= 0) & (local >= 0) & (local < e_local)
        xs.append(x[m])
        ids.append(torch.where(here, local, torch.full_like(local, -1)))
        ws.append(torch.where(here, w[m], torch.zeros_like(w[m])))
    return torch.cat(xs), torch.cat(ids), torch.cat(ws)


def do_dispatch(buffer, x, idx, w, num_experts, **kwargs):
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    return buffer.dispatch(x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                           is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                           topk_idx=idx, topk_weights=w, **kwargs)


# ----------------------------------------------------------------------------- scenarios (run per rank)


def sc_layout_matches_direct_computation(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    per_rank, per_rdma, per_expert, in_rank, event = Buffer(None).get_dispatch_layout(idx, num_experts)
    expected_in_rank = ref_in_rank(idx, num_experts, ws)
    assert per_rdma is None
    assert in_rank.dtype == torch.bool and torch.equal(in_rank, expected_in_rank)
    assert per_rank.dtype == torch.int32 and per_rank.tolist() == expected_in_rank.sum(0).tolist()
    assert per_expert.tolist() == ref_in_expert(idx, num_experts).sum(0).tolist()
    assert isinstance(event, EventOverlap)


def sc_dispatch_rows_grouped_by_source_in_rank_prefix_order(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    recv_x, recv_idx, recv_w, counts, handle, _ = do_dispatch(Buffer(None), x, idx, w, num_experts)
    exp_x, _, _ = ref_received(inputs, num_experts, ws, rank)
    assert recv_x.dtype == torch.bfloat16 and recv_x.shape == exp_x.shape, (recv_x.shape, exp_x.shape)
    assert torch.equal(recv_x, exp_x)
    # Rank prefix matrix: inclusive over sources, and it delimits each source's block.
    sent = torch.stack([ref_in_rank(i, num_experts, ws).sum(0) for _, i, _ in inputs])  # [src, dst]
    assert isinstance(handle, DispatchHandle)
    assert torch.equal(handle[0], sent.cumsum(0).to(torch.int32))
    starts = [0] + handle[0][:, rank].tolist()
    for src in range(ws):
        block = recv_x[starts[src] : starts[src + 1]]
        m = ref_in_rank(inputs[src][1], num_experts, ws)[:, rank]
        assert torch.equal(block, inputs[src][0][m])
        assert handle.recv_src_idx[starts[src] : starts[src + 1]].tolist() == m.nonzero()[:, 0].tolist()


def sc_dispatch_local_expert_ids_and_masked_weights(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    _, recv_idx, recv_w, _, _, _ = do_dispatch(Buffer(None), x, idx, w, num_experts)
    _, exp_idx, exp_w = ref_received(inputs, num_experts, ws, rank)
    assert recv_idx.dtype == torch.int64 and torch.equal(recv_idx, exp_idx)
    assert recv_idx.min() >= -1 and recv_idx.max() < EXPERTS_PER_RANK
    assert (recv_w[recv_idx == -1] == 0).all()
    assert torch.equal(recv_w, exp_w)


def sc_dispatch_per_expert_counts_with_alignment(rank, ws):
    inputs, num_experts = make_inputs(ws, seed=3)
    x, idx, w = inputs[rank]
    for alignment in (1, 4):
        *_, counts, _, _ = do_dispatch(Buffer(None), x, idx, w, num_experts, expert_alignment=alignment)
        raw = sum(ref_in_expert(i, num_experts).sum(0) for _, i, _ in inputs)
        local = raw[rank * EXPERTS_PER_RANK : (rank + 1) * EXPERTS_PER_RANK].tolist()
        assert counts == [-(-c // alignment) * alignment for c in local], (alignment, counts, local)


def sc_dispatch_num_worst_tokens_pads_and_combine_ignores_padding(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    worst = sum(t[0].size(0) for t in inputs)
    recv_x, recv_idx, recv_w, counts, handle, _ = do_dispatch(Buffer(None), x, idx, w, num_experts,
                                                              num_worst_tokens=worst)
    exp_x, exp_idx, exp_w = ref_received(inputs, num_experts, ws, rank)
    n = exp_x.size(0)
    assert counts == [] and recv_x.size(0) == worst and recv_idx.size(0) == worst
    assert torch.equal(recv_x[:n], exp_x) and (recv_x[n:] == 0).all()
    assert torch.equal(recv_idx[:n], exp_idx) and (recv_idx[n:] == -1).all()
    assert torch.equal(recv_w[:n], exp_w) and (recv_w[n:] == 0).all()
    # Padding rows are ignored by combine; the result is the same as without padding.
    combined, _, _ = Buffer(None).combine(recv_x, handle)
    times = ref_in_rank(idx, num_experts, ws).sum(1, keepdim=True)
    assert torch.equal(combined, (x.float() * times).to(x.dtype))


def sc_cached_dispatch_returns_same_rows(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    buffer = Buffer(None)
    recv_x, _, _, _, handle, _ = do_dispatch(buffer, x, idx, w, num_experts)
    again = buffer.dispatch(x, handle=handle)
    assert len(again) == 6 and again[1] is None and again[4] is None
    assert torch.equal(again[0], recv_x)
    other = x * 2  # different rows along the same layout land in the same places
    assert torch.equal(buffer.dispatch(other, handle=tuple(handle))[0], (recv_x * 2))


def sc_combine_sums_token_over_its_ranks_and_weights(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    buffer = Buffer(None)
    recv_x, _, recv_w, _, handle, _ = do_dispatch(buffer, x, idx, w, num_experts)
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    times = ref_in_rank(idx, num_experts, ws).sum(1, keepdim=True)
    assert combined.dtype == x.dtype and torch.equal(combined, (x.float() * times).to(x.dtype))
    assert torch.equal(combined_w, torch.where(idx >= 0, w, torch.zeros_like(w)))


def sc_combine_adds_one_or_two_biases(rank, ws):
    inputs, num_experts = make_inputs(ws, dtype=torch.float32)
    x, idx, w = inputs[rank]
    buffer = Buffer(None)
    recv_x, _, _, _, handle, _ = do_dispatch(buffer, x, idx, w, num_experts)
    b0, b1 = torch.ones_like(x), torch.full_like(x, 0.5)
    times = ref_in_rank(idx, num_experts, ws).sum(1, keepdim=True)
    one, _, _ = buffer.combine(recv_x, handle, bias=b0)
    two, _, _ = buffer.combine(recv_x, handle, bias=(b0, b1))
    torch.testing.assert_close(one, x * times + 1, rtol=0, atol=1e-5)
    torch.testing.assert_close(two, x * times + 1.5, rtol=0, atol=1e-5)


def sc_zero_token_rank_dispatch_combine_low_latency(rank, ws):
    tokens = [0 if r == 1 else 9 for r in range(ws)]
    inputs, num_experts = make_inputs(ws, tokens=tokens, seed=5)
    x, idx, w = inputs[rank]
    buffer = Buffer(None)
    recv_x, recv_idx, recv_w, counts, handle, _ = do_dispatch(buffer, x, idx, w, num_experts)
    exp_x, exp_idx, _ = ref_received(inputs, num_experts, ws, rank)
    assert torch.equal(recv_x, exp_x) and torch.equal(recv_idx, exp_idx)
    combined, _, _ = buffer.combine(recv_x, handle)
    assert combined.shape == x.shape
    times = ref_in_rank(idx, num_experts, ws).sum(1, keepdim=True)
    assert torch.equal(combined, (x.float() * times).to(x.dtype))
    # Low-latency with an empty rank too.
    ll = Buffer(None, low_latency_mode=True)
    (lx, lcount, lhandle, _, _) = ll.low_latency_dispatch(x, idx, 16, num_experts, use_fp8=False)
    out, _, _ = ll.low_latency_combine(lx, idx, w, lhandle)
    assert out.shape == x.shape


def sc_fp8_tuple_dispatch_and_cached_dispatch(rank, ws):
    if not hasattr(torch, "float8_e4m3fn"):
        return
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    scales = torch.rand(x.size(0), HIDDEN // 128) + 0.5
    x_fp8 = x.float().clamp(-4, 4).to(torch.float8_e4m3fn)
    buffer = Buffer(None)
    (recv_fp8, recv_scales), recv_idx, _, _, handle, _ = do_dispatch(buffer, (x_fp8, scales), idx, w, num_experts)
    assert recv_fp8.dtype == torch.float8_e4m3fn and recv_scales.dtype == torch.float32
    fp8_inputs = []
    for xr, ir, wr in inputs:
        fp8_inputs.append((xr.float().clamp(-4, 4).to(torch.float8_e4m3fn).view(torch.uint8), ir, wr))
    exp, _, _ = ref_received(fp8_inputs, num_experts, ws, rank)
    assert torch.equal(recv_fp8.view(torch.uint8), exp)
    starts = [0] + handle[0][:, rank].tolist()
    assert recv_scales.shape == (starts[-1], HIDDEN // 128)
    (cached_fp8, cached_scales), *_ = buffer.dispatch((x_fp8, scales), handle=handle)
    assert torch.equal(cached_fp8.view(torch.uint8), recv_fp8.view(torch.uint8))
    assert torch.equal(cached_scales, recv_scales)
    # Each rank's own scales come back to it in the rows it received from itself.
    mine = ref_in_rank(idx, num_experts, ws)[:, rank]
    assert torch.equal(recv_scales[starts[rank] : starts[rank + 1]], scales[mine])


def sc_async_finish_and_previous_event_on_cpu(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    buffer = Buffer(None)
    previous = Buffer.capture()
    layout = buffer.get_dispatch_layout(idx, num_experts, previous_event=previous, async_finish=True)
    layout[-1].current_stream_wait()
    out = buffer.dispatch(x, num_tokens_per_rank=layout[0], is_token_in_rank=layout[3],
                          num_tokens_per_expert=layout[2], topk_idx=idx, topk_weights=w,
                          previous_event=layout[-1], async_finish=True, allocate_on_comm_stream=True)
    with out[-1]:
        pass
    exp_x, _, _ = ref_received(inputs, num_experts, ws, rank)
    assert torch.equal(out[0], exp_x)
    sync = buffer.combine(out[0], out[4])[-1]
    with pytest.raises(RuntimeError, match="async_finish"):
        sync.current_stream_wait()


def _ll_reference(inputs, num_experts, ws, rank, m):
    """Expected low-latency slots for `rank`: per local expert, sources ascending, token order."""
    e_local = num_experts // ws
    slots = [[] for _ in range(e_local)]
    for src, (x, idx, _) in enumerate(inputs):
        for e in range(e_local):
            tokens = (idx == rank * e_local + e).any(1).nonzero()[:, 0]
            slots[e].append((src, tokens))
    return slots


def sc_low_latency_dispatch_layout_range_and_recv_count(rank, ws):
    inputs, num_experts = make_inputs(ws, seed=7)
    x, idx, w = inputs[rank]
    m = max(t[0].size(0) for t in inputs)
    buffer = Buffer(None, low_latency_mode=True)
    stats = torch.zeros(EXPERTS_PER_RANK, dtype=torch.int32)
    recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
        x, idx, m, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=False, return_recv_hook=True)
    hook()
    assert recv_x.shape == (EXPERTS_PER_RANK, ws * m, HIDDEN)
    src_info, layout_range, hm, hidden, ne = handle
    assert (hm, hidden, ne) == (m, HIDDEN, num_experts)
    for e, per_src in enumerate(_ll_reference(inputs, num_experts, ws, rank, m)):
        begin = 0
        for src, tokens in per_src:
            packed = int(layout_range[e, src])
            assert (packed >> 32, packed & 0xFFFFFFFF) == (begin, tokens.numel())
            assert torch.equal(recv_x[e, begin : begin + tokens.numel()], inputs[src][0][tokens])
            assert src_info[e, begin : begin + tokens.numel()].tolist() == tokens.tolist()
            begin += tokens.numel()
        assert int(recv_count[e]) == begin and (recv_x[e, begin:] == 0).all()
    assert torch.equal(stats, recv_count)


def sc_low_latency_fp8_dequantises_to_bf16(rank, ws):
    if not hasattr(torch, "float8_e4m3fn"):
        return
    inputs, num_experts = make_inputs(ws, seed=7)
    x, idx, w = inputs[rank]
    m = max(t[0].size(0) for t in inputs)
    buffer = Buffer(None, low_latency_mode=True)
    (q, s), recv_count, handle, _, _ = buffer.low_latency_dispatch(x, idx, m, num_experts, use_fp8=True)
    bf, _, _, _, _ = buffer.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (EXPERTS_PER_RANK, ws * m, HIDDEN // 128)
    assert s.stride(1) == 1  # column-major in the last two dims, like DeepEP
    deq = (q.float().view(*q.shape[:2], -1, 128) * s[..., None]).view(q.shape)
    for e in range(EXPERTS_PER_RANK):
        n = int(recv_count[e])
        torch.testing.assert_close(deq[e, :n], bf[e, :n].float(), rtol=0.07, atol=1e-2)


def sc_low_latency_combine_is_topk_weighted_sum(rank, ws):
    inputs, num_experts = make_inputs(ws, seed=9)
    x, idx, w = inputs[rank]
    m = max(t[0].size(0) for t in inputs)
    buffer = Buffer(None, low_latency_mode=True)
    recv_x, recv_count, handle, _, _ = buffer.low_latency_dispatch(x, idx, m, num_experts, use_fp8=False)
    # Each expert scales its tokens by (global expert id + 1), so the weighted sum is checkable.
    scale = torch.arange(EXPERTS_PER_RANK) + rank * EXPERTS_PER_RANK + 1.0
    expert_out = (recv_x.float() * scale[:, None, None]).to(torch.bfloat16)
    combined, _, _ = buffer.low_latency_combine(expert_out, idx, w, handle)
    expected = x.float()[:, None, :] * (idx + 1).float()[..., None]
    expected = (expected.to(torch.bfloat16).float() * torch.where(idx >= 0, w, torch.zeros_like(w))[..., None]).sum(1)
    torch.testing.assert_close(combined.float(), expected, rtol=1e-2, atol=1e-2)
    # zero_copy reads the registered buffer instead of x; `out` receives the result.
    buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_out)
    out = torch.empty_like(x)
    zc, _, _ = buffer.low_latency_combine(torch.empty(0), idx, w, handle, zero_copy=True, out=out)
    assert zc is out and torch.equal(zc, combined)


def sc_bad_arguments_raise_clear_errors(rank, ws):
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    buffer = Buffer(None)
    with pytest.raises(TypeError, match="topk_idx must have dtype torch.int64"):
        buffer.get_dispatch_layout(idx.int(), num_experts)
    with pytest.raises(ValueError, match="multiple of the group size"):
        buffer.get_dispatch_layout(idx, num_experts + 1)
    with pytest.raises(ValueError, match=r"must lie in \[-1"):
        buffer.get_dispatch_layout(idx + num_experts, num_experts)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    kw = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    with pytest.raises(TypeError, match="x must have dtype"):
        buffer.dispatch(x.to(torch.int32), **kw)
    with pytest.raises(ValueError, match="contiguous"):
        wide = torch.cat([x, x], dim=1)[:, ::2]
        buffer.dispatch(wide, **kw)
    with pytest.raises(TypeError, match="topk_weights must have dtype torch.float32"):
        buffer.dispatch(x, topk_weights=w.double(), **kw)
    with pytest.raises(ValueError, match="takes no topk_idx"):
        _, _, _, _, handle, _ = buffer.dispatch(x, **kw)
        buffer.dispatch(x, handle=handle, topk_idx=idx)
    with pytest.raises(RuntimeError, match="low_latency_mode=True"):
        buffer.low_latency_dispatch(x, idx, 64, num_experts)
    with pytest.raises(ValueError, match="exceed num_max_dispatch_tokens_per_rank"):
        Buffer(None, low_latency_mode=True).low_latency_dispatch(x, idx, 1, num_experts, use_fp8=False)
    with pytest.raises(RuntimeError, match="explicitly_destroy=True"):
        buffer.destroy()
    owned = Buffer(None, explicitly_destroy=True)
    owned.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        owned.get_dispatch_layout(idx, num_experts)


def sc_uccl_buffer_intranode_dispatch_combine(rank, ws):
    import os

    from tandem.moe.uccl_ep.buffer import UCCLBuffer

    os.environ["LOCAL_WORLD_SIZE"] = str(ws)
    try:
        buffer = UCCLBuffer(dist.group.WORLD, num_rdma_bytes=1 << 20)
    finally:
        del os.environ["LOCAL_WORLD_SIZE"]
    assert buffer.is_intranode and buffer.num_rdma_bytes == 0
    inputs, num_experts = make_inputs(ws)
    x, idx, w = inputs[rank]
    recv_x, _, _, _, handle, _ = do_dispatch(buffer, x, idx, w, num_experts)
    combined, _, _ = buffer.combine(recv_x, handle)
    times = ref_in_rank(idx, num_experts, ws).sum(1, keepdim=True)
    assert torch.equal(combined, (x.float() * times).to(x.dtype))


SCENARIOS = {name[3:]: fn for name, fn in globals().items() if name.startswith("sc_")}

outcomes, scenario = scenario_fixtures(SCENARIOS)


# ----------------------------------------------------------------------------- one test per behaviour


@pytest.mark.timeout(180)
def test_buffer_behaviour(outcomes, scenario):
    assert_scenario(outcomes, scenario)


# ----------------------------------------------------------------------------- combine reduction, one process


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("num_ranks", [2, 3])
def test_combine_sum_of_distinct_copies_equals_fp32_accumulation(dtype, num_ranks):
    # Distinct random copies with spread magnitudes (finite in fp16): the row-dtype fast path (at most two copies,
    # no bias) and the fp32 path must both round the exact fp32 sum once.
    from tandem.moe.ep.layout import send_head
    from tandem.moe.ep.reduction import sum_gathered
    from tandem.moe.ep.workspace import Workspace

    g = torch.Generator().manual_seed(num_ranks)
    num_tokens = 600  # more than one CPU chunk
    in_rank = torch.rand(num_tokens, num_ranks, generator=g) < 0.7
    handle = DispatchHandle(*([None] * 4), in_rank, send_head(in_rank))
    num_rows = int(in_rank.sum())
    scale = torch.exp2(torch.randint(-8, 8, (num_rows, 1), generator=g).float())
    landing = torch.cat([torch.randn(num_rows, 64, generator=g) * scale, torch.zeros(1, 64)]).to(dtype)
    sent = in_rank.sum(0)
    start = sent.cumsum(0) - sent
    expected = torch.zeros(num_tokens, 64)
    for r in range(num_ranks):
        rows = landing[start[r] + handle.send_head[in_rank[:, r], r]].float()
        expected[in_rank[:, r]] += rows
    out = sum_gathered(Workspace(), landing, handle, (None, None))
    assert out.dtype == dtype and torch.equal(out, expected.to(dtype))


def test_local_self_block_plans_only_an_edge_self_block():
    from tandem.moe.ep.exchange import local_self_block

    first = local_self_block(0, [3, 4, 5], [3, 2, 1])
    assert first.send_counts == [0, 4, 5] and first.recv_counts == [0, 2, 1]
    assert (first.send, first.send_others, first.recv, first.recv_others) == ((0, 3), (3, 12), (0, 3), (3, 6))
    last = local_self_block(2, [1, 2, 6], [4, 0, 6])
    assert (last.send, last.send_others, last.recv, last.recv_others) == ((3, 9), (0, 3), (4, 10), (0, 4))
    # Empty blocks around the middle rank put its self block at an edge of both sides.
    middle = local_self_block(1, [0, 2, 0], [0, 2, 5])
    assert (middle.send, middle.send_others, middle.recv, middle.recv_others) == ((0, 2), (2, 2), (0, 2), (2, 7))
    assert local_self_block(1, [1, 2, 3], [1, 2, 3]) is None  # in the middle: the collective must carry it
    assert local_self_block(0, [0, 2], [0, 2]) is None  # nothing to copy
