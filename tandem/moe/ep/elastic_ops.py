"""DeepEP V2's dispatch and combine, built from the V1 exchanges in `normal.py`.

A V2 dispatch is a V1 dispatch (the same three collectives, the same row order: source rank ascending,
source token order within a block, which is also the order DeepEP's deterministic mode sorts into), plus
the V2 handle's bookkeeping, plus a local re-layout into the expanded tensors when asked. A V2 combine is
a V1 combine whose copies are added in the order of DeepEP's reference (`deep_ep/utils/refs.py`): bias
first, then each rank's partial sum at the top-k position of the token's last selection on that rank.
Without `allow_multiple_reduction` an expanded combine sends every selection home as its own row and
adds them in top-k order, as the reference does for that setting.

Every result is fully ordered, so equal inputs give bit-identical outputs: `deterministic=True` holds by
construction and changes nothing.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import normal
from .ep_handle import EPHandle
from .exchange import start_all_to_all_rows
from .expanded import (
    ExpandedLayout,
    expand_rows,
    expand_weights,
    expanded_layout,
    fold_expanded,
    last_selection_order,
    owner_ranks,
    selection_positions,
    unexpand_weights,
)
from .layout import aligned_counts, dispatch_layout
from .workspace import Workspace

# DeepEP pads the column-major scale layout's token stride to 4 packs (16 bytes) for TMA loads.
_TMA_SCALE_ALIGNMENT = 4


def worst_case_rows(num_ranks: int, num_max_tokens_per_rank: int, num_topk: int, num_local_experts: int,
                    alignment: int, do_expand: bool) -> int:
    """DeepEP's receive sizes without a CPU sync: `R * M` tokens, or the most expanded rows they can need."""
    num_recv = num_ranks * num_max_tokens_per_rank
    if not do_expand:
        return num_recv
    expanded = num_recv * min(num_topk, num_local_experts) + (alignment - 1) * num_local_experts
    return -(-expanded // alignment) * alignment


def dispatch(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_idx: torch.Tensor,
    topk_weights: Optional[torch.Tensor],
    num_experts: int,
    num_max_tokens_per_rank: int,
    expert_alignment: int,
    do_cpu_sync: bool,
    do_expand: bool,
    num_sms: int,
    workspace: Workspace,
):
    """A fresh V2 dispatch; returns `(recv_x, recv_scales, recv_topk_idx, recv_topk_weights, handle)`."""
    rank, num_ranks = group.rank(), group.size()
    num_local_experts, num_topk = num_experts // num_ranks, topk_idx.size(1)
    _, _, per_expert, in_rank = dispatch_layout(topk_idx, num_experts, num_ranks)
    padded = 0 if do_cpu_sync else num_ranks * num_max_tokens_per_rank
    fresh = normal.dispatch_fresh(group, x, x_scales, topk_idx, topk_weights, in_rank, per_expert, padded,
                                  1, workspace, num_max_tokens_per_rank)
    # Without a given M the group's largest token count of this call numbers the sources (DeepEP needs M).
    m = num_max_tokens_per_rank or fresh.max_tokens_per_rank
    route, recv_idx = fresh.handle, fresh.recv_topk_idx
    num_rows, num_valid = recv_idx.size(0), sum(fresh.recv_counts)

    metadata = torch.full((num_rows, 2 + num_topk), -1, dtype=torch.int32, device=x.device)
    source = torch.repeat_interleave(torch.arange(num_ranks, device=x.device),
                                     torch.tensor(fresh.recv_counts, device=x.device))
    metadata[:num_valid, 0] = (source * m + route.recv_src_idx[:num_valid]).to(torch.int32)
    metadata[:num_valid, 1] = source.to(torch.int32)

    layout: Optional[ExpandedLayout] = None
    if do_expand:
        worst = None if do_cpu_sync else worst_case_rows(num_ranks, m, num_topk, num_local_experts,
                                                         expert_alignment, True)
        layout = expanded_layout(recv_idx, num_local_experts, expert_alignment, worst)
        metadata[:, 2:] = layout.slots
        counts = layout.counts
        first_rows = torch.tensor(layout.first_rows(expert_alignment), dtype=torch.int32, device=x.device)
        psum_per_expert = first_rows + torch.tensor(counts, dtype=torch.int32, device=x.device)
    else:
        rows = torch.arange(num_rows, dtype=torch.int32, device=x.device)[:, None]
        metadata[:, 2:] = torch.where(recv_idx >= 0, rows, -1)
        counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=num_local_experts).tolist()  # host sync
        aligned = torch.tensor(aligned_counts(counts, expert_alignment), dtype=torch.int32, device=x.device)
        psum_per_expert = aligned.cumsum(0, dtype=torch.int32)

    handle = EPHandle(
        do_expand=do_expand,
        num_experts=num_experts,
        expert_alignment=expert_alignment,
        num_max_tokens_per_rank=m,
        num_sms=num_sms,
        topk_idx=topk_idx,
        num_recv_tokens=num_rows,
        num_expanded_tokens=layout.num_rows if layout is not None else 0,
        num_recv_tokens_per_expert_list=aligned_counts(counts, expert_alignment),
        psum_num_recv_tokens_per_scaleup_rank=route.rank_prefix_matrix[:, rank].clone(),
        psum_num_recv_tokens_per_expert=psum_per_expert,
        num_unaligned_recv_tokens_per_expert=torch.tensor(counts, dtype=torch.int32, device=x.device),
        recv_src_metadata=metadata,
        dst_buffer_slot_idx=_destination_rows(route, topk_idx, rank, num_local_experts),
        route=route,
        recv_topk_idx=recv_idx,
    )
    recv_x, recv_scales, recv_weights = fresh.recv_x, fresh.recv_scales, fresh.recv_topk_weights
    if layout is None:
        return recv_x, recv_scales, recv_idx, recv_weights, handle
    return _expanded_outputs(recv_x, recv_scales, recv_weights, layout, num_topk) + (handle,)


