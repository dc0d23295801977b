"""Where each token goes: the layout math of `get_dispatch_layout` and the send order it implies.

Pure tensor functions with no communication, so the same code computes the reference in tests.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def token_expert_mask(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """
    Arguments:
        topk_idx: `[num_tokens, num_topk]` with `torch.int64`, -1 for no expert.
        num_experts: the number of experts.

    Returns:
        mask: `[num_tokens, num_experts]` with `torch.bool`, whether a token selected an expert.
    """
    valid = topk_idx >= 0
    # scatter_add, not scatter: a -1 slot and a real expert 0 may write the same cell.
    counts = torch.zeros(topk_idx.size(0), num_experts, dtype=torch.int32, device=topk_idx.device)
    counts.scatter_add_(1, topk_idx.clamp(min=0), valid.to(torch.int32))
    return counts > 0


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, num_rdma_ranks: int = 1
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """
    The four layout tensors of DeepEP's `get_dispatch_layout`.

    Arguments:
        topk_idx: `[num_tokens, num_topk]` with `torch.int64`, -1 for no expert.
        num_experts: experts across all ranks, divisible by `num_ranks`.
        num_ranks: the group size.
        num_rdma_ranks: nodes in the group (consecutive blocks of ranks); 1 within a node.

    Returns:
        num_tokens_per_rank: `[num_ranks]` with `torch.int`.
        num_tokens_per_rdma_rank: `[num_rdma_ranks]` with `torch.int`, or None when `num_rdma_ranks == 1`.
        num_tokens_per_expert: `[num_experts]` with `torch.int`.
        is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`.
    """
    num_tokens = topk_idx.size(0)
    in_expert = token_expert_mask(topk_idx, num_experts)
    is_token_in_rank = in_expert.view(num_tokens, num_ranks, num_experts // num_ranks).any(dim=2)
    num_tokens_per_rdma_rank = None
    if num_rdma_ranks > 1:
        per_node = -(-num_ranks // num_rdma_ranks)
        padded = torch.zeros(num_tokens, num_rdma_ranks * per_node, dtype=torch.bool, device=topk_idx.device)
        padded[:, :num_ranks] = is_token_in_rank
        num_tokens_per_rdma_rank = padded.view(num_tokens, num_rdma_ranks, per_node).any(2).sum(0).to(torch.int32)
    return (
        is_token_in_rank.sum(0).to(torch.int32),
        num_tokens_per_rdma_rank,
        in_expert.sum(0).to(torch.int32),
        is_token_in_rank,
    )


def send_order(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """
    Token indices in send order: destination rank ascending, token order within each block.

    Arguments:
        is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`.

    Returns:
        token_idx: `[sum(is_token_in_rank)]` with `torch.int64`.
    """
    # nonzero on the transpose walks rank-major, token-minor: exactly the block order.
    return is_token_in_rank.t().nonzero()[:, 1]


def token_prefix(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """
    Arguments:
        is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`.

    Returns:
        prefix: `[num_tokens + 1, num_ranks]` with `torch.int`, row `t` counts the tokens before `t` that go
            to each rank (`send_head` and `channel_prefix_matrix` both read it).
    """
    prefix = torch.zeros(is_token_in_rank.size(0) + 1, is_token_in_rank.size(1), dtype=torch.int32,
                         device=is_token_in_rank.device)
    torch.cumsum(is_token_in_rank, 0, dtype=torch.int32, out=prefix[1:])
    return prefix


def send_head(is_token_in_rank: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    Arguments:
        is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`.
        prefix: its `token_prefix`, when already computed.

    Returns:
        head: `[num_tokens, num_ranks]` with `torch.int`, each token's row within its block to each rank, or -1.
    """
    if prefix is None:
        prefix = token_prefix(is_token_in_rank)
    return torch.where(is_token_in_rank, prefix[:-1], torch.full_like(prefix[:-1], -1))


def channel_prefix_matrix(
    is_token_in_rank: torch.Tensor, num_channels: int, prefix: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """
    Per destination rank, the inclusive count of tokens over channels `0..c`, where channel `c` owns
    tokens `[c * ceil(T / C), (c + 1) * ceil(T / C))` as in DeepEP's kernels.

    Arguments:
        is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`.
        num_channels: the number of channels `C`.
        prefix: its `token_prefix`, when already computed.

    Returns:
        prefix: `[num_ranks, num_channels]` with `torch.int`.
    """
    if prefix is None:
        prefix = token_prefix(is_token_in_rank)
    num_tokens = prefix.size(0) - 1
    per_channel = max(-(-num_tokens // num_channels), 1)
    ends = torch.clamp(torch.arange(1, num_channels + 1, device=prefix.device) * per_channel, max=num_tokens)
    return prefix[ends].t().contiguous()


def recv_channel_prefix_matrix(all_channel_prefix: torch.Tensor, rank: int) -> torch.Tensor:
    """
    Arguments:
        all_channel_prefix: `[num_ranks, num_ranks, num_channels]` with `torch.int`, every source rank's
            `channel_prefix_matrix`.
        rank: the receiving rank.

    Returns:
        starts: `[num_ranks, num_channels]` with `torch.int`, the row in this rank's received tensor where
            each source rank's channel begins.
    """
    mine = all_channel_prefix[:, rank, :]  # [src, C]
    block_start = torch.cumsum(mine[:, -1], 0, dtype=torch.int32) - mine[:, -1]
    within = torch.cat([torch.zeros_like(mine[:, :1]), mine[:, :-1]], dim=1)
    return (block_start[:, None] + within).to(torch.int32)


def to_local_experts(
    topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], rank: int, num_local_experts: int
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """
    Rewrite global expert ids as this rank's local ids; experts elsewhere become -1 with weight 0.

    Returns:
        local_idx: `[n, num_topk]` with `torch.int64`, in `[-1, num_local_experts)`.
        local_weights: `[n, num_topk]` with `torch.float`, or None when no weights were given.
    """
    local = topk_idx - rank * num_local_experts
    here = (topk_idx >= 0) & (local >= 0) & (local < num_local_experts)
    local_idx = torch.where(here, local, torch.full_like(local, -1))
    local_weights = None
    if topk_weights is not None:
        local_weights = torch.where(here, topk_weights, torch.zeros_like(topk_weights))
    return local_idx, local_weights


def aligned_counts(counts: List[int], alignment: int) -> List[int]:
    """Round each count up to a multiple of `alignment`."""
    return [-(-c // alignment) * alignment for c in counts]
