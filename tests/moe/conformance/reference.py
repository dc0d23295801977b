"""A plain single-process reference of expert-parallel dispatch and combine, written from the semantics.

Every rank builds every rank's inputs from one seed, so each rank computes the whole group's reference
by itself and compares its own slice. Nothing here communicates or shares code with `tandem.moe.ep`.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch


class RankInput(NamedTuple):
    """One rank's dispatch inputs: `x [T, H]`, `topk_idx [T, K]` int64 (-1: none), `topk_weights [T, K]`."""

    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor


class Received(NamedTuple):
    """What one rank must receive, in ascending source order (source rank, then source token)."""

    source: torch.Tensor  # [n] int64, src_rank * M + src_token
    x: torch.Tensor  # [n, H]
    local_idx: torch.Tensor  # [n, K] int64, local expert id or -1
    weights: torch.Tensor  # [n, K] fp32, 0 where local_idx is -1
    expert_counts: List[int]  # selections per local expert, unaligned


def owners(topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """`[T, K]` rank holding each selected expert, -1 for a -1 entry."""
    return torch.where(topk_idx >= 0, topk_idx.div(num_local_experts, rounding_mode="floor"), -1)


def destination_ranks(topk_idx: torch.Tensor, num_ranks: int, num_local_experts: int) -> torch.Tensor:
    """`[T, R]` bool, whether each token goes to each rank (once, however many of its experts are there)."""
    own = owners(topk_idx, num_local_experts)
    return torch.stack([(own == r).any(dim=1) for r in range(num_ranks)], dim=1)


def received(inputs: Sequence[RankInput], rank: int, num_experts: int, max_tokens: int) -> Received:
    num_ranks = len(inputs)
    num_local = num_experts // num_ranks
    sources, xs, ids, ws = [], [], [], []
    for src, (x, idx, w) in enumerate(inputs):
        goes = destination_ranks(idx, num_ranks, num_local)[:, rank]
        tokens = goes.nonzero()[:, 0]
        local = idx[tokens] - rank * num_local
        here = (idx[tokens] >= 0) & (local >= 0) & (local < num_local)
        sources.append(src * max_tokens + tokens)
        xs.append(x[tokens])
        ids.append(torch.where(here, local, -1))
        ws.append(torch.where(here, w[tokens], 0.0))
    local_idx = torch.cat(ids)
    counts = [int((local_idx == e).sum()) for e in range(num_local)]
    return Received(torch.cat(sources), torch.cat(xs), local_idx, torch.cat(ws), counts)


def align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def expected_combined(
    token_rows: torch.Tensor, topk_idx: torch.Tensor, num_ranks: int, num_local_experts: int,
    scale_of_rank, bias: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
) -> torch.Tensor:
    """
    The combine of expert outputs `token_rows[t] * scale_of_rank(r)` from every rank `r` token `t` went to,
    plus the biases, accumulated in fp64 (exact for the small-integer data the order-free checks use).
    """
    dest = destination_ranks(topk_idx, num_ranks, num_local_experts)
    acc = torch.zeros(token_rows.shape, dtype=torch.float64)
    for r in range(num_ranks):
        acc += dest[:, r, None].double() * token_rows.double() * scale_of_rank(r)
    for b in bias or ():
        if b is not None:
            acc += b.double()
    return acc.to(token_rows.dtype)


def selection_values(source: torch.Tensor, num_topk: int, hidden: int, dtype=torch.bfloat16) -> torch.Tensor:
    """
    `[n, K, H]` expert outputs that depend only on (source token, k), so every rank can make the outputs
    of the selections it holds and the reference can make all of them.
    """
    seed = (source.double()[:, None] * num_topk + torch.arange(num_topk, dtype=torch.float64))[..., None]
    channel = torch.arange(1, hidden + 1, dtype=torch.float64)
    wave = torch.sin(seed * 0.37 + channel * 0.011 * (1 + seed % 7))
    # Magnitudes 2^-20..2^20 apart: fp32 sums of such values round, so the order of additions shows.
    exponent = (seed * 13 + channel * 7) % 41 - 20
    return (wave * torch.exp2(exponent)).to(dtype)


def ordered_reference_combine(
    values: torch.Tensor, topk_idx: torch.Tensor, num_local_experts: int,
    bias: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]], reduce_per_rank: bool,
) -> torch.Tensor:
    """
    DeepEP V2's reference order (`deep_ep/utils/refs.py`): start from the biases' fp32 sum; with
    `reduce_per_rank`, each rank first adds its selections in top-k order in fp32 and rounds the partial to
    bf16, and the partials are then added at the top-k position of each rank's last selection; otherwise
    every selection is added in top-k order.

    Arguments:
        values: `[T, K, H]`, each selection's expert output (ignored where `topk_idx` is -1); partials and
            the result are rounded to its dtype.
    """
    num_tokens, num_topk, hidden = values.shape
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for b in bias or ():
        if b is not None:
            acc += b.float()
    valid = topk_idx >= 0
    if not reduce_per_rank:
        for k in range(num_topk):
            acc += torch.where(valid[:, k, None], values[:, k].float(), 0.0)
        return acc.to(values.dtype)
    own = owners(topk_idx, num_local_experts)
    for t in range(num_tokens):
        partial, last = {}, {}
        for k in range(num_topk):
            r = int(own[t, k])
            if r < 0:
                continue
            partial[r] = partial.get(r, torch.zeros(hidden)) + values[t, k].float()
            last[r] = k
        for r in sorted(last, key=last.get):
            acc[t] += partial[r].to(values.dtype).float()
    return acc.to(values.dtype)


def small_integer_rows(num: int, hidden: int, generator: torch.Generator) -> torch.Tensor:
    """bf16 rows of integers in [-8, 8]: every sum the checks make is exact in bf16, in any order."""
    return torch.randint(-8, 9, (num, hidden), generator=generator).to(torch.bfloat16)


def fp8_with_scales(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel e4m3 cast with fp32 scales `[T, H / 128]` (DeepEP's FP8 input format)."""
    num, hidden = x.shape
    blocks = x.float().view(num, hidden // 128, 128)
    amax = blocks.abs().amax(dim=2).clamp(min=1e-4)
    scales = amax / 448.0
    data = (blocks / scales[..., None]).view(num, hidden).to(torch.float8_e4m3fn)
    return data, scales


def worst_case_expanded_rows(num_ranks: int, max_tokens: int, num_topk: int, num_local: int, alignment: int) -> int:
    rows = num_ranks * max_tokens * min(num_topk, num_local) + (alignment - 1) * num_local
    return align(rows, alignment)

