"""`ElasticBuffer`: DeepEP's V2 expert-parallel API on `torch.distributed`.

The constructor, `dispatch` and `combine` keep DeepEP V2's argument names, order, defaults and return arity,
with the typed `EPHandle`; the exchange is the portable V1 one (`normal.py`), so the same code runs on gloo
(CPU) and NCCL (GPU); `elastic_ops.py` maps a V2 call onto it. Where `deep_ep.ElasticBuffer` imports and the
group is NCCL, the constructor returns DeepEP's own buffer (`TANDEM_EP_BACKEND=portable` forces ours). The
options that only steer GPU kernels are accepted and ignored (see `ElasticBuffer`, docs/moe.md).

    buffer = ElasticBuffer(group, num_max_tokens_per_rank=4096, hidden=7168, num_topk=8)
    recv_x, recv_topk_idx, recv_topk_weights, handle, _ = buffer.dispatch(x, topk_idx=topk_idx, ...)
    y, combined_topk_weights, _ = buffer.combine(expert_out, handle, topk_weights=recv_topk_weights)
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import elastic_ops
from .checks import FP8_DTYPES, PAYLOAD_DTYPES, check_num_experts, check_tensor, check_topk_idx, split_bias, split_x
from .comm_buffer import CommBuffer
from .ep_handle import EPHandle
from .event import EventHandle, EventOverlap

logger = logging.getLogger(__name__)

_ALIGNMENT_BYTES = 2 << 20  # DeepEP V2 aligns buffer sizes to 2 MiB
_PORTABLE_NUM_SMS = 24  # what get_theoretical_num_sms reports: DeepEP V1's default SM count


def native_elastic_buffer_class(group: Optional[dist.ProcessGroup]) -> Optional[type]:
    """DeepEP's own `ElasticBuffer` when it can serve `group` (see the module docstring), else None."""
    if os.environ.get("TANDEM_EP_BACKEND", "").lower() == "portable" or not torch.cuda.is_available():
        return None
    if group is None or dist.get_backend(group) != "nccl":
        return None
    try:
        module = importlib.import_module("deep_ep")
    except ImportError:
        return None
    return getattr(module, "ElasticBuffer", None)


