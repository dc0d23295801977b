"""How a combine adds up the copies of each token that came back, exactly: fp32 accumulation, rounded once.

Three ways, chosen per call (`choose`): `OWN_FIRST` (CPU), one fp32 scatter-add with the rank's own copies
first, V1's order; `SORTED` (CPU), DeepEP V2's reference order (`copy_order`) for tokens with three or more
copies; `GATHER`, the chunked gather-and-add, on a GPU and for biases the scatter-add cannot start from.
Why the scatter-add is exact on CPU, and when it is not trusted, is said at `start_own_first` and
`scatter_add_accumulates_in_fp32`; the orders themselves in docs/moe.md.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .handle import DispatchHandle
from .workspace import Workspace

OWN_FIRST, SORTED, GATHER = "own_first", "sorted", "gather"


@functools.lru_cache(maxsize=None)
def scatter_add_accumulates_in_fp32() -> bool:
    """Whether CPU `index_add_` on bf16 rows adds in fp32 and rounds once.

    On CPU, `index_add_` along dim 0 runs as `scatter_add_` with an expanded index, which sorts the index
    stably and accumulates each output row in fp32 in source order before writing it once (PyTorch's
    `cpu_scatter_reduce_expanded_index`): the exact fp32 sum in one pass, with no gather. Checked once per
    process; without it, `OWN_FIRST` serves only tokens with at most two copies (0 + a is exact, a + b
    rounds once, in any arithmetic). Its order, the own copy first then the others by rank, is V1's, and
    DeepEP V2's whenever no token has three copies (two terms commute).
    """
    # 1 + 2^-8 + 2^-8: in fp32 then rounded once it is 1 + 2^-7; rounded after each add (ties to even) it
    # stays 1. Two destination rows, interleaved, so the sorting path is the one exercised.
    rows = torch.tensor([1.0, 1.0, 2**-8, 2**-8, 2**-8, 2**-8])[:, None].expand(6, 64).to(torch.bfloat16)
    out = torch.zeros(2, 64, dtype=torch.bfloat16)
    out.index_add_(0, torch.tensor([0, 1, 0, 1, 0, 1]), rows.contiguous())
    return bool((out == 1 + 2**-7).all())


def choose(is_token_in_rank: torch.Tensor, biases, dtype: torch.dtype, device: torch.device, ordered: bool,
           bias_first: bool) -> str:
    """
    Arguments:
        is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`, where each token's copies come from.
        biases: the combine's (bias_0, bias_1), each a tensor or None.
        dtype: the rows' dtype (a bias of another dtype cannot be the scatter-add's starting value).
        ordered: whether DeepEP V2's order (`copy_order`) applies.
        bias_first: whether the biases are the first terms (V2) or the last (V1).

    Returns:
        mode: `OWN_FIRST`, `SORTED` or `GATHER`.
    """
    if device.type != "cpu" or is_token_in_rank.numel() == 0:
        return GATHER
    present = [b for b in biases if b is not None]
    num_biases = len(present)
    at_most_two = int(is_token_in_rank.sum(1).max()) <= 2  # host read, CPU only
    exact = scatter_add_accumulates_in_fp32()
    if num_biases == 0 and (at_most_two or (exact and not ordered)):
        return OWN_FIRST
    if ordered and exact and (num_biases == 0 or (num_biases == 1 and bias_first and present[0].dtype == dtype)):
        return SORTED
    return GATHER


def start_own_first(tokens: torch.Tensor, rows: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """
    Begin an `OWN_FIRST` sum with the rank's own copies (at most one per token, so nothing rounds yet).

    Arguments:
        tokens: `[n]` with `torch.int64`, the token of each row.
        rows: `[n, hidden]`, the own copies.

    Returns:
        partial: `[num_tokens, hidden]` with `rows.dtype`; add the other ranks' copies with one more
            `index_add_`.
    """
    out = torch.zeros(num_tokens, rows.size(1), dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, tokens, rows)


def reduce(
    mode: str,
    workspace: Workspace,
    landing: torch.Tensor,
    handle: DispatchHandle,
    token_of_row: torch.Tensor,
    biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    copy_order: Optional[torch.Tensor],
    bias_first: bool,
) -> torch.Tensor:
    """
    Sum every token's returned copies (all of them in `landing`, the own ones included).

    Arguments:
        landing: `[num_returned + 1, hidden]`, the returned rows in send order (blocks by rank), then a zero row.
        token_of_row: `[num_returned]` with `torch.int64`, the token of each returned row.

    Returns:
        combined: `[num_tokens, hidden]` with `landing.dtype`.
    """
    num_tokens, hidden = handle.is_token_in_rank.size(0), landing.size(1)
    if mode == OWN_FIRST:
        out = torch.zeros(num_tokens, hidden, dtype=landing.dtype, device=landing.device)
        return out.index_add_(0, token_of_row, landing[:-1])
    if mode == SORTED:
        bias = next((b for b in biases if b is not None), None)
        return sum_sorted(workspace, landing, handle, token_of_row, copy_order, bias)
    return sum_gathered(workspace, landing, handle, biases, copy_order, bias_first)


def sum_sorted(
    workspace: Workspace,
    landing: torch.Tensor,
    handle: DispatchHandle,
    token_of_row: torch.Tensor,
    copy_order: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """
    Scatter-add the returned rows in `copy_order` (per token, ascending key), onto `bias` or zero.

    Arguments:
        copy_order: `[num_tokens, num_ranks]` integer keys, distinct among a token's ranks.
        bias: `[num_tokens, hidden]` or None, the sum's first term.
    """
    sent = handle.is_token_in_rank.sum(0)
    rank_of_row = torch.repeat_interleave(torch.arange(sent.numel(), device=sent.device), sent)
    key = copy_order[token_of_row, rank_of_row].to(torch.int64)
    # Sorted by key, then token: each token's copies come in key order, and within one key the rows run in
    # token order, so the scatter-add walks a few ascending streams (sorting by key alone interleaves
    # every rank's block in each key and made the scatter 6x slower at 4 ranks).
    num_tokens = handle.is_token_in_rank.size(0)
    perm = ((key - key.min()) * num_tokens + token_of_row).argsort() if key.numel() else key
    rows = workspace.get("combine_sorted", (perm.numel(), landing.size(1)), landing.dtype, landing.device)
    torch.index_select(landing, 0, perm, out=rows)
    if bias is None:
        out = torch.zeros(num_tokens, landing.size(1), dtype=landing.dtype, device=landing.device)
    else:
        out = bias.to(landing.dtype, copy=True)
    return out.index_add_(0, token_of_row.index_select(0, perm), rows)


_CHUNK_TOKENS = 256  # tokens reduced at a time on CPU: their fp32 partial sums stay in cache


def sum_gathered(
    workspace: Workspace,
    landing: torch.Tensor,
    handle: DispatchHandle,
    biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    copy_order: Optional[torch.Tensor] = None,
    bias_first: bool = False,
) -> torch.Tensor:
    """
    Sum, in fp32, the copies of every token that came back, plus biases; cast once to the row dtype.

    Arguments:
        landing: `[num_returned + 1, hidden]`, the returned rows in send order, then one zero row.
        copy_order: `[num_tokens, num_ranks]` integer keys: each token's copies are added in ascending key
            order (ties by rank); None adds them in rank order. Keys of ranks a token was not sent to are
            ignored.
        bias_first: start from the biases' fp32 sum and add the copies to it (DeepEP V2's reference);
            otherwise the biases are added after the copies.

    Returns:
        combined: `[num_tokens, hidden]` with `landing.dtype`.
    """
    is_token_in_rank, head = handle.is_token_in_rank, handle.send_head
    num_tokens, hidden = head.size(0), landing.size(1)
    zero_row = landing.size(0) - 1
    sent = is_token_in_rank.sum(0)
    block_start = (sent.cumsum(0) - sent).to(head.dtype)
    # Row of each token's copy from each rank; valid rows sort before the zero row, so a chunk whose
    # tokens went to at most k ranks needs only its first k columns.
    position = torch.where(head >= 0, block_start[None, :] + head, torch.full_like(head, zero_row))
    if copy_order is None:
        position = position.sort(dim=1).values.to(torch.int64)
    else:
        key = torch.where(is_token_in_rank, copy_order.to(torch.int64), torch.iinfo(torch.int64).max)
        position = position.gather(1, key.argsort(dim=1, stable=True)).to(torch.int64)
    copies = is_token_in_rank.sum(1)
    step = _CHUNK_TOKENS if landing.device.type == "cpu" else max(num_tokens, 1)
    rows = workspace.get("combine_rows", (min(step, num_tokens), hidden), landing.dtype, landing.device)
    acc = workspace.get("combine_fp32", (min(step, num_tokens), hidden), torch.float32, landing.device)
    out = torch.empty(num_tokens, hidden, dtype=landing.dtype, device=landing.device)
    has_bias = any(b is not None for b in biases)
    for begin in range(0, num_tokens, step):
        end = min(begin + step, num_tokens)
        n = end - begin
        # Host read per chunk on CPU only (on CUDA there is a single chunk and all columns are used).
        k = int(copies[begin:end].max()) if landing.device.type == "cpu" else head.size(1)
        a, r = acc[:n], rows[:n]
        if k <= 2 and not has_bias:
            # One rounding of an exact fp32 sum either way: a 16-bit add computes in fp32 and rounds once,
            # and the sum of two 16-bit floats is exact in fp32 (or its rounding cannot move the result),
            # so adding in the row dtype equals fp32 accumulation here and saves two fp32 passes.
            torch.index_select(landing, 0, position[begin:end, 0], out=out[begin:end])
            if k == 2:
                out[begin:end].add_(torch.index_select(landing, 0, position[begin:end, 1], out=r))
            continue
        present = [bias[begin:end] for bias in biases if bias is not None]
        if bias_first and present:
            a.copy_(present[0])
            for bias in present[1:]:
                a.add_(bias)
            first = 0
        else:
            a.copy_(torch.index_select(landing, 0, position[begin:end, 0], out=r))
            first = 1
        for column in range(first, k):
            a.add_(torch.index_select(landing, 0, position[begin:end, column], out=r))
        if not bias_first:
            for bias in present:
                a.add_(bias)
        out[begin:end].copy_(a)
    return out
