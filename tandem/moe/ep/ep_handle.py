"""`EPHandle`: the typed handle of DeepEP's V2 `ElasticBuffer`, with its fields in DeepEP's order.

DeepEP V2 replaced V1's positional handle tuple with this class. The fields below are DeepEP's (same
names, same constructor order), filled with the same meaning by the portable backend; the last two are
tandem's own, the route the portable exchange takes back (None in a handle built elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .handle import DispatchHandle


@dataclass(eq=False)
class EPHandle:
    """
    What `ElasticBuffer.dispatch` returns, for `combine` and for a cached `dispatch`.

    Attributes:
        do_expand: whether the expanded layout (one row per (token, local expert) pair) was used.
        num_experts: experts across the group.
        expert_alignment: each local expert's received row count is aligned up to this.
        num_max_tokens_per_rank: the `M` of the dispatch; source token `t` of rank `r` has the global index
            `r * M + t`.
        num_sms: the SM count the dispatch was given (recorded for parity; the portable backend uses none).
        topk_idx: `[num_tokens, num_topk]` with `torch.int64`, this rank's routing (a copy unless the dispatch
            was called with `do_handle_copy=False`).
        num_recv_tokens: rows of the received (non-expanded) tensors, which is `num_ranks * M` without
            `do_cpu_sync` (the valid count is `psum_num_recv_tokens_per_scaleup_rank[-1]`).
        num_expanded_tokens: rows of the expanded tensors (0 without `do_expand`).
        num_recv_tokens_per_expert_list: Python list `[num_local_experts]`, received tokens per local expert,
            aligned up to `expert_alignment`.
        psum_num_recv_tokens_per_scaleup_rank: `[num_ranks]` with `torch.int`, inclusive prefix sum of the
            tokens received from each source rank (each token once, however many of its experts are here).
        psum_num_recv_tokens_per_expert: `[num_local_experts]` with `torch.int`. Plain layout: inclusive prefix
            sum of the aligned counts. Expanded layout: expert `i`'s first row (the aligned sum of the experts
            before it) plus its unaligned count, so expert `i`'s rows are
            `[psum[i] - unaligned[i], psum[i])` and its padding runs to `align(psum[i], expert_alignment)`.
        num_unaligned_recv_tokens_per_expert: `[num_local_experts]` with `torch.int`, the received
            (token, expert) pairs per local expert before alignment.
        recv_src_metadata: `[num_recv_tokens, 2 + num_topk]` with `torch.int`: column 0 the source token's
            global index, column 1 its source rank, column `2 + k` the row of the received tensor that holds
            the token's `k`-th selection (its own row in the plain layout, its expert slot in the expanded
            one), -1 where that expert is on another rank or the entry is -1. Padding rows are -1.
        dst_buffer_slot_idx: `[num_tokens, num_topk]` with `torch.int`, for each of this rank's selections the
            row its token lands in on the rank that holds the expert (the non-expanded received tensor there),
            -1 for a -1 entry.
        token_metadata_at_forward: hybrid (multi-node forwarding) mode only; always None here.
        channel_linked_list: hybrid mode only; always None here.
        route: tandem's own: the V1 `DispatchHandle` of the exchange, which cached dispatch and combine follow.
        recv_topk_idx: tandem's own: `[num_recv_tokens, num_topk]` with `torch.int64`, the local expert ids
            received (-1 elsewhere), returned again by a cached plain dispatch.
    """

    do_expand: bool
    num_experts: int
    expert_alignment: int
    num_max_tokens_per_rank: int
    num_sms: int
    topk_idx: torch.Tensor
    num_recv_tokens: int
    num_expanded_tokens: int
    num_recv_tokens_per_expert_list: List[int]
    psum_num_recv_tokens_per_scaleup_rank: torch.Tensor
    psum_num_recv_tokens_per_expert: torch.Tensor
    num_unaligned_recv_tokens_per_expert: torch.Tensor
    recv_src_metadata: torch.Tensor
    dst_buffer_slot_idx: torch.Tensor
    token_metadata_at_forward: Optional[torch.Tensor] = None
    channel_linked_list: Optional[torch.Tensor] = None
    route: Optional[DispatchHandle] = field(default=None, repr=False)
    recv_topk_idx: Optional[torch.Tensor] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # DeepEP keeps this for its deterministic re-sort; the portable order needs no re-sort.
        self.cached_recv_src_metadata_before_sort: Optional[torch.Tensor] = None

    @property
    def num_valid_recv_tokens(self) -> int:
        """Received tokens without padding (a host read)."""
        return int(self.psum_num_recv_tokens_per_scaleup_rank[-1])
