"""The combine's three reductions (tandem/moe/ep/reduction.py) equal an fp32 sum in their documented order,
rounded once, on data where any other order or an intermediate rounding shows."""

from __future__ import annotations

import pytest
import torch

from tandem.moe.ep import reduction
from tandem.moe.ep.handle import DispatchHandle
from tandem.moe.ep.layout import send_head, send_order
from tandem.moe.ep.workspace import Workspace

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _returned(num_tokens, num_ranks, dtype, seed, hidden=64):
    """A routing with up to `num_ranks` copies per token and the returned rows (magnitudes 2^-k apart)."""
    g = torch.Generator().manual_seed(seed)
    in_rank = torch.rand(num_tokens, num_ranks, generator=g) < 0.75
    handle = DispatchHandle(*([None] * 4), in_rank, send_head(in_rank))
    n = int(in_rank.sum())
    span = 6 if dtype == torch.float16 else 24
    scale = torch.exp2(torch.randint(-span, span, (n, hidden), generator=g).float())
    landing = torch.cat([torch.randn(n, hidden, generator=g) * scale, torch.zeros(1, hidden)]).to(dtype)
    return handle, landing, send_order(in_rank), g


def _reference(handle, landing, rank_order_of_token, first=None):
    """fp32, one copy at a time in the given order of ranks per token, rounded once at the end."""
    in_rank = handle.is_token_in_rank
    sent = in_rank.sum(0)
    start = sent.cumsum(0) - sent
    acc = torch.zeros(in_rank.size(0), landing.size(1)) if first is None else first.float().clone()
    for t in range(in_rank.size(0)):
        for r in rank_order_of_token(t):
            if in_rank[t, r]:
                acc[t] += landing[start[r] + handle.send_head[t, r]].float()
    return acc.to(landing.dtype)


def test_scatter_add_accumulates_in_fp32_on_this_torch():
    # The fast CPU combine relies on it for three or more copies (it falls back to the gather otherwise).
    assert reduction.scatter_add_accumulates_in_fp32()


@pytest.mark.parametrize("dtype", DTYPES)
def test_own_first_is_rank_order_over_the_landing_rows_and_own_first_when_started_from_x(dtype):
    handle, landing, token_of_row, _ = _returned(160, 4, dtype, seed=1)
    num_ranks = 4
    whole = reduction.reduce(reduction.OWN_FIRST, Workspace(), landing, handle, token_of_row, (None, None), None, False)
    assert torch.equal(whole, _reference(handle, landing, lambda t: range(num_ranks)))
    # Rank 2's own copies first, from their own tensor; then everything else in landing order.
    sent = handle.is_token_in_rank.sum(0)
    start = (sent.cumsum(0) - sent).tolist()
    own = slice(start[2], start[2] + int(sent[2]))
    partial = reduction.start_own_first(token_of_row[own], landing[own].clone(), 160)
    others = torch.cat([torch.arange(0, own.start), torch.arange(own.stop, landing.size(0) - 1)])
    partial.index_add_(0, token_of_row[others], landing[others])
    assert torch.equal(partial, _reference(handle, landing, lambda t: [2, 0, 1, 3]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_sorted_adds_copies_in_key_order_onto_the_bias(dtype, with_bias):
    handle, landing, token_of_row, g = _returned(160, 5, dtype, seed=2)
    keys = torch.stack([torch.randperm(5, generator=g) for _ in range(160)])  # distinct per token
    bias = (torch.randn(160, landing.size(1), generator=g) * 64).to(dtype) if with_bias else None
    got = reduction.reduce(reduction.SORTED, Workspace(), landing, handle, token_of_row, (bias, None), keys, True)
    expected = _reference(handle, landing, lambda t: keys[t].argsort().tolist(), first=bias)
    assert torch.equal(got, expected)


def test_choose_takes_the_gather_where_no_scatter_add_is_exact():
    two = torch.tensor([[True, True, False]] * 4)
    three = torch.tensor([[True, True, True]] * 4)
    cpu, bias = torch.device("cpu"), torch.zeros(4, 8, dtype=torch.bfloat16)
    bf16 = torch.bfloat16
    assert reduction.choose(two, (None, None), bf16, cpu, True, True) == reduction.OWN_FIRST  # two terms commute
    assert reduction.choose(three, (None, None), bf16, cpu, False, False) == reduction.OWN_FIRST  # V1
    assert reduction.choose(three, (None, None), bf16, cpu, True, True) == reduction.SORTED  # V2
    assert reduction.choose(three, (bias, None), bf16, cpu, True, True) == reduction.SORTED  # bias starts it
    assert reduction.choose(three, (bias, bias), bf16, cpu, True, True) == reduction.GATHER  # b0 + b1 first
    assert reduction.choose(three, (bias.float(), None), bf16, cpu, True, True) == reduction.GATHER
    assert reduction.choose(two, (bias, None), bf16, cpu, False, False) == reduction.GATHER  # V1: bias last
    assert reduction.choose(two, (None, None), bf16, torch.device("meta"), False, False) == reduction.GATHER
