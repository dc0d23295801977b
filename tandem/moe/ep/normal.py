"""High-throughput dispatch and combine on `all_to_all_single`.

A fresh dispatch is three collectives (the counts, then the token rows and their packed metadata at once);
a cached dispatch and a combine are one all-to-all of rows each. Each collective starts asynchronously and
the local work that does not need its result runs while it is in flight; a rank's rows for itself skip the
collective when they sit at an end of what it sends and receives (`exchange.local_self_block`).

`all_to_all_single` takes its split sizes on the host, so each call makes one deliberate host sync to read
the counts; DeepEP's notify kernel makes the same sync unless `num_worst_tokens` is given.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from . import reduction
from .exchange import (
    local_self_block,
    pack_rows,
    self_block_at_edge,
    start_all_gather_ints,
    start_all_to_all_rows,
    unpack_rows,
)
from .handle import DispatchHandle
from .layout import (
    channel_prefix_matrix,
    recv_channel_prefix_matrix,
    send_head,
    send_order,
    to_local_experts,
    token_prefix,
)
from .workspace import Workspace


def _block_counts(handle: DispatchHandle, rank: int) -> Tuple[List[int], List[int]]:
    """(rows this rank sends to each rank, rows it receives from each rank) under a dispatch handle."""
    received = handle.rank_prefix_matrix[:, rank]
    per_source = received - torch.cat([received.new_zeros(1), received[:-1]])
    sent = handle.is_token_in_rank.sum(0, dtype=torch.int32)
    both = torch.cat([sent.to(per_source.device), per_source]).tolist()  # host sync: split sizes
    num_ranks = received.numel()
    return both[:num_ranks], both[num_ranks:]


class FreshDispatch(NamedTuple):
    """
    What a non-cached dispatch produced on this rank (the V1 and V2 buffers each pick their outputs).

    Attributes:
        recv_x: `[rows, hidden]` with `x.dtype`, blocks by source rank, source token order within a block;
            `rows` is `num_worst_tokens` when that was given (zero rows after the received ones).
        recv_scales: `[rows, num_scales]`, or None without FP8 scales.
        recv_topk_idx: `[rows, num_topk]` with `torch.int64`, local expert ids or -1; None without top-k.
        recv_topk_weights: `[rows, num_topk]` with `torch.float`, 0 where the id is -1; None without weights.
        handle: the `DispatchHandle` (the route back, and of a cached dispatch).
        recv_counts: rows received from each source rank (host list).
        local_expert_counts: tokens received by each local expert, unaligned (host list).
        max_tokens_per_rank: the largest token count any rank dispatched in this call.
    """

    recv_x: torch.Tensor
    recv_scales: Optional[torch.Tensor]
    recv_topk_idx: Optional[torch.Tensor]
    recv_topk_weights: Optional[torch.Tensor]
    handle: DispatchHandle
    recv_counts: List[int]
    local_expert_counts: List[int]
    max_tokens_per_rank: int


def dispatch_fresh(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: Optional[torch.Tensor],
    topk_weights: Optional[torch.Tensor],
    is_token_in_rank: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    num_worst_tokens: int,
    num_channels: int,
    workspace: Workspace,
    num_max_tokens_per_rank: int = 0,
) -> FreshDispatch:
    """
    Non-cached dispatch.

    Arguments:
        num_worst_tokens: pad the received tensors to this many rows (0: exactly the received rows).
        num_max_tokens_per_rank: if > 0, every rank raises the same error when any rank dispatches more
            tokens than this (checked after the counts exchange, so no rank is left waiting in a collective).
    """
    rank, num_ranks = group.rank(), group.size()
    num_experts = num_tokens_per_expert.numel()
    num_local_experts = num_experts // num_ranks
    prefix = token_prefix(is_token_in_rank)
    channels = channel_prefix_matrix(is_token_in_rank, num_channels, prefix)
    own_tokens = torch.tensor([x.size(0)], dtype=torch.int32, device=channels.device)
    gathered, counts_in_flight = start_all_gather_ints(
        group, torch.cat([num_tokens_per_expert.to(torch.int32), channels.flatten(), own_tokens])
    )

    # While the counts travel: everything that needs only this rank's routing (the row gather is most of it).
    order = send_order(is_token_in_rank)
    send_counts = channels[:, -1].tolist()  # host sync: split sizes
    staged = _stage_before_counts(workspace, x, order, send_counts, rank)
    meta = [order.to(torch.int32)[:, None]]
    if topk_idx is not None:
        meta.append(topk_idx.index_select(0, order))
        if topk_weights is not None:
            meta.append(topk_weights.index_select(0, order))
    if x_scales is not None:
        meta.append(x_scales.index_select(0, order))
    packed, specs = pack_rows(meta)
    head = send_head(is_token_in_rank, prefix)
    counts_in_flight.wait()

    all_channels = gathered[:, num_experts:-1].view(num_ranks, num_ranks, num_channels)
    counts = all_channels[:, :, -1]  # [src, dst]
    rank_prefix = counts.cumsum(0, dtype=torch.int32)
    local_expert_counts = gathered[:, rank * num_local_experts : (rank + 1) * num_local_experts].sum(0)
    host = torch.cat([counts[:, rank], local_expert_counts, gathered[:, -1].max()[None]]).tolist()  # host sync
    recv_counts = host[:num_ranks]
    max_tokens = host[-1]
    if 0 < num_max_tokens_per_rank < max_tokens:
        raise ValueError(f"a rank dispatches {max_tokens} tokens, more than num_max_tokens_per_rank="
                         f"{num_max_tokens_per_rank}")
    num_recv = sum(recv_counts)
    if num_worst_tokens and num_recv > num_worst_tokens:
        raise ValueError(f"rank {rank} receives {num_recv} tokens, more than num_worst_tokens={num_worst_tokens}")
    out_rows = num_worst_tokens or None

    # Rows and metadata travel together (two collectives in flight at once); the self block is gathered
    # and the small metadata unpacked while the rows are still on their way.
    recv_x, rows_in_flight = _start_rows(group, workspace, x, order, send_counts, recv_counts, out_rows, staged)
    recv_packed, meta_in_flight = start_all_to_all_rows(group, packed, send_counts, recv_counts, out_rows)
    _finish(meta_in_flight)
    recv_meta = unpack_rows(recv_packed, specs)

    recv_src_idx = recv_meta.pop(0)[:, 0]
    recv_src_idx[num_recv:] = -1
    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        raw_idx = recv_meta.pop(0)
        raw_idx[num_recv:] = -1
        raw_weights = recv_meta.pop(0) if topk_weights is not None else None
        recv_topk_idx, recv_topk_weights = to_local_experts(raw_idx, raw_weights, rank, num_local_experts)
    recv_scales = recv_meta.pop(0) if x_scales is not None else None

    handle = DispatchHandle(
        rank_prefix_matrix=rank_prefix,
        channel_prefix_matrix=channels,
        recv_channel_prefix_matrix=recv_channel_prefix_matrix(all_channels, rank),
        recv_src_idx=recv_src_idx,
        is_token_in_rank=is_token_in_rank,
        send_head=head,
    )
    _finish(rows_in_flight)
    return FreshDispatch(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, handle, recv_counts,
                         host[num_ranks:-1], max_tokens)


def dispatch_cached(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    handle: DispatchHandle,
    workspace: Workspace,
    topk_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """
    Dispatch along a previous dispatch's layout: no counts exchange, one all-to-all of rows (and one more,
    at the same time, for FP8 scales and top-k weights packed together when given).

    Returns:
        recv_x, recv_scales, recv_topk_weights: the received rows, scales and weights (None when not given),
            padded like the dispatch that made `handle`.
    """
    send_counts, recv_counts = _block_counts(handle, group.rank())
    out_rows = handle.recv_src_idx.size(0)
    order = send_order(handle.is_token_in_rank)
    recv_x, rows_in_flight = _start_rows(group, workspace, x, order, send_counts, recv_counts, out_rows)
    extras = [t.index_select(0, order) for t in (x_scales, topk_weights) if t is not None]
    received: List[Optional[torch.Tensor]] = []
    if extras:
        packed, specs = pack_rows(extras)
        recv_packed, extras_in_flight = start_all_to_all_rows(group, packed, send_counts, recv_counts, out_rows)
        _finish(extras_in_flight)
        received = unpack_rows(recv_packed, specs)
    recv_scales = received.pop(0) if x_scales is not None else None
    recv_weights = received.pop(0) if topk_weights is not None else None
    _finish(rows_in_flight)
    return recv_x, recv_scales, recv_weights


def combine(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    handle: DispatchHandle,
    topk_weights: Optional[torch.Tensor],
    biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    workspace: Workspace,
    copy_order: Optional[torch.Tensor] = None,
    bias_first: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """
    Send each received row back to its source and sum the copies of every token (fp32 accumulation,
    rounded once; `reduction.py` says in which order and how).

    Arguments:
        copy_order, bias_first: DeepEP V2's summation order (see `reduction.sum_sorted`); without them,
            a token's own copy first, then the other ranks' in rank order, then the biases.
    """
    # The dispatch's directions reverse: what this rank received it now sends back.
    dispatch_sent, dispatch_received = _block_counts(handle, group.rank())
    num_recv = sum(dispatch_received)
    num_tokens, hidden = handle.is_token_in_rank.size(0), x.size(1)

    # One spare zero row at the end: the gather reduction reads it for ranks a token was not sent to.
    landing = workspace.get("combine_recv", (sum(dispatch_sent) + 1, hidden), x.dtype, x.device)
    landing[-1].zero_()
    weights_in_flight = None
    if topk_weights is not None:
        returned_w, weights_in_flight = start_all_to_all_rows(
            group, topk_weights[:num_recv].contiguous(), dispatch_received, dispatch_sent
        )
    plan = local_self_block(group.rank(), dispatch_received, dispatch_sent)
    token_of_row = send_order(handle.is_token_in_rank)  # the token each returned row belongs to
    mode = reduction.choose(handle.is_token_in_rank, biases, x.dtype, x.device, copy_order is not None, bias_first)
    combined = None
    if plan is None:
        _, rows_in_flight = start_all_to_all_rows(
            group, x[:num_recv], dispatch_received, dispatch_sent, out=landing[:-1]
        )
    else:
        (sb, se), (rb, re), (ob, oe), (lb, le) = plan.send, plan.recv, plan.send_others, plan.recv_others
        _, rows_in_flight = start_all_to_all_rows(
            group, x[ob:oe], plan.send_counts, plan.recv_counts, out=landing[lb:le]
        )
        # While the others' rows travel: the own copies, added from x or copied next to the others.
        if mode == reduction.OWN_FIRST:
            combined = reduction.start_own_first(token_of_row[rb:re], x[sb:se], num_tokens)
        else:
            landing[rb:re].copy_(x[sb:se])
    _finish(rows_in_flight)
    if combined is not None:
        (lb, le) = plan.recv_others
        combined.index_add_(0, token_of_row[lb:le], landing[lb:le])
    else:
        combined = reduction.reduce(mode, workspace, landing, handle, token_of_row, biases, copy_order, bias_first)
    combined_weights = None
    if topk_weights is not None:
        _finish(weights_in_flight)
        combined_weights = torch.zeros(num_tokens, topk_weights.size(1), dtype=torch.float32, device=x.device)
        combined_weights.index_add_(0, token_of_row, returned_w)
    return combined, combined_weights


def _finish(work: Optional[dist.Work]) -> None:
    if work is not None:
        work.wait()


def _self_stays_local(rank: int, num_ranks: int) -> bool:
    """
    Whether this rank's block for itself is at an end of both what it sends and what it receives
    whatever the other ranks send: true for the first and the last rank (blocks are in rank order).
    """
    return num_ranks > 1 and rank in (0, num_ranks - 1)


def _stage_before_counts(
    workspace: Workspace, x: torch.Tensor, order: torch.Tensor, send_counts: List[int], rank: int
) -> Optional[torch.Tensor]:
    """
    Gather the rows for the other ranks before the receive counts are known, when the plan of
    `local_self_block` is already certain (`_self_stays_local`); None otherwise (staged later).
    """
    if not _self_stays_local(rank, len(send_counts)) or send_counts[rank] == 0:
        return None
    _, (begin, end) = self_block_at_edge(send_counts, rank)  # the same range local_self_block will pick
    return _stage(workspace, x, order[begin:end])


def _start_rows(
    group: dist.ProcessGroup,
    workspace: Workspace,
    x: torch.Tensor,
    order: torch.Tensor,
    send_counts: List[int],
    recv_counts: List[int],
    out_rows: Optional[int],
    staged: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[dist.Work]]:
    """
    Start sending `x[order]` in blocks; the rank's own block is gathered straight into the output while
    the others travel, when it can be (`local_self_block`).

    Arguments:
        staged: the other ranks' rows already gathered by `_stage_before_counts`, or None.
    """
    plan = local_self_block(group.rank(), send_counts, recv_counts)
    if plan is None:
        return start_all_to_all_rows(group, _stage(workspace, x, order), send_counts, recv_counts, out_rows)
    num_recv = sum(recv_counts)
    total = out_rows or num_recv
    recv_x = torch.empty(total, *x.shape[1:], dtype=x.dtype, device=x.device)
    recv_x[num_recv:].zero_()
    (sb, se), (rb, re), (ob, oe), (lb, le) = plan.send, plan.recv, plan.send_others, plan.recv_others
    # The self block is at an end of the send order, so the others' rows are one contiguous range of it.
    if staged is None:
        staged = _stage(workspace, x, order[ob:oe])
    _, work = start_all_to_all_rows(group, staged, plan.send_counts, plan.recv_counts, out=recv_x[lb:le])
    torch.index_select(x, 0, order[sb:se], out=recv_x[rb:re])
    return recv_x, work


def _stage(workspace: Workspace, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Gather the rows to send, in send order, into reused scratch (the collective needs them contiguous)."""
    staged = workspace.get("send", (order.numel(), *x.shape[1:]), x.dtype, x.device)
    return torch.index_select(x, 0, order, out=staged)
