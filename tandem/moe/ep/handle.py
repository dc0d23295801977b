"""Typed communication handles that still index like DeepEP's tuples."""

from __future__ import annotations

from typing import NamedTuple

import torch


class DispatchHandle(NamedTuple):
    """
    What `Buffer.dispatch` returns for `combine` and for a cached `dispatch`; fields in DeepEP's
    intranode order, so `handle[0]` is the rank prefix matrix.

    Attributes:
        rank_prefix_matrix: `[num_ranks, num_ranks]` with `torch.int`; entry `[i, j]` is the number of
            tokens ranks `0..i` send to rank `j` (inclusive prefix), identical on every rank.
        channel_prefix_matrix: `[num_ranks, num_channels]` with `torch.int`; inclusive count of this rank's
            tokens for each destination rank over channels `0..c` (tokens split evenly into channels).
        recv_channel_prefix_matrix: `[num_ranks, num_channels]` with `torch.int`; row offset in the received
            tensor where source rank `i`'s channel `c` begins.
        recv_src_idx: `[num_recv_tokens]` with `torch.int`; each received row's token index on its source
            rank (padded with -1 to `num_worst_tokens` when that was given).
        is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`; this rank's own send layout.
        send_head: `[num_tokens, num_ranks]` with `torch.int`; the position of each of this rank's tokens
            within the block sent to each rank, -1 where it is not sent.
    """

    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor


class LowLatencyHandle(NamedTuple):
    """
    What `Buffer.low_latency_dispatch` returns for `low_latency_combine`, in DeepEP's order.

    Attributes:
        src_info: `[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank]` with `torch.int`;
            each received slot's token index on its source rank (-1 in unused slots).
        layout_range: `[num_local_experts, num_ranks]` with `torch.int64`; `(begin << 32) | count` of the
            slots that source rank `j` filled for local expert `e`.
        num_max_dispatch_tokens_per_rank: the `M` the dispatch was called with.
        hidden: the hidden size of the dispatched tokens.
        num_experts: the number of experts across all ranks.
    """

    src_info: torch.Tensor
    layout_range: torch.Tensor
    num_max_dispatch_tokens_per_rank: int
    hidden: int
    num_experts: int
