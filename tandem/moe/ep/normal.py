"""High-throughput dispatch and combine on `all_to_all_single`.

A fresh dispatch is three collectives: one small all-gather of per-expert and per-channel counts (every
rank then knows the whole rank prefix matrix), one all-to-all of the token rows, and one all-to-all of the
per-token metadata (top-k ids and weights, source index, FP8 scales) packed as bytes. A cached dispatch
and a combine are one all-to-all of rows each (plus one for weights or scales when present).
A rank's rows for itself skip the collective (a local gather or copy) whenever they sit at an end of
what it sends and receives (`exchange.local_self_block`): always with two ranks.

`all_to_all_single` takes its split sizes on the host, so each call makes one deliberate host sync to read
the counts; DeepEP's notify kernel makes the same sync unless `num_worst_tokens` is given.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .exchange import all_gather_ints, all_to_all_rows, local_self_block, pack_rows, unpack_rows
from .handle import DispatchHandle
from .workspace import Workspace
from .layout import (
    aligned_counts,
    channel_prefix_matrix,
    recv_channel_prefix_matrix,
    send_head,
    send_order,
    to_local_experts,
)


def _block_counts(handle: DispatchHandle, rank: int) -> Tuple[List[int], List[int]]:
    """(rows this rank sends to each rank, rows it receives from each rank) under a dispatch handle."""
    received = handle.rank_prefix_matrix[:, rank]
    per_source = received - torch.cat([received.new_zeros(1), received[:-1]])
    sent = handle.is_token_in_rank.sum(0, dtype=torch.int32)
    both = torch.cat([sent.to(per_source.device), per_source]).tolist()  # host sync: split sizes
    num_ranks = received.numel()
    return both[:num_ranks], both[num_ranks:]


def dispatch_fresh(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: Optional[torch.Tensor],
    topk_weights: Optional[torch.Tensor],
    is_token_in_rank: torch.Tensor,
    num_tokens_per_expert: torch.Tensor,
    expert_alignment: int,
    num_worst_tokens: int,
    num_channels: int,
    workspace: Workspace,
):
    """Non-cached dispatch; returns DeepEP's first five outputs (recv_x, scales split out)."""
    rank, num_ranks = group.rank(), group.size()
    num_experts = num_tokens_per_expert.numel()
    num_local_experts = num_experts // num_ranks
    channels = channel_prefix_matrix(is_token_in_rank, num_channels)

    gathered = all_gather_ints(group, torch.cat([num_tokens_per_expert.to(torch.int32), channels.flatten()]))
    all_channels = gathered[:, num_experts:].view(num_ranks, num_ranks, num_channels)
    counts = all_channels[:, :, -1]  # [src, dst]
    rank_prefix = counts.cumsum(0, dtype=torch.int32)
    local_expert_counts = gathered[:, rank * num_local_experts : (rank + 1) * num_local_experts].sum(0)
    host = torch.cat([counts[rank], counts[:, rank], local_expert_counts]).tolist()  # host sync
    send_counts, recv_counts = host[:num_ranks], host[num_ranks : 2 * num_ranks]
    num_recv = sum(recv_counts)
    if num_worst_tokens and num_recv > num_worst_tokens:
        raise ValueError(f"rank {rank} receives {num_recv} tokens, more than num_worst_tokens={num_worst_tokens}")
    out_rows = num_worst_tokens or None

    order = send_order(is_token_in_rank)
    recv_x = _dispatch_rows(group, workspace, x, order, send_counts, recv_counts, out_rows)

    meta = [order.to(torch.int32)[:, None]]
    if topk_idx is not None:
        meta.append(topk_idx.index_select(0, order))
        if topk_weights is not None:
            meta.append(topk_weights.index_select(0, order))
    if x_scales is not None:
        meta.append(x_scales.index_select(0, order))
    packed, specs = pack_rows(meta)
    recv_meta = unpack_rows(all_to_all_rows(group, packed, send_counts, recv_counts, out_rows), specs)

    recv_src_idx = recv_meta.pop(0)[:, 0]
    recv_src_idx[num_recv:] = -1
    recv_topk_idx = recv_topk_weights = None
    if topk_idx is not None:
        raw_idx = recv_meta.pop(0)
        raw_idx[num_recv:] = -1
        raw_weights = recv_meta.pop(0) if topk_weights is not None else None
        recv_topk_idx, recv_topk_weights = to_local_experts(raw_idx, raw_weights, rank, num_local_experts)
    recv_scales = recv_meta.pop(0) if x_scales is not None else None

    per_expert = [] if num_worst_tokens else aligned_counts(host[2 * num_ranks :], expert_alignment)
    handle = DispatchHandle(
        rank_prefix_matrix=rank_prefix,
        channel_prefix_matrix=channels,
        recv_channel_prefix_matrix=recv_channel_prefix_matrix(all_channels, rank),
        recv_src_idx=recv_src_idx,
        is_token_in_rank=is_token_in_rank,
        send_head=send_head(is_token_in_rank),
    )
    return recv_x, recv_scales, recv_topk_idx, recv_topk_weights, per_expert, handle


