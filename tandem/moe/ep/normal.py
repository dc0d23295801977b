"""High-throughput dispatch and combine on `all_to_all_single`.

A fresh dispatch is three collectives: one small all-gather of per-expert and per-channel counts (every
rank then knows the whole rank prefix matrix), one all-to-all of the token rows, and one all-to-all of the
per-token metadata (top-k ids and weights, source index, FP8 scales) packed as bytes. A cached dispatch
and a combine are one all-to-all of rows each (plus one for weights or scales when present).

`all_to_all_single` takes its split sizes on the host, so each call makes one deliberate host sync to read
the counts; DeepEP's notify kernel makes the same sync unless `num_worst_tokens` is given.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .exchange import all_gather_ints, all_to_all_rows, pack_rows, unpack_rows
from .handle import DispatchHandle
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
    recv_x = all_to_all_rows(group, x.index_select(0, order), send_counts, recv_counts, out_rows)

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
    group: dist.ProcessGroup, x: torch.Tensor, x_scales: Optional[torch.Tensor], handle: DispatchHandle
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Dispatch along a previous dispatch's layout: no counts exchange, one all-to-all of rows."""
    send_counts, recv_counts = _block_counts(handle, group.rank())
    out_rows = handle.recv_src_idx.size(0)
    order = send_order(handle.is_token_in_rank)
    recv_x = all_to_all_rows(group, x.index_select(0, order), send_counts, recv_counts, out_rows)
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
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Send each received row back to its source and sum the copies of every token (fp32 accumulation)."""
    # The dispatch's directions reverse: what this rank received it now sends back.
    dispatch_sent, dispatch_received = _block_counts(handle, group.rank())
    num_recv = sum(dispatch_received)
    num_tokens = handle.is_token_in_rank.size(0)
    order = send_order(handle.is_token_in_rank)

    returned = all_to_all_rows(group, x[:num_recv].contiguous(), dispatch_received, dispatch_sent)
    combined = torch.zeros(num_tokens, x.size(1), dtype=torch.float32, device=x.device)
    combined.index_add_(0, order, returned.float())
    for bias in biases:
        if bias is not None:
            combined += bias.float()

    combined_weights = None
    if topk_weights is not None:
        returned_w = all_to_all_rows(group, topk_weights[:num_recv].contiguous(), dispatch_received, dispatch_sent)
        combined_weights = torch.zeros(num_tokens, topk_weights.size(1), dtype=torch.float32, device=x.device)
        combined_weights.index_add_(0, order, returned_w)
    return combined.to(x.dtype), combined_weights