class ElasticBuffer(CommBuffer):
    """
    The V2 expert-parallel communication buffer: dispatch and combine with DeepEP V2's API.

    Attributes:
        group: the communication group.
        rank_idx: this rank in `group`.
        num_ranks: the number of ranks in `group`.
        deterministic: as given (the portable backend is always deterministic).
        allow_hybrid_mode: as given (no effect: there is one scale-up domain).
        allow_multiple_reduction: whether an expanded combine reduces each rank's selections there first
            (one row per token and rank travels home) or sends every selection home to be added in top-k
            order, as DeepEP does.
        prefer_overlap_with_compute: as given (no effect).
        num_bytes: the buffer size requested (unused: the portable backend allocates per call).
        num_max_tokens_per_rank: the default `M` for `dispatch`.
        num_scaleout_ranks, num_scaleup_ranks: the logical domain, `(1, num_ranks)`.
        scaleout_rank_idx, scaleup_rank_idx: `(0, rank_idx)`.
        num_rdma_ranks, num_nvlink_ranks: the physical domain, `(1, num_ranks)`.
        num_allocated_qps: DeepEP's automatic QP count for the mode (unused).
        explicitly_destroy: whether `destroy()` must be called.
        runtime: DeepEP's C++ runtime; None for the portable backend.
    """

    def __new__(cls, group: dist.ProcessGroup, *args, **kwargs):
        native = native_elastic_buffer_class(group)
        if native is None:
            return super().__new__(cls)
        logger.info("tandem.moe: ElasticBuffer uses DeepEP's native kernels")
        # Not an instance of cls, so Python does not run __init__ on it again.
        return native(group, *args, **kwargs)

    def __init__(
        self,
        group: dist.ProcessGroup,
        num_bytes: Optional[int] = None,
        num_cpu_bytes: int = 0,
        num_max_tokens_per_rank: int = 0,
        hidden: int = 0,
        num_topk: int = 0,
        use_fp8_dispatch: bool = False,
        deterministic: bool = False,
        allow_hybrid_mode: bool = True,
        allow_multiple_reduction: bool = True,
        prefer_overlap_with_compute: bool = True,
        sl_idx: int = 3,
        num_allocated_qps: int = 0,
        num_cpu_timeout_secs: int = 300,
        num_gpu_timeout_secs: int = 100,
        explicitly_destroy: bool = False,
    ) -> None:
        """
        Initialize the elastic communication buffer.

        Arguments:
            group: the communication group (`None`: the default group).
            num_bytes: the buffer size in bytes (no effect).
            num_cpu_bytes: the CPU buffer size for Engram (no effect).
            num_max_tokens_per_rank: the most tokens one rank dispatches, the default for `dispatch`; 0 lets
                each dispatch use the largest token count of the group in that call.
            hidden: the hidden size (sizes DeepEP's buffer; no effect).
            num_topk: the top-k count (sizes DeepEP's buffer; no effect).
            use_fp8_dispatch: sizes DeepEP's buffer for FP8 (no effect: FP8 is the `(x, scales)` input).
            deterministic: deterministic routing (always so here).
            allow_hybrid_mode: hierarchical RDMA + NVLink mode (no effect).
            allow_multiple_reduction: reduce each rank's selections there in an expanded combine.
            prefer_overlap_with_compute: use fewer SMs (no effect).
            sl_idx: the RDMA service level (no effect).
            num_allocated_qps: RDMA queue pairs (no effect; 0 records DeepEP's automatic count).
            num_cpu_timeout_secs: CPU-side timeout (no effect: the group's own timeout applies).
            num_gpu_timeout_secs: GPU-side timeout (no effect).
            explicitly_destroy: if set, `destroy()` must be called to release resources.
        """
        del num_cpu_bytes, hidden, num_topk, use_fp8_dispatch, sl_idx, num_cpu_timeout_secs, num_gpu_timeout_secs
        super().__init__(group, explicitly_destroy)
        if num_max_tokens_per_rank < 0:
            raise ValueError(f"num_max_tokens_per_rank must be >= 0, got {num_max_tokens_per_rank}")
        self.rank_idx = self.group.rank()
        self.num_ranks = self.group.size()
        self.deterministic = deterministic
        self.allow_hybrid_mode = allow_hybrid_mode
        self.allow_multiple_reduction = allow_multiple_reduction
        self.prefer_overlap_with_compute = prefer_overlap_with_compute
        self.num_bytes = num_bytes
        self.num_max_tokens_per_rank = num_max_tokens_per_rank
        self.num_scaleout_ranks, self.num_scaleup_ranks = 1, self.num_ranks
        self.scaleout_rank_idx, self.scaleup_rank_idx = 0, self.rank_idx
        self.num_rdma_ranks, self.num_nvlink_ranks = 1, self.num_ranks
        self.num_allocated_qps = num_allocated_qps or (65 if allow_hybrid_mode else 17)

    # ----------------------------------------------------------------- helpers (destroy: CommBuffer)

    @staticmethod
    def get_buffer_size_hint(group: dist.ProcessGroup, num_max_tokens_per_rank: int, hidden: int,
                             num_topk: int = 0, use_fp8_dispatch: bool = False, allow_hybrid_mode: bool = True,
                             allow_multiple_reduction: bool = True) -> int:
        """
        The bytes one dispatch can receive at most (rows, scales, top-k ids and weights, metadata), aligned
        to 2 MiB. DeepEP computes its own figure for its kernels; this one is the portable backend's.

        Arguments:
            group: the communication group.
            num_max_tokens_per_rank: the most tokens one rank dispatches.
            hidden: the hidden size.
            num_topk: the top-k count.
            use_fp8_dispatch: rows are FP8 with one fp32 scale per 128 channels instead of bf16.
            allow_hybrid_mode, allow_multiple_reduction: no effect on the size here.

        Returns:
            size: bytes, a multiple of 2 MiB.
        """
        del allow_hybrid_mode, allow_multiple_reduction
        row = hidden + 4 * -(-hidden // 128) if use_fp8_dispatch else 2 * hidden
        per_token = row + num_topk * (8 + 4) + 4 * (2 + num_topk)  # ids, weights, source metadata
        total = group.size() * num_max_tokens_per_rank * per_token
        return max(-(-total // _ALIGNMENT_BYTES), 1) * _ALIGNMENT_BYTES

    def barrier(self, use_comm_stream: bool = True, with_cpu_sync: bool = False, sequential: bool = True) -> None:
        """A barrier across the group (the flags steer DeepEP's GPU barrier and have no effect here)."""
        del use_comm_stream, with_cpu_sync, sequential
        dist.barrier(group=self.group)

    @staticmethod
    def capture() -> EventHandle:
        """An event on the current CUDA stream (a reached point on CPU), to pass as `previous_event`."""
        return EventHandle()

    def get_comm_stream(self) -> Optional["torch.cuda.Stream"]:
        """The communication stream of the current CUDA device; None without CUDA."""
        return self._streams.get(torch.device("cuda")) if torch.cuda.is_available() else None

    def get_physical_domain_size(self) -> Tuple[int, int]:
        """`(num_rdma_ranks, num_nvlink_ranks)`: one domain of all ranks."""
        return self.num_rdma_ranks, self.num_nvlink_ranks

    def get_logical_domain_size(self) -> Tuple[int, int]:
        """`(num_scaleout_ranks, num_scaleup_ranks)`: one domain of all ranks."""
        return self.num_scaleout_ranks, self.num_scaleup_ranks

    def get_theoretical_num_sms(self, num_experts: int, num_topk: int, num_scaleout_topk: int = 0,
                                rdma_gbs: float = 0, nvlink_gbs: float = 0, sm_read_gbs: float = 200,
                                sm_write_gbs: float = 50) -> int:
        """DeepEP's SM estimate for its kernels; the portable backend runs none and reports 24."""
        del num_experts, num_topk, num_scaleout_topk, rdma_gbs, nvlink_gbs, sm_read_gbs, sm_write_gbs
        return _PORTABLE_NUM_SMS

    def get_theoretical_num_qps(self, num_sms: int) -> int:
        """DeepEP's QP count for `num_sms` SMs (recorded only)."""
        num_qps = num_sms * 16 + 1 if self.allow_hybrid_mode else min(num_sms, 8 + 1)
        return min(num_qps, self.num_allocated_qps)

    # ----------------------------------------------------------------- dispatch and combine

    def dispatch(
        self,
        x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        num_experts: Optional[int] = None,
        num_max_tokens_per_rank: Optional[int] = None,
        expert_alignment: Optional[int] = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: Optional[EventHandle] = None,
        previous_event_before_epilogue: Optional[EventHandle] = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
        handle: Optional[EPHandle] = None,
        do_handle_copy: bool = True,
        do_cpu_sync: Optional[bool] = None,
        do_expand: bool = False,
        do_zero_padding: bool = False,
        use_tma_aligned_col_major_sf: bool = False,
    ) -> Tuple[Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], Optional[torch.Tensor],
               Optional[torch.Tensor], EPHandle, EventOverlap]:
        """
        Dispatch tokens to the ranks holding their experts; with `handle`, repeat a previous dispatch.

        Arguments:
            x: `[num_tokens, hidden]` with `torch.bfloat16` (fp16 / fp32 also accepted), or the FP8 tuple
                `([num_tokens, hidden]` with `torch.float8_e4m3fn`, `[num_tokens, num_scales]` with `torch.float`
                or packed `torch.int`).
            topk_idx: `[num_tokens, num_topk]` with `torch.int64`, the experts of each token, -1 for none;
                None with `handle`.
            topk_weights: `[num_tokens, num_topk]` with `torch.float`; may be given with `handle` too.
            cumulative_local_expert_recv_stats: `[num_local_experts]` with `torch.int`; the received
                (token, expert) pairs per local expert are added to it.
            num_experts: experts across the group (from `handle` when given).
            num_max_tokens_per_rank: `M`, the most tokens any rank dispatches (default: the constructor's;
                0 there: this call's largest count). Numbers the sources, and sizes the outputs without
                `do_cpu_sync`. Every rank raises if any rank dispatches more.
            expert_alignment: align each local expert's received count up to this (default 1).
            num_sms, num_qps: kernel resources (recorded in the handle / no effect).
            previous_event: wait for this event before communicating; needs `allocate_on_comm_stream=True`.
            previous_event_before_epilogue: no effect (there is no separate epilogue kernel).
            async_with_compute_stream: the current stream will not wait for the communication if set.
            allocate_on_comm_stream: whether the outputs belong to the communication stream.
            handle: an `EPHandle` from an earlier dispatch of this buffer, whose route is reused.
            do_handle_copy: store a copy of `topk_idx` in the handle (else the tensor itself).
            do_cpu_sync: size the outputs exactly (default, not allowed with `handle`); False sizes them
                for the worst case (`num_ranks * M` rows, the expanded worst case with `do_expand`) so
                shapes do not depend on the routing; the valid rows are counted in the handle.
            do_expand: return the expanded layout: one row per (token, local expert) pair, grouped by expert.
            do_zero_padding: zero the alignment padding of the expanded layout (always zero here).
            use_tma_aligned_col_major_sf: return FP8 scales column-major with a 4-aligned token stride.

        Returns:
            recv_x: the received tokens, the same type (tensor or FP8 tuple) as `x`: `[num_recv_tokens, hidden]`
                by source rank ascending, source token order within a block, or `[num_expanded_tokens, hidden]`
                in the expanded layout.
            recv_topk_idx: `[num_recv_tokens, num_topk]` with `torch.int64`, local expert ids or -1; None when
                expanded.
            recv_topk_weights: `[num_recv_tokens, num_topk]` with `torch.float`, 0 where the id is -1, or
                `[num_expanded_tokens]` when expanded (0 in padding); None without weights.
            handle: the `EPHandle` (the same object for a cached dispatch).
            event: the event after the communication (valid only if `async_with_compute_stream` is set).
        """
        del num_qps, previous_event_before_epilogue
        self._check_alive()
        data, scales = split_x(x)
        alignment, m, do_cpu_sync, num_experts = self._dispatch_settings(
            handle, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment, do_cpu_sync, do_expand)
        self._check_dispatch_inputs(data, handle, topk_idx, topk_weights, num_experts, do_expand, do_zero_padding,
                                    previous_event, allocate_on_comm_stream)
        if handle is not None:
            run = functools.partial(elastic_ops.dispatch_cached, self.group, data, scales, topk_weights, handle,
                                    self._workspace)
        else:
            topk_copy = topk_idx.clone() if do_handle_copy else topk_idx
            run = functools.partial(
                elastic_ops.dispatch, self.group, data, scales, topk_copy, topk_weights, num_experts, m, alignment,
                do_cpu_sync, do_expand, num_sms, self._workspace)
        result, event = self._streams.run(
            run, data.device, _as_overlap(previous_event), async_with_compute_stream, allocate_on_comm_stream,
            (data, scales, topk_idx, topk_weights))
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights = result[:4]
        handle = handle if handle is not None else result[4]
        if cumulative_local_expert_recv_stats is not None:
            check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, (torch.int32,),
                         ndim=1, rows=num_experts // self.num_ranks)
            cumulative_local_expert_recv_stats += handle.num_unaligned_recv_tokens_per_expert
        if recv_scales is not None and use_tma_aligned_col_major_sf:
            recv_scales = elastic_ops.tma_column_major(recv_scales)
        recv_x = (recv_x, recv_scales) if recv_scales is not None else recv_x
        return recv_x, recv_topk_idx, recv_topk_weights, handle, event

    def _dispatch_settings(self, handle, topk_idx, num_experts, num_max_tokens_per_rank, expert_alignment,
                           do_cpu_sync, do_expand) -> Tuple[int, int, bool, int]:
        """`(expert_alignment, M, do_cpu_sync, num_experts)` after DeepEP's defaults and handle rules."""
        if handle is None:
            if topk_idx is None or num_experts is None:
                raise ValueError("dispatch without a handle needs topk_idx and num_experts")
            m = self.num_max_tokens_per_rank if num_max_tokens_per_rank is None else num_max_tokens_per_rank
            alignment = 1 if expert_alignment is None else expert_alignment
            if alignment < 1 or m < 0:
                raise ValueError(f"expert_alignment must be >= 1 and num_max_tokens_per_rank >= 0; got "
                                 f"{alignment} and {m}")
            if do_cpu_sync is False and m == 0:
                raise ValueError("do_cpu_sync=False sizes the outputs by num_max_tokens_per_rank: give it "
                                 "(to the constructor or to dispatch)")
            return alignment, m, do_cpu_sync is not False, num_experts
        if not isinstance(handle, EPHandle) or handle.route is None:
            raise TypeError("handle must be an EPHandle returned by this portable ElasticBuffer's dispatch")
        if topk_idx is not None:
            raise ValueError("a cached dispatch (handle given) takes no topk_idx: the handle's is reused")
        if do_cpu_sync:
            raise ValueError("do_cpu_sync=True cannot be used with a cached handle")
        given = (num_experts, expert_alignment, num_max_tokens_per_rank)
        recorded = (handle.num_experts, handle.expert_alignment, handle.num_max_tokens_per_rank)
        for name, value, expected in zip(("num_experts", "expert_alignment", "num_max_tokens_per_rank"),
                                         given, recorded):
            if value is not None and value != expected:
                raise ValueError(f"{name}={value} differs from the handle's {expected}")
        if do_expand != handle.do_expand:
            raise ValueError(f"do_expand={do_expand} differs from the handle's {handle.do_expand}")
        return handle.expert_alignment, handle.num_max_tokens_per_rank, False, handle.num_experts

    def _check_dispatch_inputs(self, data, handle, topk_idx, topk_weights, num_experts, do_expand,
                               do_zero_padding, previous_event, allocate_on_comm_stream) -> None:
        num_tokens = data.size(0)
        if handle is not None:
            if num_tokens != handle.topk_idx.size(0):
                raise ValueError(f"x has {num_tokens} rows but the handle was made for {handle.topk_idx.size(0)}")
            shape = tuple(handle.topk_idx.shape)
        else:
            check_num_experts(num_experts, self.num_ranks)
            check_topk_idx(topk_idx, num_experts, rows=num_tokens)
            shape = tuple(topk_idx.shape)
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, (torch.float32,), ndim=2, rows=num_tokens)
            if tuple(topk_weights.shape) != shape:
                raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_idx shape {shape}")
        if do_zero_padding and not do_expand:
            raise ValueError("do_zero_padding applies to the expanded layout only (do_expand=True)")
        if previous_event is not None and not allocate_on_comm_stream:
            raise ValueError("previous_event needs allocate_on_comm_stream=True (as in DeepEP)")

    def combine(
        self,
        x: torch.Tensor,
        handle: EPHandle,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
        num_sms: int = 0,
        num_qps: int = 0,
        previous_event: Optional[EventHandle] = None,
        previous_event_before_epilogue: Optional[EventHandle] = None,
        async_with_compute_stream: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """
        Combine (reduce) tokens **without** weights: each original token becomes the sum of its expert rows
        from every rank, plus the bias, in the order of DeepEP V2's reference (see `elastic_ops`), with fp32
        accumulation.

        Arguments:
            x: `[num_recv_tokens, hidden]` (plain layout) or `[num_expanded_tokens, hidden]` (expanded), with
                `torch.bfloat16` (fp16 / fp32 also accepted), rows where `dispatch` put them.
            handle: the handle from the matching `dispatch`.
            topk_weights: `[num_recv_tokens, num_topk]` with `torch.float` (plain) or `[num_expanded_tokens]`
                (expanded), carried home: each selection's weight from the rank holding its expert.
            bias: 0, 1 or 2 tensors `[num_combined_tokens, hidden]` added to the output.
            num_sms, num_qps: kernel resources (no effect).
            previous_event: wait for this event before communicating; needs `allocate_on_comm_stream=True`.
            previous_event_before_epilogue: no effect.
            async_with_compute_stream: the current stream will not wait for the communication if set.
            allocate_on_comm_stream: whether the outputs belong to the communication stream.

        Returns:
            combined_x: `[num_combined_tokens, hidden]` with `x.dtype`.
            combined_topk_weights: `[num_combined_tokens, num_topk]` with `torch.float` (0 for -1 entries),
                or None without `topk_weights`.
            event: the event after the communication (valid only if `async_with_compute_stream` is set).
        """
        del num_sms, num_qps, previous_event_before_epilogue
        self._check_alive()
        self._check_combine_inputs(x, handle, topk_weights, previous_event, allocate_on_comm_stream)
        biases = split_bias(bias, handle.topk_idx.size(0), x.size(1))
        (combined, weights), event = self._streams.run(
            lambda: elastic_ops.combine(self.group, x, handle, topk_weights, biases, self.allow_multiple_reduction,
                                        self._workspace),
            x.device, _as_overlap(previous_event), async_with_compute_stream, allocate_on_comm_stream,
            (x, topk_weights, *biases))
        return combined, weights, event

    def _check_combine_inputs(self, x, handle, topk_weights, previous_event, allocate_on_comm_stream) -> None:
        if not isinstance(handle, EPHandle) or handle.route is None:
            raise TypeError("handle must be an EPHandle returned by this portable ElasticBuffer's dispatch")
        if isinstance(x, (tuple, list)) or (isinstance(x, torch.Tensor) and x.dtype in FP8_DTYPES):
            raise TypeError("combine takes one bf16 / fp16 / fp32 tensor, not FP8 data")
        check_tensor("x", x, PAYLOAD_DTYPES, ndim=2)
        rows = handle.num_expanded_tokens if handle.do_expand else handle.num_valid_recv_tokens
        if x.size(0) < rows:
            raise ValueError(f"combine got {x.size(0)} rows but the dispatch returned {rows}")
        if topk_weights is not None:
            if handle.do_expand:
                check_tensor("topk_weights", topk_weights, (torch.float32,), ndim=1)
                if not self.allow_multiple_reduction:
                    raise ValueError("an expanded combine with topk_weights needs allow_multiple_reduction=True "
                                     "(as in DeepEP)")
            else:
                check_tensor("topk_weights", topk_weights, (torch.float32,), ndim=2)
                if topk_weights.size(1) != handle.topk_idx.size(1):
                    raise ValueError(f"topk_weights must have {handle.topk_idx.size(1)} columns")
            if topk_weights.size(0) < rows:
                raise ValueError(f"topk_weights has {topk_weights.size(0)} rows, fewer than the {rows} of x")
        if previous_event is not None and not allocate_on_comm_stream:
            raise ValueError("previous_event needs allocate_on_comm_stream=True (as in DeepEP)")


def _as_overlap(event: Optional[EventHandle]) -> Optional[EventOverlap]:
    """V2 passes a bare `EventHandle` as `previous_event`; the stream runner takes V1's `EventOverlap`."""
    if event is None or isinstance(event, EventOverlap):
        return event
    return EventOverlap(event)