def dispatch_cached(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    handle: DispatchHandle,
    workspace: Workspace,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dispatch along a previous dispatch's layout: no counts exchange, one all-to-all of rows."""
    send_counts, recv_counts = _block_counts(handle, group.rank())
    out_rows = handle.recv_src_idx.size(0)
    order = send_order(handle.is_token_in_rank)
    recv_x = _dispatch_rows(group, workspace, x, order, send_counts, recv_counts, out_rows)
    recv_scales = None
    if x_scales is not None:
        recv_scales = all_to_all_rows(group, x_scales.index_select(0, order), send_counts, recv_counts, out_rows)
    return recv_x, recv_scales


def combine(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    handle: DispatchHandle,
    topk_weights: Optional[torch.Tensor],
    biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    workspace: Workspace,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Send each received row back to its source and sum the copies of every token (fp32 accumulation)."""
    # The dispatch's directions reverse: what this rank received it now sends back.
    dispatch_sent, dispatch_received = _block_counts(handle, group.rank())
    num_recv = sum(dispatch_received)
    num_tokens, hidden = handle.is_token_in_rank.size(0), x.size(1)

    # One spare zero row at the end: tokens not sent to some rank read it instead of branching.
    landing = workspace.get("combine_recv", (sum(dispatch_sent) + 1, hidden), x.dtype, x.device)
    landing[-1].zero_()
    plan = local_self_block(group.rank(), dispatch_received, dispatch_sent)
    if plan is None:
        all_to_all_rows(group, x[:num_recv], dispatch_received, dispatch_sent, out=landing[:-1])
    else:
        (sb, se), (rb, re), (ob, oe), (lb, le) = plan.send, plan.recv, plan.send_others, plan.recv_others
        landing[rb:re].copy_(x[sb:se])
        all_to_all_rows(group, x[ob:oe], plan.send_counts, plan.recv_counts, out=landing[lb:le])
    combined = _sum_copies(workspace, landing, handle, biases)
    combined_weights = None
    if topk_weights is not None:
        returned_w = all_to_all_rows(group, topk_weights[:num_recv].contiguous(), dispatch_received, dispatch_sent)
        combined_weights = torch.zeros(num_tokens, topk_weights.size(1), dtype=torch.float32, device=x.device)
        combined_weights.index_add_(0, send_order(handle.is_token_in_rank), returned_w)
    return combined, combined_weights


def _dispatch_rows(
    group: dist.ProcessGroup,
    workspace: Workspace,
    x: torch.Tensor,
    order: torch.Tensor,
    send_counts: List[int],
    recv_counts: List[int],
    out_rows: Optional[int],
) -> torch.Tensor:
    """Send `x[order]` in blocks; the rank's own block is gathered straight into the output when it can."""
    plan = local_self_block(group.rank(), send_counts, recv_counts)
    if plan is None:
        return all_to_all_rows(group, _stage(workspace, x, order), send_counts, recv_counts, out_rows)
    num_recv = sum(recv_counts)
    total = out_rows or num_recv
    recv_x = torch.empty(total, *x.shape[1:], dtype=x.dtype, device=x.device)
    recv_x[num_recv:].zero_()
    (sb, se), (rb, re), (ob, oe), (lb, le) = plan.send, plan.recv, plan.send_others, plan.recv_others
    torch.index_select(x, 0, order[sb:se], out=recv_x[rb:re])
    # The self block is at an end of the send order, so the others' rows are one contiguous range of it.
    staged = _stage(workspace, x, order[ob:oe])
    all_to_all_rows(group, staged, plan.send_counts, plan.recv_counts, out=recv_x[lb:le])
    return recv_x


def _stage(workspace: Workspace, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Gather the rows to send, in send order, into reused scratch (the collective needs them contiguous)."""
    staged = workspace.get("send", (order.numel(), *x.shape[1:]), x.dtype, x.device)
    return torch.index_select(x, 0, order, out=staged)


_CHUNK_TOKENS = 256  # tokens reduced at a time on CPU: their fp32 partial sums stay in cache


def _sum_copies(
    workspace: Workspace,
    landing: torch.Tensor,
    handle: DispatchHandle,
    biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
) -> torch.Tensor:
    """
    Sum, in fp32, the copies of every token that came back, plus biases; cast once to the row dtype.

    Arguments:
        landing: `[num_returned + 1, hidden]`, the returned rows in send order, then one zero row.

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
    position = position.sort(dim=1).values.to(torch.int64)
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
        a.copy_(torch.index_select(landing, 0, position[begin:end, 0], out=r))
        for column in range(1, k):
            a.add_(torch.index_select(landing, 0, position[begin:end, column], out=r))
        for bias in biases:
            if bias is not None:
                a.add_(bias[begin:end])
        out[begin:end].copy_(a)
    return out
