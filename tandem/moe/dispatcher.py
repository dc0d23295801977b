"""Autograd for the expert-parallel token exchange, and an MoE layer built on it.

``dispatch`` sends every token to the ranks that hold its experts and returns a handle recording where each
row went; ``combine`` brings the expert outputs home along it. The two are each other's adjoint: the backward
of ``dispatch`` is a ``combine``, the backward of ``combine`` a cached dispatch along the same handle, so a
training step moves tokens with the buffer's own kernels in both directions (docs/moe.md). The same functions
drive DeepEP's V1 ``Buffer`` and V2 ``ElasticBuffer``, tandem's portable ones or the native kernels.

Usage, on every rank of a process group ``group`` (e.g. under ``torchrun --nproc-per-node 4``):

    layer = MoELayer(hidden=1024, intermediate=2816, num_experts=64, top_k=6, group=group)   # api="v2" too
    y = layer(x)          # x: [tokens, hidden] local to this rank; experts are split across the group
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tandem.moe.ep import Buffer, DispatchHandle, ElasticBuffer, EPHandle

APIS = {"v1": Buffer, "v2": ElasticBuffer}


def buffer_api(buffer) -> str:
    """Which DeepEP API `buffer` has: "v1" (`Buffer`, with `get_dispatch_layout`) or "v2" (`ElasticBuffer`)."""
    return "v1" if hasattr(buffer, "get_dispatch_layout") else "v2"


class DispatchResult(NamedTuple):
    """The differentiable outputs of `dispatch` (see `Buffer.dispatch` for shapes)."""

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    num_recv_tokens_per_expert_list: List[int]
    handle: Union[DispatchHandle, EPHandle]


def _forward_dispatch(buffer, x, topk_weights, topk_idx, num_experts):
    """One plain-layout dispatch through either API: `(recv_x, recv_idx, recv_w, counts, handle)`."""
    if buffer_api(buffer) == "v2":
        recv_x, recv_idx, recv_w, handle, _ = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts)
        return recv_x, recv_idx, recv_w, list(handle.num_recv_tokens_per_expert_list), handle
    per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
    )
    return recv_x, recv_idx, recv_w, counts, handle


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, buffer, topk_idx: torch.Tensor, num_experts: int):
        recv_x, recv_idx, recv_w, counts, handle = _forward_dispatch(buffer, x, topk_weights, topk_idx, num_experts)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.foreign = recv_idx < 0  # entries for experts elsewhere: their weights were zeroed, no gradient
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_idx, recv_w, counts, handle

    @staticmethod
    def backward(ctx, grad_recv_x, _grad_idx, grad_recv_w, _grad_counts, _grad_handle):
        # Autograd materialises unused output gradients as zeros, so both are tensors here.
        grad_w = grad_recv_w.masked_fill(ctx.foreign, 0).float().contiguous()
        grad_x, grad_topk_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), ctx.handle, topk_weights=grad_w)
        return grad_x, grad_topk_w, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        ctx.buffer, ctx.handle = buffer, handle
        combined, _, _ = buffer.combine(x, handle)
        return combined

    @staticmethod
    def backward(ctx, grad_combined):
        grad_x, *_ = ctx.buffer.dispatch(grad_combined.contiguous(), handle=ctx.handle)
        return grad_x, None, None


def dispatch(
    buffer: Union[Buffer, ElasticBuffer], x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
    num_experts: int,
) -> DispatchResult:
    """
    Differentiable dispatch (V1: layout + `Buffer.dispatch`; V2: `ElasticBuffer.dispatch`); its backward is
    a combine.

    Arguments:
        buffer: the EP buffer of the group, of either API.
        x: `[num_tokens, hidden]` with a float dtype.
        topk_idx: `[num_tokens, num_topk]` with `torch.int64`, -1 for no expert.
        topk_weights: `[num_tokens, num_topk]` with `torch.float`.
        num_experts: experts across the group.

    Returns:
        result: a `DispatchResult`; gradients flow to `x` and `topk_weights`.
    """
    return DispatchResult(*_Dispatch.apply(x, topk_weights, buffer, topk_idx, num_experts))


def combine(
    buffer: Union[Buffer, ElasticBuffer], x: torch.Tensor, handle: Union[DispatchHandle, EPHandle]
) -> torch.Tensor:
    """
    Differentiable unweighted combine; its backward is a cached dispatch along `handle`.

    Arguments:
        buffer: the EP buffer of the group, of either API.
        x: `[num_recv_tokens, hidden]`, rows in the order `dispatch` returned them.
        handle: the handle from that dispatch.

    Returns:
        combined: `[num_tokens, hidden]` with `x.dtype`.
    """
    return _Combine.apply(x, buffer, handle)


class GroupedSwiGLU(nn.Module):
    """
    `num_experts` SwiGLU MLPs stored as batched weights: `down(silu(x @ gate) * (x @ up))` per expert.

    Attributes:
        gate_proj: `[num_experts, hidden, intermediate]`.
        up_proj: `[num_experts, hidden, intermediate]`.
        down_proj: `[num_experts, intermediate, hidden]`.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden, dtype=dtype))
        for w, fan_in in ((self.gate_proj, hidden), (self.up_proj, hidden), (self.down_proj, intermediate)):
            nn.init.normal_(w, std=fan_in**-0.5)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """
        Arguments:
            x: `[num_tokens, hidden]`.
            topk_idx: `[num_tokens, num_topk]` with `torch.int64`, expert ids in `[-1, num_experts)`.
            topk_weights: `[num_tokens, num_topk]`, the weight of each selected expert.

        Returns:
            y: `[num_tokens, hidden]` with `x.dtype`, `sum_k topk_weights[t, k] * expert_k(x[t])`.
        """
        num_topk = topk_idx.size(1)
        flat = topk_idx.reshape(-1)
        keep = (flat >= 0).nonzero()[:, 0]
        entry = keep[torch.sort(flat[keep], stable=True).indices]  # grouped by expert
        token = entry // num_topk
        counts = torch.bincount(flat[entry], minlength=self.num_experts).tolist()  # host sync: group sizes
        outputs = []
        for e, rows in enumerate(torch.split(x.index_select(0, token), counts)):
            if rows.size(0):
                hidden = F.silu(rows @ self.gate_proj[e]) * (rows @ self.up_proj[e])
                outputs.append(hidden @ self.down_proj[e])
        weights = topk_weights.reshape(-1).index_select(0, entry).to(x.dtype)
        y = torch.zeros_like(x)
        if outputs:
            y = y.index_add(0, token, torch.cat(outputs) * weights[:, None])
        return y