def dispatch_cached(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    x_scales: Optional[torch.Tensor],
    topk_weights: Optional[torch.Tensor],
    handle: EPHandle,
    workspace: Workspace,
):
    """A V2 dispatch along `handle`; returns `(recv_x, recv_scales, recv_topk_idx, recv_topk_weights)`."""
    recv_x, recv_scales, recv_weights = normal.dispatch_cached(group, x, x_scales, handle.route, workspace,
                                                               topk_weights)
    local_idx = handle.recv_topk_idx
    if recv_weights is not None:
        recv_weights = torch.where(local_idx >= 0, recv_weights, torch.zeros_like(recv_weights))
    if not handle.do_expand:
        return recv_x, recv_scales, local_idx.clone(), recv_weights
    return _expanded_outputs(recv_x, recv_scales, recv_weights, _layout_of(handle), handle.topk_idx.size(1))


def combine(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    handle: EPHandle,
    topk_weights: Optional[torch.Tensor],
    biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    allow_multiple_reduction: bool,
    workspace: Workspace,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A V2 combine; returns `(combined_x, combined_topk_weights)` (see the module docstring for the order)."""
    num_ranks = group.size()
    num_local_experts = handle.num_experts // num_ranks
    num_valid = int(handle.route.rank_prefix_matrix[-1, group.rank()])
    slots = handle.recv_src_metadata[:num_valid, 2:]
    if handle.do_expand and not allow_multiple_reduction:
        return _combine_every_selection(group, x, handle, slots, biases, num_local_experts), None
    if handle.do_expand:
        rows = fold_expanded(x, slots)
        weights = unexpand_weights(topk_weights, slots) if topk_weights is not None else None
    else:
        rows = x
        # Only the rank holding an expert returns its weight, so the sum over ranks selects it.
        weights = None if topk_weights is None else torch.where(
            slots >= 0, topk_weights[:num_valid], torch.zeros_like(topk_weights[:num_valid]))
    order = last_selection_order(handle.topk_idx, num_ranks, num_local_experts)
    return normal.combine(group, rows, handle.route, weights, biases, workspace, copy_order=order, bias_first=True)


def _combine_every_selection(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    handle: EPHandle,
    slots: torch.Tensor,
    biases: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]],
    num_local_experts: int,
) -> torch.Tensor:
    """Expanded combine with one reduction only: every selection's row goes home and is added there."""
    num_ranks, num_topk = group.size(), slots.size(1)
    flat = slots.reshape(-1)
    pairs = (flat >= 0).nonzero()[:, 0]  # (received row, k) order: blocks by source rank already
    source = handle.recv_src_metadata[:, 1].index_select(0, pairs // num_topk).to(torch.int64)
    send_counts = torch.bincount(source, minlength=num_ranks).tolist()  # host sync: split sizes
    positions, recv_counts = selection_positions(handle.topk_idx, num_ranks, num_local_experts)
    landing = torch.empty(sum(recv_counts) + 1, x.size(1), dtype=x.dtype, device=x.device)
    landing[-1].zero_()
    _, work = start_all_to_all_rows(group, x.index_select(0, flat.index_select(0, pairs).to(torch.int64)),
                                    send_counts, recv_counts, out=landing[:-1])
    num_tokens = positions.size(0)
    acc = torch.zeros(num_tokens, x.size(1), dtype=torch.float32, device=x.device)
    for bias in biases:
        if bias is not None:
            acc.add_(bias)
    if work is not None:
        work.wait()
    for k in range(num_topk):
        acc.add_(landing.index_select(0, positions[:, k]))
    return acc.to(x.dtype)


def _expanded_outputs(recv_x, recv_scales, recv_weights, layout: ExpandedLayout, num_topk: int):
    return (
        expand_rows(recv_x, layout, num_topk),
        expand_rows(recv_scales, layout, num_topk) if recv_scales is not None else None,
        None,
        expand_weights(recv_weights, layout) if recv_weights is not None else None,
    )


def _layout_of(handle: EPHandle) -> ExpandedLayout:
    """The expanded layout a handle recorded (its slots), to expand a cached dispatch the same way."""
    slots = handle.recv_src_metadata[:, 2:]
    flat = slots.reshape(-1)
    pairs = (flat >= 0).nonzero()[:, 0]
    return ExpandedLayout(slots, flat.index_select(0, pairs).to(torch.int64), pairs,
                          handle.num_unaligned_recv_tokens_per_expert.tolist(), handle.num_expanded_tokens)


def _destination_rows(route, topk_idx: torch.Tensor, rank: int, num_local_experts: int) -> torch.Tensor:
    """`[num_tokens, num_topk]`: the row each selection's token lands in on the expert's rank, or -1."""
    before = route.rank_prefix_matrix[rank - 1] if rank > 0 else torch.zeros_like(route.rank_prefix_matrix[0])
    per_rank = before[None, :] + route.send_head  # row on every rank it is sent to (garbage where not sent)
    owner = owner_ranks(topk_idx, num_local_experts)
    rows = per_rank.gather(1, owner.clamp(min=0))
    return torch.where(owner >= 0, rows, torch.full_like(rows, -1)).to(torch.int32)


def tma_column_major(scales: torch.Tensor) -> torch.Tensor:
    """The same values laid out column-major with the token stride padded for TMA, as DeepEP returns them."""
    num_tokens = scales.size(0)
    stride = -(-num_tokens // _TMA_SCALE_ALIGNMENT) * _TMA_SCALE_ALIGNMENT
    out = torch.empty_strided(scales.shape, (1, max(stride, 1)), dtype=scales.dtype, device=scales.device)
    return out.copy_(scales)
