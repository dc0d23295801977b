"""Every expert-parallel backend the suite can hold to the reference, behind one small adapter per API.

A backend is (API, implementation): tandem's portable V1 `Buffer` and V2 `ElasticBuffer` run anywhere;
DeepEP's native V1 `Buffer` and V2 `ElasticBuffer` and UCCL-EP's `Buffer` need their package, CUDA and
one GPU per rank, and are skipped with the reason otherwise.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
import torch.distributed as dist

# The suite's shapes: small, and what the native kernels accept (bf16, hidden a multiple of 128).
HIDDEN = 128
TOPK = 3
EXPERTS_PER_RANK = 4
MAX_TOKENS = 32


class Dispatched(NamedTuple):
    recv_x: object  # tensor, or the FP8 tuple
    recv_topk_idx: torch.Tensor
    recv_topk_weights: Optional[torch.Tensor]
    expert_counts: List[int]  # aligned, per local expert
    handle: object


@dataclass(frozen=True)
class BackendSpec:
    """
    Attributes:
        name: the test id.
        api: "v1" (DeepEP's `Buffer`) or "v2" (DeepEP's `ElasticBuffer`).
        module: the package a native backend needs, or None for tandem's portable ones.
        attribute: the class in that package.
    """

    name: str
    api: str
    module: Optional[str] = None
    attribute: Optional[str] = None

    @property
    def native(self) -> bool:
        return self.module is not None

    def unavailable(self, world_size: int) -> Optional[str]:
        """Why this backend cannot run here with `world_size` ranks, or None."""
        if not self.native:
            return None
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return f"{self.module} is not installed"
        if getattr(module, self.attribute, None) is None:
            return f"{self.module} has no {self.attribute}"
        if not torch.cuda.is_available() or torch.cuda.device_count() < world_size:
            found = torch.cuda.device_count() if torch.cuda.is_available() else 0
            return f"needs CUDA with one GPU per rank ({world_size}); found {found}"
        return None

    def build(self, group: dist.ProcessGroup, **v2_options) -> "V1Adapter | V2Adapter":
        device = torch.device("cuda", torch.cuda.current_device()) if self.native else torch.device("cpu")
        if self.api == "v2":
            from tandem.moe.ep import ElasticBuffer

            buffer = ElasticBuffer(group, num_max_tokens_per_rank=MAX_TOKENS, hidden=HIDDEN, num_topk=TOPK,
                                   **v2_options)
            if self.native and isinstance(buffer, ElasticBuffer):
                raise RuntimeError("expected DeepEP's native ElasticBuffer behind tandem's, got the portable one")
            return V2Adapter(buffer, device)
        if not self.native:
            from tandem.moe.ep import Buffer

            return V1Adapter(Buffer(group), device)
        cls = getattr(importlib.import_module(self.module), self.attribute)
        num_ranks = group.size()
        hint = max(cfg.get_nvl_buffer_size_hint(HIDDEN * 2, num_ranks)
                   for cfg in (cls.get_dispatch_config(num_ranks), cls.get_combine_config(num_ranks)))
        return V1Adapter(cls(group, num_nvl_bytes=hint, num_rdma_bytes=0), device)


BACKENDS = [
    BackendSpec("portable-v1", "v1"),
    BackendSpec("portable-v2", "v2"),
    BackendSpec("deepep-v1", "v1", "deep_ep", "Buffer"),
    BackendSpec("deepep-v2", "v2", "deep_ep", "ElasticBuffer"),
    BackendSpec("uccl-ep", "v1", "uccl.ep", "Buffer"),
]


class V1Adapter:
    """DeepEP's V1 calls: layout, dispatch, cached dispatch, combine."""

    api = "v1"

    def __init__(self, buffer, device: torch.device) -> None:
        self.buffer, self.device = buffer, device

    def dispatch(self, x, topk_idx, topk_weights, num_experts, expert_alignment: int = 1) -> Dispatched:
        per_rank, per_rdma, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(topk_idx, num_experts)
        recv_x, recv_idx, recv_w, counts, handle, _ = self.buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
            expert_alignment=expert_alignment)
        return Dispatched(recv_x, recv_idx, recv_w, list(counts), handle)

    def cached(self, x, handle):
        return self.buffer.dispatch(x, handle=handle)[0]

    def combine(self, y, handle, topk_weights=None, bias=None):
        combined, weights, _ = self.buffer.combine(y, handle, topk_weights=topk_weights, bias=bias)
        return combined, weights

    def sources(self, handle, rank: int) -> torch.Tensor:
        """`[num_recv]` src_rank * MAX_TOKENS + src_token of every received row."""
        column = handle[0][:, rank].long()
        counts = column - torch.cat([column.new_zeros(1), column[:-1]])
        src_rank = torch.repeat_interleave(torch.arange(counts.numel(), device=column.device), counts)
        return src_rank * MAX_TOKENS + handle[3][: src_rank.numel()].long()


class V2Adapter:
    """DeepEP's V2 calls: dispatch (fresh, cached), combine."""

    api = "v2"

    def __init__(self, buffer, device: torch.device) -> None:
        self.buffer, self.device = buffer, device

    def dispatch(self, x, topk_idx, topk_weights, num_experts, expert_alignment: int = 1, **options) -> Dispatched:
        recv_x, recv_idx, recv_w, handle, _ = self.buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts,
            num_max_tokens_per_rank=MAX_TOKENS, expert_alignment=expert_alignment, **options)
        return Dispatched(recv_x, recv_idx, recv_w, list(handle.num_recv_tokens_per_expert_list), handle)

    def cached(self, x, handle, **options):
        return self.buffer.dispatch(x, handle=handle, **options)[0]

    def combine(self, y, handle, topk_weights=None, bias=None):
        combined, weights, _ = self.buffer.combine(y, handle, topk_weights=topk_weights, bias=bias)
        return combined, weights

    def sources(self, handle, rank: int) -> torch.Tensor:
        num_recv = int(handle.psum_num_recv_tokens_per_scaleup_rank[-1])
        return handle.recv_src_metadata[:num_recv, 0].long()