class MoELayer(nn.Module):
    """
    A top-k routed MoE block: softmax router, `top_k` experts per token, experts split across `group`.

    With `group=None` every expert is local and no communication happens; with a group of size `R`,
    rank `r` holds experts `[r * E / R, (r + 1) * E / R)` and tokens travel through the EP buffer. The
    router is replicated (its gradient is per-rank, to be all-reduced like any data-parallel weight).

    Arguments:
        hidden: the model width.
        intermediate: each expert's SwiGLU width.
        num_experts: experts across the group (divisible by its size).
        top_k: experts per token.
        group: the expert-parallel process group, or None for one process.
        buffer: an existing buffer on `group` to share (`Buffer` or `ElasticBuffer`, portable or native);
            one is created otherwise.
        norm_topk_prob: renormalise the top-k probabilities to sum to 1.
        api: "v1" (DeepEP's `Buffer`) or "v2" (`ElasticBuffer`) for the buffer created here; with `buffer`
            given, its own API (None: "v1", or the given buffer's).
    """

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        group: Optional[dist.ProcessGroup] = None,
        buffer: Optional[Union[Buffer, ElasticBuffer]] = None,
        norm_topk_prob: bool = True,
        dtype: Optional[torch.dtype] = None,
        api: Optional[str] = None,
    ):
        super().__init__()
        ep_size = group.size() if group is not None else 1
        if num_experts % ep_size != 0:
            raise ValueError(f"num_experts={num_experts} must be divisible by the EP group size {ep_size}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        if api is not None and api not in APIS:
            raise ValueError(f"api must be one of {sorted(APIS)}, got {api!r}")
        if buffer is not None and api is not None and buffer_api(buffer) != api:
            raise ValueError(f"api={api!r} but the given buffer has the {buffer_api(buffer)} API")
        self.group = group
        self.buffer = buffer if buffer is not None or group is None else APIS[api or "v1"](group)
        self.router = nn.Linear(hidden, num_experts, bias=False, dtype=dtype)
        self.experts = GroupedSwiGLU(num_experts // ep_size, hidden, intermediate, dtype=dtype)

    def route(self, x: torch.Tensor):
        """`[num_tokens, hidden]` -> (topk_idx `[num_tokens, top_k]` int64, topk_weights fp32)."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return idx, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        topk_idx, topk_weights = self.route(tokens)
        if self.group is None:
            return self.experts(tokens, topk_idx, topk_weights).view(shape)
        sent = dispatch(self.buffer, tokens.contiguous(), topk_idx, topk_weights, self.num_experts)
        expert_out = self.experts(sent.recv_x, sent.recv_topk_idx, sent.recv_topk_weights)
        return combine(self.buffer, expert_out, sent.handle).view(shape)
