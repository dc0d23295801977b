"""Config, size hints, tuned configs and the layout math of tandem.moe.ep, on one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tandem.moe.ep import Buffer, Config, EventOverlap, get_low_latency_rdma_size_hint
from tandem.moe.ep.exchange import pack_rows, unpack_rows
from tandem.moe.ep.layout import channel_prefix_matrix, dispatch_layout, send_head, send_order, token_prefix


def test_config_is_positional_and_aligns_rdma_recv_tokens():
    c = Config(24, 6, 256, 6, 128)
    assert (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens) == (24, 6, 256)
    assert c.num_max_rdma_chunked_recv_tokens == 132  # DeepEP aligns 128 up to a multiple of 6
    with pytest.raises(ValueError, match="nvl_chunked_send_tokens must be <"):
        Config(24, 256, 256, 6, 128)


def test_buffer_size_hints_follow_deepep_formulas():
    c = Config(20, 6, 256, 6, 128)
    hidden_bytes = 7168 * 2
    nvl = c.get_nvl_buffer_size_hint(hidden_bytes, 8)
    per_token = hidden_bytes + 8 + 128 * 8 + 128 * 4 + 128 * 4
    assert nvl == -(-(10 * 8 * (2 * 1 + 3) * 4 + 10 * 8 * 256 * per_token) // 128) * 128
    assert c.get_rdma_buffer_size_hint(hidden_bytes, 8) == 0  # one node needs no RDMA buffer
    assert c.get_rdma_buffer_size_hint(hidden_bytes, 16) > 0
    # Hand-computed: M=1, hidden=128, 2 experts -> 2 * (520 + 544 + 128) bytes, rounded past 128.
    assert get_low_latency_rdma_size_hint(1, 128, 2, 2) == 2432
    assert Buffer.get_low_latency_rdma_size_hint(128, 7168, 16, 256) > Buffer.get_low_latency_rdma_size_hint(
        64, 7168, 16, 256)


def test_tuned_configs_and_set_num_sms():
    saved = Buffer.num_sms
    try:
        assert Buffer.get_dispatch_config(2) == Config(24, 24, 256, 6, 128)
        assert Buffer.get_combine_config(8) == Config(24, 4, 256, 6, 128)
        assert Buffer.get_dispatch_config(3) == Buffer.get_dispatch_config(4)  # untuned size: next tuned one
        Buffer.set_num_sms(8)
        assert Buffer.get_dispatch_config(4).num_sms == 8 and Buffer.get_dispatch_config(4).num_channels == 4
        with pytest.raises(ValueError, match="even"):
            Buffer.set_num_sms(7)
    finally:
        Buffer.num_sms = saved


def test_capture_gives_an_event_overlap_usable_on_cpu():
    event = Buffer.capture()
    assert isinstance(event, EventOverlap) and event.event is not None
    event.current_stream_wait()
    with event:
        pass


def test_layout_and_send_order_against_loops():
    torch.manual_seed(0)
    num_tokens, num_experts, num_ranks = 13, 12, 3
    idx = torch.rand(num_tokens, num_experts).topk(4, dim=1).indices
    idx[torch.rand(num_tokens, 4) < 0.3] = -1
    idx[2] = -1  # a token with no expert at all
    per_rank, per_rdma, per_expert, in_rank = dispatch_layout(idx, num_experts, num_ranks)
    in_expert = (F.one_hot(idx.clamp(min=0), num_experts) * (idx >= 0)[..., None]).sum(1) > 0
    assert per_rdma is None
    assert torch.equal(per_expert, in_expert.sum(0).int())
    for t in range(num_tokens):
        for r in range(num_ranks):
            assert bool(in_rank[t, r]) == any(r * 4 <= int(e) < (r + 1) * 4 for e in idx[t])
    assert not in_rank[2].any()
    assert torch.equal(per_rank, in_rank.sum(0).int())
    order = send_order(in_rank).tolist()
    assert order == [t for r in range(num_ranks) for t in range(num_tokens) if in_rank[t, r]]
    head = send_head(in_rank)
    for r in range(num_ranks):
        sent = [t for t in range(num_tokens) if in_rank[t, r]]
        assert [int(head[t, r]) for t in sent] == list(range(len(sent)))
    assert torch.equal(head[~in_rank], torch.full_like(head[~in_rank], -1))
    chan = channel_prefix_matrix(in_rank, 4)  # channels own tokens [0,4) [4,8) [8,12) [12,13)
    assert chan[:, -1].tolist() == per_rank.tolist()
    assert chan[:, 1].tolist() == in_rank[:8].sum(0).tolist()
    # The dispatch computes the running counts once and hands them to both.
    prefix = token_prefix(in_rank)
    assert prefix.shape == (num_tokens + 1, num_ranks) and prefix[0].eq(0).all()
    assert torch.equal(prefix[1:], in_rank.int().cumsum(0).int())
    assert torch.equal(send_head(in_rank, prefix), head)
    assert torch.equal(channel_prefix_matrix(in_rank, 4, prefix), chan)


def test_rdma_rank_counts_above_one_node():
    idx = torch.tensor([[0, 40], [17, -1], [-1, -1]])
    per_rank, per_rdma, _, _ = dispatch_layout(idx, 48, 16, num_rdma_ranks=2)
    # 3 experts per rank: expert 0 -> rank 0 and expert 17 -> rank 5 (node 0), expert 40 -> rank 13 (node 1).
    assert per_rdma.tolist() == [2, 1]
    assert per_rank.sum() == 3


def test_pack_rows_round_trip_of_mixed_dtypes():
    a = torch.arange(12, dtype=torch.int64).view(4, 3)
    b = torch.randn(4, 2).to(torch.bfloat16)
    c = torch.arange(4, dtype=torch.int32)[:, None]
    packed, specs = pack_rows([a, b, c])
    assert packed.dtype == torch.uint8 and packed.shape == (4, 24 + 4 + 4)
    ra, rb, rc = unpack_rows(packed, specs)
    assert torch.equal(ra, a) and torch.equal(rb, b) and torch.equal(rc, c)
