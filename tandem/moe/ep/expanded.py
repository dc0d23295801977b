"""The expanded layout of DeepEP V2 (`do_expand=True`) and the reduction orders of its reference.

Expanded layout: one row per (received token, local expert) pair, grouped by local expert; within an
expert, pairs in received-row order (which is source global token order), then top-k order; each expert's
rows start at the aligned sum of the rows before it and the gap up to the next alignment is zero.

Pure tensor functions with no communication, so the tests can compute the same thing by hand.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from .layout import aligned_counts


class ExpandedLayout(NamedTuple):
    """
    Where every received (token, local expert) pair sits in the expanded tensors.

    Attributes:
        slots: `[num_recv, num_topk]` with `torch.int`, the expanded row of each selection, -1 where the
            expert is elsewhere or the entry is -1.
        entry_rows: `[num_pairs]` with `torch.int64`, expanded rows of the pairs, ascending.
        entry_src: `[num_pairs]` with `torch.int64`, `row * num_topk + k` of the pair at each of `entry_rows`.
        counts: Python list `[num_local_experts]`, pairs per local expert.
        num_rows: rows of the expanded tensors (at least the aligned total).
    """

    slots: torch.Tensor
    entry_rows: torch.Tensor
    entry_src: torch.Tensor
    counts: List[int]
    num_rows: int

    def first_rows(self, alignment: int) -> List[int]:
        """Each local expert's first expanded row (the aligned sum of the experts before it)."""
        aligned = aligned_counts(self.counts, alignment)
        return [sum(aligned[:e]) for e in range(len(aligned))]


def expanded_layout(
    recv_topk_idx: torch.Tensor, num_local_experts: int, alignment: int, num_rows: Optional[int] = None
) -> ExpandedLayout:
    """
    Arguments:
        recv_topk_idx: `[num_recv, num_topk]` with `torch.int64`, local expert ids or -1.
        num_local_experts: experts on this rank.
        alignment: align each expert's row count up to this.
        num_rows: allocate this many expanded rows (>= the aligned total); None: exactly the aligned total.

    Returns:
        layout: an `ExpandedLayout`.
    """
    num_topk = recv_topk_idx.size(1)
    flat = recv_topk_idx.reshape(-1)
    pairs = (flat >= 0).nonzero()[:, 0]  # ascending: row-major (row, k) order
    experts = flat.index_select(0, pairs)
    by_expert, perm = torch.sort(experts, stable=True)  # stable keeps (row, k) order within an expert
    counts = torch.bincount(experts, minlength=num_local_experts).tolist()  # host sync: the sizes
    aligned = aligned_counts(counts, alignment)
    total = sum(aligned)
    if num_rows is not None and num_rows < total:
        raise ValueError(f"the expanded layout needs {total} rows, more than the {num_rows} allocated")
    starts = torch.tensor([sum(aligned[:e]) for e in range(num_local_experts)], dtype=torch.int64,
                          device=flat.device)
    unaligned_starts = torch.tensor([sum(counts[:e]) for e in range(num_local_experts)], dtype=torch.int64,
                                    device=flat.device)
    within = torch.arange(pairs.numel(), device=flat.device) - unaligned_starts.index_select(0, by_expert)
    entry_rows = starts.index_select(0, by_expert) + within
    entry_src = pairs.index_select(0, perm)
    slots = torch.full_like(flat, -1, dtype=torch.int32)
    slots[entry_src] = entry_rows.to(torch.int32)
    return ExpandedLayout(slots.view(-1, num_topk), entry_rows, entry_src, counts,
                          total if num_rows is None else num_rows)


