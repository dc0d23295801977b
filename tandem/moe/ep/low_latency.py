"""Low-latency dispatch and combine: fixed-shape per-expert receive slots, weighted combine.

Each (token, expert) pair is one message, as in DeepEP's IBGDA kernels. Slots of local expert `e` are
filled source rank by source rank in ascending order (DeepEP fills them in arrival order; a fixed order
makes the portable backend deterministic), and `layout_range[e, j] = (begin << 32) | count` records
where rank `j`'s messages landed. Combine sends every slot back along the same layout and the source
rank reduces the copies with its top-k weights.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from .exchange import all_gather_ints, all_to_all_rows, pack_rows, unpack_rows
from .handle import LowLatencyHandle

FP8_MAX = 448.0  # the largest finite float8_e4m3fn value


def _messages(topk_idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, k) pairs with an expert, sorted by global expert id (stable, so token order holds).

    Sorting by expert id groups messages by destination rank, then by local expert: the order in which
    they are sent, received and, in combine, returned.
    """
    num_tokens, num_topk = topk_idx.shape
    flat = topk_idx.reshape(-1)
    keep = (flat >= 0).nonzero()[:, 0]
    perm = torch.sort(flat[keep], stable=True).indices
    entry = keep[perm]
    return flat[entry], entry // num_topk, entry  # expert, token, flat (token * K + k)


def cast_to_fp8(x: torch.Tensor, round_scale: bool, use_ue8m0: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Per-token, per-128-channel FP8 cast of DeepEP's low-latency dispatch.

    Returns:
        x_fp8: `[n, hidden]` with `torch.float8_e4m3fn`.
        scales: `[n, hidden // 128]` with `torch.float` (dequantised value = x_fp8 * scale); with
            `use_ue8m0`, `[n, hidden // 512]` with `torch.int`, four UE8M0 exponent bytes per int.
    """
    n, hidden = x.shape
    groups = x.float().view(n, hidden // 128, 128)
    scale = groups.abs().amax(dim=2).clamp(min=1e-4) / FP8_MAX
    if round_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    x_fp8 = (groups / scale[:, :, None]).view(n, hidden).to(torch.float8_e4m3fn)
    if use_ue8m0:
        # A power-of-two float's exponent byte is its UE8M0 encoding.
        exponent = ((scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
        return x_fp8, exponent.contiguous().view(torch.int32)
    return x_fp8, scale


def _slot_index(counts: torch.Tensor, slots_per_expert: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Arguments:
        counts: `[num_ranks, num_local_experts]`, messages from each source rank for each local expert.

    Returns:
        slot: flat slot (`e * slots_per_expert + begin + j`) of each message in source-major,
            expert-minor order, the order the all-to-all delivers them in.
        begin: `[num_local_experts, num_ranks]`, where each source rank's messages start for each expert.
    """
    per_expert = counts.t()  # [E_local, R]
    begin = per_expert.cumsum(1) - per_expert
    pair_counts = counts.reshape(-1)
    pair_base = (torch.arange(counts.size(1), device=counts.device)[None, :] * slots_per_expert + begin.t()).reshape(-1)
    pair_start = pair_counts.cumsum(0) - pair_counts
    total = int(pair_counts.sum())
    within = torch.arange(total, device=counts.device) - torch.repeat_interleave(pair_start, pair_counts)
    return torch.repeat_interleave(pair_base, pair_counts) + within, begin


def ll_dispatch(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    num_max_dispatch_tokens_per_rank: int,
    num_experts: int,
    use_fp8: bool,
    round_scale: bool,
    use_ue8m0: bool,
):
    """Returns (recv_x, recv_scales or None, recv_count, handle)."""
    rank, num_ranks = group.rank(), group.size()
    num_local = num_experts // num_ranks
    slots = num_ranks * num_max_dispatch_tokens_per_rank
    hidden = x.size(1)
    expert, token, _ = _messages(topk_idx)

    per_expert = torch.bincount(expert, minlength=num_experts).to(torch.int32)
    gathered = all_gather_ints(group, per_expert)  # [src, E]
    recv_pairs = gathered[:, rank * num_local : (rank + 1) * num_local]  # [src, E_local]
    send_counts = per_expert.view(num_ranks, num_local).sum(1)
    host = torch.cat([send_counts, recv_pairs.sum(1)]).tolist()  # host sync: split sizes

    payload = [token.to(torch.int32)[:, None]]
    if use_fp8:
        payload.extend(cast_to_fp8(x.index_select(0, token), round_scale, use_ue8m0))
    else:
        payload.append(x.index_select(0, token))
    packed, specs = pack_rows(payload)
    received = unpack_rows(all_to_all_rows(group, packed, host[:num_ranks], host[num_ranks:]), specs)

    slot, begin = _slot_index(recv_pairs.to(torch.int64), slots)
    src_info = torch.full((num_local * slots,), -1, dtype=torch.int32, device=x.device)
    src_info[slot] = received[0][:, 0]
    recv_x = torch.zeros(num_local * slots, hidden, dtype=received[1].dtype, device=x.device)
    recv_x[slot] = received[1]
    recv_scales = None
    if use_fp8:
        scales = received[2]
        flat = torch.zeros(num_local * slots, scales.size(1), dtype=scales.dtype, device=x.device)
        flat[slot] = scales
        # DeepEP hands scales out column-major in the last two dims (TMA-friendly): same strides here.
        recv_scales = flat.view(num_local, slots, -1).transpose(1, 2).contiguous().transpose(1, 2)

    counts = recv_pairs.t().to(torch.int64)
    layout_range = (begin.to(torch.int64) << 32) | counts
    handle = LowLatencyHandle(
        src_info.view(num_local, slots), layout_range, num_max_dispatch_tokens_per_rank, hidden, num_experts
    )
    recv_count = recv_pairs.sum(0).to(torch.int32)
    return recv_x.view(num_local, slots, hidden), recv_scales, recv_count, handle


def ll_combine(
    group: dist.ProcessGroup,
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weights: torch.Tensor,
    handle: LowLatencyHandle,
) -> torch.Tensor:
    """Send every filled slot back to its source rank; each token is the weighted sum of its copies."""
    num_ranks = group.size()
    num_local, slots, hidden = x.shape
    counts = handle.layout_range & 0xFFFFFFFF  # [E_local, R]
    gather, _ = _slot_index(counts.t().contiguous(), slots)
    expert, token, flat = _messages(topk_idx)
    expected_back = torch.bincount(expert // num_local, minlength=num_ranks)
    host = torch.cat([counts.sum(0), expected_back.to(counts.dtype)]).tolist()  # host sync: split sizes

    rows = x.reshape(num_local * slots, hidden).index_select(0, gather)
    returned = all_to_all_rows(group, rows, host[:num_ranks], host[num_ranks:])
    weights = topk_weights.reshape(-1).index_select(0, flat).float()
    combined = torch.zeros(topk_idx.size(0), hidden, dtype=torch.float32, device=x.device)
    combined.index_add_(0, token, returned.float() * weights[:, None])
    return combined.to(x.dtype)
