"""Byte-level collectives the portable backend is built from.

Every payload crosses the wire as `uint8` rows: gloo and NCCL both move bytes, so bf16, FP8 and int64
travel unchanged on either backend, and one code path serves CPU and GPU.
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def start_all_gather_ints(group: dist.ProcessGroup, values: torch.Tensor) -> Tuple[torch.Tensor, dist.Work]:
    """
    Start gathering one small int32 vector from every rank; read the result after `work.wait()`.

    Arguments:
        group: the process group.
        values: `[n]` with `torch.int`, this rank's vector (same `n` on every rank).

    Returns:
        gathered: `[num_ranks, n]` with `torch.int`, row `i` from rank `i` once the work is done.
        work: the collective in flight.
    """
    # An all-to-all of the vector repeated once per rank rather than an all-gather: gloo's all-gather passes
    # blocks around the ranks in dependent steps, each waiting for the next rank to wake up, while the
    # all-to-all has every message in flight at once (4 ranks on 2 vCPUs, ranks arriving 0.3 ms apart:
    # 4.5 ms against 2.9 ms; equal at 2 ranks). The extra bytes are num_ranks small vectors.
    world = group.size()
    out = torch.empty(world * values.numel(), dtype=values.dtype, device=values.device)
    work = dist.all_to_all_single(out, values.contiguous().repeat(world), group=group, async_op=True)
    return out.view(world, values.numel()), work


def all_gather_ints(group: dist.ProcessGroup, values: torch.Tensor) -> torch.Tensor:
    """`start_all_gather_ints`, waited for: `[num_ranks, n]` with `torch.int`, row `i` from rank `i`."""
    gathered, work = start_all_gather_ints(group, values)
    work.wait()
    return gathered


def as_byte_rows(rows: torch.Tensor) -> torch.Tensor:
    """View a contiguous `[n, ...]` tensor of any dtype as `[n, row_bytes]` uint8, without a copy."""
    n = rows.size(0)
    width = math.prod(rows.shape[1:]) * rows.element_size()
    if n == 0 or width == 0:
        # reshape(0, -1) is ambiguous, and an empty tensor has no bytes to reinterpret anyway.
        return torch.empty(n, width, dtype=torch.uint8, device=rows.device)
    return rows.reshape(n, -1).view(torch.uint8)


def start_all_to_all_rows(
    group: dist.ProcessGroup,
    rows: torch.Tensor,
    send_counts: Sequence[int],
    recv_counts: Sequence[int],
    out_rows: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[dist.Work]]:
    """
    Start exchanging variable-length blocks of rows: block `j` of `rows` goes to rank `j`.

    The caller overlaps its own work with the transfer and calls `work.wait()` before reading the output
    or writing `rows` (work is None when there is nothing to move).

    Arguments:
        group: the process group.
        rows: `[sum(send_counts), ...]` of any dtype, contiguous, blocks ordered by destination rank.
        send_counts: rows sent to each rank.
        recv_counts: rows received from each rank.
        out_rows: allocate this many output rows (>= `sum(recv_counts)`); the extra rows are zeroed.
        out: receive into this `[out_rows or sum(recv_counts), ...]` tensor of `rows.dtype` instead of a
            fresh one.

    Returns:
        received: `[out_rows or sum(recv_counts), ...]` with `rows.dtype`, blocks ordered by source rank.
        work: the collective in flight, or None.
    """
    num_recv = int(sum(recv_counts))
    total = num_recv if out_rows is None else out_rows
    send = as_byte_rows(rows)
    if out is None:
        out = torch.empty(total, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    if out.shape[0] != total or out.shape[1:] != rows.shape[1:] or out.dtype != rows.dtype:
        raise ValueError(f"out must be {[total, *rows.shape[1:]]} {rows.dtype}, got {list(out.shape)} {out.dtype}")
    received = as_byte_rows(out)
    if total > num_recv:
        received[num_recv:].zero_()
    work = None
    if send.size(1) > 0:  # every rank has the same row width, so all call or none do
        work = dist.all_to_all_single(
            received[:num_recv], send, output_split_sizes=list(recv_counts), input_split_sizes=list(send_counts),
            group=group, async_op=True,
        )
    return out, work


def all_to_all_rows(group: dist.ProcessGroup, rows: torch.Tensor, send_counts: Sequence[int],
                    recv_counts: Sequence[int]) -> torch.Tensor:
    """
    `start_all_to_all_rows`, waited for, into fresh exactly-sized output (the low-latency path's use; the
    others overlap work with the transfer and call `start_all_to_all_rows` themselves).

    Returns:
        received: `[sum(recv_counts), ...]` with `rows.dtype`, blocks ordered by source rank.
    """
    out, work = start_all_to_all_rows(group, rows, send_counts, recv_counts)
    if work is not None:
        work.wait()
    return out


def _from_byte_rows(buf: torch.Tensor, dtype: torch.dtype, trailing: torch.Size) -> torch.Tensor:
    if buf.numel() == 0:
        return torch.empty(buf.size(0), *trailing, dtype=dtype, device=buf.device)
    return buf.view(dtype).view(buf.size(0), *trailing)


def pack_rows(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[torch.dtype, torch.Size]]]:
    """
    Concatenate several `[n, ...]` tensors column-wise as bytes, so small per-token metadata travels in
    one collective instead of one per tensor.

    Returns:
        packed: `[n, total_bytes]` with `torch.uint8`.
        specs: `(dtype, trailing shape)` of each tensor, for `unpack_rows`.
    """
    specs = [(t.dtype, t.shape[1:]) for t in tensors]
    packed = torch.cat([as_byte_rows(t.contiguous()) for t in tensors], dim=1)
    return packed, specs


def unpack_rows(packed: torch.Tensor, specs: Sequence[Tuple[torch.dtype, torch.Size]]) -> List[torch.Tensor]:
    """Split `pack_rows` output back into contiguous tensors."""
    out, col = [], 0
    for dtype, trailing in specs:
        width = trailing.numel() * torch.empty((), dtype=dtype).element_size()
        out.append(_from_byte_rows(packed[:, col : col + width].contiguous(), dtype, trailing))
        col += width
    return out


class SelfBlock(NamedTuple):
    """
    How an exchange can leave out the block a rank sends itself (see `local_self_block`).

    Attributes:
        send_counts: the split sizes to pass the collective, 0 for this rank.
        recv_counts: the split sizes to pass the collective, 0 for this rank.
        send: `(begin, end)` of the self block among the rows this rank sends.
        recv: `(begin, end)` of the self block among the rows this rank receives.
        send_others: `(begin, end)` of the sent rows the collective takes (every other rank's blocks).
        recv_others: `(begin, end)` of the received rows the collective fills (every other source's block).
    """

    send_counts: List[int]
    recv_counts: List[int]
    send: Tuple[int, int]
    recv: Tuple[int, int]
    send_others: Tuple[int, int]
    recv_others: Tuple[int, int]


def self_block_at_edge(counts: Sequence[int], rank: int) -> Optional[Tuple[Tuple[int, int], Tuple[int, int]]]:
    """(self range, the others' range) when the self block is at either end of the rows, else None."""
    begin, total, own = sum(counts[:rank]), sum(counts), counts[rank]
    if begin == 0:
        return (0, own), (own, total)
    if begin + own == total:
        return (begin, total), (0, begin)
    return None


def local_self_block(rank: int, send_counts: Sequence[int], recv_counts: Sequence[int]) -> Optional[SelfBlock]:
    """
    Plan an exchange whose self block is copied locally instead of through the collective.

    A collective delivers a rank's rows to itself through the same path as to any peer (on gloo that costs
    about as much as sending them; docs/moe.md), while a local copy is one memcpy. The collective takes and
    fills one contiguous range each, so this works when the self block sits at an end of both the sent and the
    received rows (always with two ranks, and for the first and last rank otherwise); the decision is local,
    so ranks may differ.

    Arguments:
        rank: this rank.
        send_counts: rows sent to each rank (blocks in rank order).
        recv_counts: rows received from each rank (blocks in rank order).

    Returns:
        plan: a `SelfBlock`, or None when the self block is empty or in the middle of either side.
    """
    sent, received = self_block_at_edge(send_counts, rank), self_block_at_edge(recv_counts, rank)
    if recv_counts[rank] == 0 or sent is None or received is None:
        return None
    send_counts, recv_counts = list(send_counts), list(recv_counts)
    send_counts[rank] = recv_counts[rank] = 0
    return SelfBlock(send_counts, recv_counts, sent[0], received[0], sent[1], received[1])
