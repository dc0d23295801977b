"""tandem's portable `ElasticBuffer` beyond what every backend shares (tests/moe/conformance/ holds those):
DeepEP V2's exact signatures, the portable row order and slot bookkeeping, clear errors, and the expanded
layout's pure functions."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

from tandem.moe.ep import ElasticBuffer, EPHandle, EventOverlap
from tandem.moe.ep.elastic import native_elastic_buffer_class
from tandem.moe.ep.expanded import expanded_layout, last_selection_order, selection_positions
from tests.moe.conformance.reference import RankInput, received
from tests.moe.dist_utils import assert_scenario, scenario_fixtures

EXPERTS_PER_RANK, TOPK, HIDDEN, M = 4, 3, 16, 20

# DeepEP V2's signatures (deep_ep/buffers/elastic.py): names, order and defaults.
DEEPEP_CONSTRUCTOR = [
    ("group", inspect.Parameter.empty), ("num_bytes", None), ("num_cpu_bytes", 0), ("num_max_tokens_per_rank", 0),
    ("hidden", 0), ("num_topk", 0), ("use_fp8_dispatch", False), ("deterministic", False),
    ("allow_hybrid_mode", True), ("allow_multiple_reduction", True), ("prefer_overlap_with_compute", True),
    ("sl_idx", 3), ("num_allocated_qps", 0), ("num_cpu_timeout_secs", 300), ("num_gpu_timeout_secs", 100),
    ("explicitly_destroy", False),
]
DEEPEP_DISPATCH = [
    ("x", inspect.Parameter.empty), ("topk_idx", None), ("topk_weights", None),
    ("cumulative_local_expert_recv_stats", None), ("num_experts", None), ("num_max_tokens_per_rank", None),
    ("expert_alignment", None), ("num_sms", 0), ("num_qps", 0), ("previous_event", None),
    ("previous_event_before_epilogue", None), ("async_with_compute_stream", False),
    ("allocate_on_comm_stream", False), ("handle", None), ("do_handle_copy", True), ("do_cpu_sync", None),
    ("do_expand", False), ("do_zero_padding", False), ("use_tma_aligned_col_major_sf", False),
]
DEEPEP_COMBINE = [
    ("x", inspect.Parameter.empty), ("handle", inspect.Parameter.empty), ("topk_weights", None), ("bias", None),
    ("num_sms", 0), ("num_qps", 0), ("previous_event", None), ("previous_event_before_epilogue", None),
    ("async_with_compute_stream", False), ("allocate_on_comm_stream", False),
]
DEEPEP_HANDLE_FIELDS = [
    "do_expand", "num_experts", "expert_alignment", "num_max_tokens_per_rank", "num_sms", "topk_idx",
    "num_recv_tokens", "num_expanded_tokens", "num_recv_tokens_per_expert_list",
    "psum_num_recv_tokens_per_scaleup_rank", "psum_num_recv_tokens_per_expert",
    "num_unaligned_recv_tokens_per_expert", "recv_src_metadata", "dst_buffer_slot_idx",
    "token_metadata_at_forward", "channel_linked_list",
]


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def test_signatures_are_deepep_v2s():
    assert _params(ElasticBuffer.__init__) == DEEPEP_CONSTRUCTOR
    assert _params(ElasticBuffer.dispatch) == DEEPEP_DISPATCH
    assert _params(ElasticBuffer.combine) == DEEPEP_COMBINE
    assert list(inspect.signature(EPHandle).parameters)[: len(DEEPEP_HANDLE_FIELDS)] == DEEPEP_HANDLE_FIELDS


def test_native_buffer_is_not_chosen_without_cuda_and_nccl(monkeypatch):
    assert native_elastic_buffer_class(None) is None
    monkeypatch.setenv("TANDEM_EP_BACKEND", "portable")
    assert native_elastic_buffer_class(None) is None


# ----------------------------------------------------------------------------- pure functions, one process


def test_expanded_layout_groups_pairs_by_expert_in_row_then_topk_order_with_aligned_starts():
    recv_topk_idx = torch.tensor([[1, -1, 0], [0, 1, -1], [-1, -1, -1], [1, 1, 2]])
    layout = expanded_layout(recv_topk_idx, num_local_experts=3, alignment=4)
    # expert 0: (0,2), (1,0) -> rows 0, 1; expert 1 starts at 4: (0,0), (1,1), (3,0), (3,1); expert 2 at 8: (3,2)
    assert layout.slots.tolist() == [[4, -1, 0], [1, 5, -1], [-1, -1, -1], [6, 7, 8]]
    assert layout.counts == [2, 4, 1] and layout.num_rows == 12
    assert layout.first_rows(4) == [0, 4, 8]


def test_last_selection_order_is_the_topk_position_of_each_ranks_last_selection():
    topk_idx = torch.tensor([[2, 0, 3], [-1, 1, -1], [5, 4, 0]])  # 2 experts per rank, 3 ranks
    assert last_selection_order(topk_idx, 3, 2).tolist() == [[1, 2, -1], [1, -1, -1], [2, -1, 1]]


def test_selection_positions_land_by_rank_then_token_then_topk():
    topk_idx = torch.tensor([[2, 0, -1], [1, 3, 2]])  # 2 experts per rank
    positions, per_rank = selection_positions(topk_idx, 2, 2)
    # rank 0 block: (0,1), (1,0); rank 1 block: (0,0), (1,1), (1,2); -1 -> zero row 5
    assert positions.tolist() == [[2, 0, 5], [1, 3, 4]] and per_rank == [2, 3]


# ----------------------------------------------------------------------------- scenarios on real gloo ranks


def _inputs(world, seed=0, tokens=None):
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or [5 + 4 * r for r in range(world)]
    out = []
    for num in tokens:
        idx = torch.rand(num, EXPERTS_PER_RANK * world, generator=g).topk(TOPK, dim=1).indices
        idx[torch.rand(num, TOPK, generator=g) < 0.2] = -1
        out.append(RankInput(torch.randn(num, HIDDEN, generator=g).bfloat16(), idx, torch.rand(num, TOPK, generator=g)))
    return out


def sc_rows_arrive_in_source_order_and_slots_name_the_landing_row(rank, ws):
    inputs = _inputs(ws)
    buffer = ElasticBuffer(None, num_max_tokens_per_rank=M)
    x, idx, w = inputs[rank]
    recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w,
                                                          num_experts=EXPERTS_PER_RANK * ws)
    exp = received(inputs, rank, EXPERTS_PER_RANK * ws, M)
    assert torch.equal(handle.recv_src_metadata[:, 0].long(), exp.source)  # no sort needed: source order
    assert torch.equal(recv_x, exp.x)
    rows = torch.arange(recv_x.size(0))[:, None].expand(-1, TOPK)
    assert torch.equal(handle.recv_src_metadata[:, 2:].long(), torch.where(recv_idx >= 0, rows, -1))
    # dst_buffer_slot_idx: where each of my selections' tokens lands on the expert's rank.
    for k in range(TOPK):
        for t in range(x.size(0)):
            e = int(idx[t, k])
            expected = -1
            if e >= 0:
                there = received(inputs, e // EXPERTS_PER_RANK, EXPERTS_PER_RANK * ws, M).source
                expected = int((there == rank * M + t).nonzero()[0, 0])
            assert int(handle.dst_buffer_slot_idx[t, k]) == expected
    assert handle.num_recv_tokens == recv_x.size(0) and handle.num_expanded_tokens == 0


def sc_num_max_tokens_defaults_to_the_groups_largest_count(rank, ws):
    inputs = _inputs(ws, seed=1)
    x, idx, w = inputs[rank]
    _, _, _, handle, _ = ElasticBuffer(None).dispatch(x, topk_idx=idx, topk_weights=w,
                                                      num_experts=EXPERTS_PER_RANK * ws)
    largest = max(i.x.size(0) for i in inputs)
    assert handle.num_max_tokens_per_rank == largest
    assert torch.equal(handle.recv_src_metadata[:, 0].long(),
                       received(inputs, rank, EXPERTS_PER_RANK * ws, largest).source)


def sc_bad_arguments_get_errors_that_name_them(rank, ws):
    inputs = _inputs(ws, seed=2)
    x, idx, w = inputs[rank]
    buffer = ElasticBuffer(None, num_max_tokens_per_rank=M)
    e = EXPERTS_PER_RANK * ws
    _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=e)
    bad = [
        (lambda: buffer.dispatch(x, topk_idx=idx, handle=handle), "takes no topk_idx"),
        (lambda: buffer.dispatch(x, handle=handle, do_cpu_sync=True), "do_cpu_sync=True"),
        (lambda: buffer.dispatch(x, handle=handle, num_experts=2 * e), "num_experts"),
        (lambda: buffer.dispatch(x, handle=handle, do_expand=True), "do_expand"),
        (lambda: buffer.dispatch(x, topk_idx=idx, num_experts=e, do_zero_padding=True), "do_zero_padding"),
        (lambda: buffer.dispatch(x, topk_idx=idx, num_experts=e, previous_event=buffer.capture()),
         "allocate_on_comm_stream"),
        (lambda: buffer.dispatch(x, topk_idx=idx), "num_experts"),
        (lambda: buffer.dispatch(x, topk_idx=idx, num_experts=e, expert_alignment=0), "expert_alignment"),
        (lambda: ElasticBuffer(None).dispatch(x, topk_idx=idx, num_experts=e, do_cpu_sync=False),
         "num_max_tokens_per_rank"),
        (lambda: buffer.dispatch(x, topk_idx=idx + e, num_experts=e), "topk_idx values"),
        (lambda: buffer.combine(x, handle=(1, 2)), "EPHandle"),
        (lambda: buffer.combine(x[:0], handle), "rows"),
    ]
    for call, words in bad:
        with pytest.raises((ValueError, TypeError), match=words):
            call()
    # Too many tokens for M: every rank raises the same error after the counts exchange, none is left hanging.
    small = ElasticBuffer(None, num_max_tokens_per_rank=5)
    with pytest.raises(ValueError, match="more than num_max_tokens_per_rank=5"):
        small.dispatch(x, topk_idx=idx, num_experts=e)


def sc_fp8_scales_come_back_column_major_when_asked(rank, ws):
    inputs = _inputs(ws, seed=3)
    x, idx, w = inputs[rank]
    data = x.float().to(torch.float8_e4m3fn)
    scales = torch.rand(x.size(0), 2)
    buffer = ElasticBuffer(None, num_max_tokens_per_rank=M)
    e = EXPERTS_PER_RANK * ws
    (plain_x, plain_s), *_ = buffer.dispatch((data, scales), topk_idx=idx, num_experts=e)
    (tma_x, tma_s), *_ = buffer.dispatch((data, scales), topk_idx=idx, num_experts=e,
                                         use_tma_aligned_col_major_sf=True)
    assert torch.equal(tma_s, plain_s) and tma_s.stride() == (1, max(-(-plain_s.size(0) // 4) * 4, 1))
    assert torch.equal(tma_x.view(torch.uint8), plain_x.view(torch.uint8))


def sc_events_and_lifecycle_follow_deepep(rank, ws):
    inputs = _inputs(ws, seed=4)
    x, idx, w = inputs[rank]
    buffer = ElasticBuffer(None, num_max_tokens_per_rank=M, explicitly_destroy=True)
    e = EXPERTS_PER_RANK * ws
    *_, handle, event = buffer.dispatch(x, topk_idx=idx, num_experts=e, previous_event=buffer.capture(),
                                        allocate_on_comm_stream=True, async_with_compute_stream=True)
    assert isinstance(event, EventOverlap) and event.event is not None
    event.current_stream_wait()
    _, _, combine_event = buffer.combine(torch.zeros(int(handle.psum_num_recv_tokens_per_scaleup_rank[-1]), HIDDEN),
                                         handle)
    assert isinstance(combine_event, EventOverlap)
    assert buffer.get_logical_domain_size() == (1, ws) and buffer.get_physical_domain_size() == (1, ws)
    assert ElasticBuffer.get_buffer_size_hint(dist.group.WORLD, M, HIDDEN, TOPK) % (2 << 20) == 0
    buffer.barrier()
    buffer.destroy()
    with pytest.raises(RuntimeError, match="destroyed"):
        buffer.dispatch(x, topk_idx=idx, num_experts=e)


SCENARIOS = {name[3:]: fn for name, fn in globals().items() if name.startswith("sc_")}

outcomes, scenario = scenario_fixtures(SCENARIOS)


@pytest.mark.timeout(180)
def test_elastic_buffer_behaviour(outcomes, scenario):
    assert_scenario(outcomes, scenario)