def expand_rows(rows: torch.Tensor, layout: ExpandedLayout, num_topk: int) -> torch.Tensor:
    """
    Arguments:
        rows: `[num_recv, ...]`, one row per received token.

    Returns:
        expanded: `[layout.num_rows, ...]` with `rows.dtype`, each pair's token row at its slot, zero elsewhere.
    """
    out = torch.zeros(layout.num_rows, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    out.index_copy_(0, layout.entry_rows, rows.index_select(0, layout.entry_src // num_topk))
    return out


def expand_weights(weights: torch.Tensor, layout: ExpandedLayout) -> torch.Tensor:
    """`[num_recv, num_topk]` per-selection weights -> `[layout.num_rows]`, 0 in padding rows."""
    out = torch.zeros(layout.num_rows, dtype=weights.dtype, device=weights.device)
    out.index_copy_(0, layout.entry_rows, weights.reshape(-1).index_select(0, layout.entry_src))
    return out


def unexpand_weights(weights: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`[num_expanded]` per-slot weights -> `[num_recv, num_topk]` per-selection weights, 0 where no slot."""
    taken = weights.index_select(0, slots.clamp(min=0).reshape(-1).to(torch.int64)).view(slots.shape)
    return torch.where(slots >= 0, taken, torch.zeros_like(taken))


def fold_expanded(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """
    Reduce each received token's expert rows to one row, in top-k order with fp32 accumulation (the
    within-rank reduction of DeepEP V2's reference combine).

    Arguments:
        x: `[num_expanded, hidden]`, expert outputs in the expanded layout.
        slots: `[num_recv, num_topk]` with `torch.int`, from `ExpandedLayout.slots`.

    Returns:
        folded: `[num_recv, hidden]` with `x.dtype`; rows with no local selection are zero.
    """
    acc = torch.zeros(slots.size(0), x.size(1), dtype=torch.float32, device=x.device)
    for k in range(slots.size(1)):
        rows = (slots[:, k] >= 0).nonzero()[:, 0]
        acc.index_add_(0, rows, x.index_select(0, slots[rows, k].to(torch.int64)).float())
    return acc.to(x.dtype)


def owner_ranks(topk_idx: torch.Tensor, num_local_experts: int) -> torch.Tensor:
    """`[num_tokens, num_topk]` rank holding each selected expert, -1 for a -1 entry."""
    return torch.where(topk_idx >= 0, topk_idx // num_local_experts, torch.full_like(topk_idx, -1))


def last_selection_order(topk_idx: torch.Tensor, num_ranks: int, num_local_experts: int) -> torch.Tensor:
    """
    The order DeepEP V2's reference adds a token's per-rank partial sums in: each rank's partial sits at
    the top-k position of the token's last selection on that rank, and positions are added in order.

    Arguments:
        topk_idx: `[num_tokens, num_topk]` with `torch.int64`, -1 for no expert.

    Returns:
        key: `[num_tokens, num_ranks]` with `torch.int64`, the last top-k position on each rank (-1 if none),
            to pass as `copy_order`.
    """
    owner = owner_ranks(topk_idx, num_local_experts)
    position = torch.arange(topk_idx.size(1), device=topk_idx.device).expand_as(topk_idx)
    key = torch.full((topk_idx.size(0), num_ranks), -1, dtype=torch.int64, device=topk_idx.device)
    return key.scatter_reduce_(1, owner.clamp(min=0), torch.where(owner >= 0, position, -1), "amax")


def selection_positions(topk_idx: torch.Tensor, num_ranks: int, num_local_experts: int):
    """
    Where each selection's expert row lands when every selection comes home as its own row, blocks by
    the rank holding the expert, then token order, then top-k order.

    Arguments:
        topk_idx: `[num_tokens, num_topk]` with `torch.int64`, -1 for no expert.

    Returns:
        positions: `[num_tokens, num_topk]` with `torch.int64`, the landing row of each selection; -1 entries
            point at row `num_selections` (a zero row the caller appends).
        per_rank: Python list `[num_ranks]`, selections held by each rank.
    """
    owner = owner_ranks(topk_idx, num_local_experts).reshape(-1)
    valid = (owner >= 0).nonzero()[:, 0]
    order = valid.index_select(0, torch.sort(owner.index_select(0, valid), stable=True).indices)
    positions = torch.full_like(owner, valid.numel())
    positions[order] = torch.arange(valid.numel(), device=owner.device)
    per_rank = torch.bincount(owner.index_select(0, valid), minlength=num_ranks).tolist()  # host sync
    return positions.view(topk_idx.shape), per_rank
