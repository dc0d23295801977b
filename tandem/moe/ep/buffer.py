"""`Buffer`: DeepEP's expert-parallel communication buffer on `torch.distributed`.

The constructor, methods, keyword names and return arities are DeepEP's, so code written for
`deep_ep.Buffer` runs unchanged; the exchange is `all_to_all_single` on the given group, so one
implementation serves gloo (CPU) and NCCL (GPU). The exchanges live in `normal.py` and `low_latency.py`;
`stream.py` honours `previous_event` / `async_finish`.

    buffer = Buffer(group)
    layout = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(x, num_tokens_per_rank=layout[0], ...)
    y, _, _ = buffer.combine(expert_out, handle)
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import low_latency, normal
from .checks import PAYLOAD_DTYPES, check_num_experts, check_tensor, check_topk_idx, split_bias, split_x
from .comm_buffer import CommBuffer
from .config import NUM_MAX_NVL_PEERS, Config
from .config import get_low_latency_rdma_size_hint as _ll_size_hint
from .event import EventHandle, EventOverlap
from .handle import DispatchHandle, LowLatencyHandle
from .layout import aligned_counts, dispatch_layout

# DeepEP's tuned (num_sms, nvl_send, nvl_recv, rdma_send, rdma_recv) per group size, minus num_sms.
_DISPATCH_CONFIGS = {
    2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
    24: (8, 288, 32, 128), 32: (32, 288, 8, 128), 64: (32, 288, 8, 128), 128: (20, 560, 12, 128),
    144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_CONFIGS = {
    2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
    24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 64: (1, 288, 8, 128), 128: (1, 560, 8, 128),
    144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _tuned(table: dict, num_ranks: int) -> Config:
    # DeepEP only knows the sizes it tuned; the portable path works for any size, so take the nearest
    # tuned size at or above (or the largest) instead of refusing.
    key = min((k for k in table if k >= num_ranks), default=max(table))
    return Config(Buffer.num_sms, *table[key])


class Buffer(CommBuffer):
    """
    The expert-parallel (EP) communication buffer for MoE models: high-throughput dispatch/combine and the
    low-latency variants, with DeepEP's API.

    Attributes:
        num_sms: SMs for DeepEP's high-throughput kernels; the portable backend reports `num_sms // 2`
            channels in its handles. Class-wide, as in DeepEP (set with `Buffer.set_num_sms`).
        rank: this rank in `group`.
        group_size: the number of ranks in `group`.
        group: the communication group.
        num_nvl_bytes: the NVLink buffer size requested (unused by the portable backend).
        num_rdma_bytes: the RDMA buffer size requested (unused by the portable backend).
        low_latency_mode: whether the low-latency methods are enabled.
        explicitly_destroy: whether `destroy()` must be called to release the buffer.
        is_intranode: whether the group is treated as one node (`num_tokens_per_rdma_rank` is None).
    """

    num_sms: int = 24

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        comm: Optional[object] = None,
        is_intranode: bool = False,
    ) -> None:
        """
        Initialize the communication buffer.

        Arguments:
            group: the communication group (a `torch.distributed` process group; `None` means the default).
            num_nvl_bytes: the buffer size for intranode NVLink communication.
            num_rdma_bytes: the buffer size for internode (and low-latency) RDMA communication.
            low_latency_mode: whether to enable the low-latency methods.
            num_qps_per_rank: RDMA queue pairs per rank (native kernels only).
            allow_nvlink_for_low_latency_mode: whether low-latency traffic may use NVLink (native only).
            allow_mnnvl: whether to allow multi-node NVLink (native only).
            use_fabric: whether to allocate with the fabric API (native only).
            explicitly_destroy: if set, `destroy()` must be called to release resources; otherwise the
                destructor releases them.
            enable_shrink: whether to enable dynamic rank masking (native only).
            comm: an `mpi4py` communicator; the portable backend needs a torch group and rejects it.
            is_intranode: treat the whole group as one node even above 8 ranks (UCCL's flag).
        """
        if comm is not None and group is None:
            raise ValueError("the portable backend communicates through torch.distributed: pass `group`, not `comm`")
        super().__init__(group, explicitly_destroy)
        if num_nvl_bytes < 0 or num_rdma_bytes < 0:
            raise ValueError("num_nvl_bytes and num_rdma_bytes must be >= 0")
        self.rank = self.group.rank()
        self.group_size = self.group.size()
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        self.num_qps_per_rank = num_qps_per_rank
        self.is_intranode = is_intranode
        self._ll_combine_buffer: Optional[torch.Tensor] = None

    # ----------------------------------------------------------------- lifecycle and static helpers

    def _release(self) -> None:
        super()._release()
        self._ll_combine_buffer = None

    @staticmethod
    def is_sm90_compiled() -> bool:
        """Whether native SM90 kernels are compiled in (never, for the portable backend)."""
        return False

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """
        Set the number of SMs for high-throughput kernels (class-wide, as in DeepEP).

        Arguments:
            new_num_sms: the new number, which must be even.
        """
        if new_num_sms <= 0 or new_num_sms % 2 != 0:
            raise ValueError(f"The SM count must be a positive even number, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        """
        Capture an event on the current stream (`torch.cuda.current_stream()`; a reached point on CPU).

        Returns:
            event: the captured event, to pass as `previous_event`.
        """
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(
        num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int
    ) -> int:
        """
        Get DeepEP's minimum RDMA buffer size for the low-latency kernels (computed for bf16).

        Arguments:
            num_max_dispatch_tokens_per_rank: the most tokens one rank dispatches; equal on all ranks.
            hidden: the hidden dimension of each token.
            num_ranks: the number of EP ranks.
            num_experts: the number of all experts.

        Returns:
            size: the RDMA buffer size recommended, in bytes.
        """
        return _ll_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """Get a recommended dispatch config: DeepEP's tuned one for `num_ranks` ranks (or the nearest tuned size)."""
        return _tuned(_DISPATCH_CONFIGS, num_ranks)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """Get a recommended combine config: DeepEP's tuned one for `num_ranks` ranks (or the nearest tuned size)."""
        return _tuned(_COMBINE_CONFIGS, num_ranks)

    def get_comm_stream(self, device: Optional[torch.device] = None) -> Optional["torch.cuda.Stream"]:
        """The communication stream for `device` (the current CUDA device by default); None on CPU."""
        if device is None:
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        return self._streams.get(torch.device(device))

    @property
    def num_rdma_ranks(self) -> int:
        """Nodes in the group: ranks come in blocks of 8 NVLink peers unless `is_intranode` is set."""
        if self.is_intranode or self.group_size <= NUM_MAX_NVL_PEERS:
            return 1
        return -(-self.group_size // NUM_MAX_NVL_PEERS)

    # ----------------------------------------------------------------- high-throughput path

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """
        Calculate the layout required for later communication.

        Arguments:
            topk_idx: `[num_tokens, num_topk]` with `torch.int64`, the expert indices selected by each token,
                `-1` means no selection.
            num_experts: the number of experts, divisible by the group size.
            previous_event: the event to wait for before computing.
            async_finish: the current stream will not wait for the work to finish if set.
            allocate_on_comm_stream: whether the outputs belong to the communication stream.

        Returns:
            num_tokens_per_rank: `[num_ranks]` with `torch.int`, the number of tokens sent to each rank.
            num_tokens_per_rdma_rank: `[num_rdma_ranks]` with `torch.int`, tokens sent to each node, or None
                within one node.
            num_tokens_per_expert: `[num_experts]` with `torch.int`, the number of tokens sent to each expert.
            is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`, whether a token goes to a rank.
            event: the event after the work (valid only if `async_finish` is set).
        """
        self._check_alive()
        check_num_experts(num_experts, self.group_size)
        check_topk_idx(topk_idx, num_experts)
        layout, event = self._streams.run(
            lambda: dispatch_layout(topk_idx, num_experts, self.group_size, self.num_rdma_ranks),
            topk_idx.device, previous_event, async_finish, allocate_on_comm_stream, (topk_idx,),
        )
        return (*layout, event)

    def dispatch(
        self,
        x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        handle: Optional[Tuple] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[
        Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor],
        Optional[torch.Tensor], Optional[torch.Tensor], List[int], DispatchHandle, EventOverlap,
    ]:
        """
        Dispatch tokens to the ranks holding their experts; with `handle`, repeat a previous dispatch.

        Arguments:
            x: `[num_tokens, hidden]` with `torch.bfloat16` (fp16 / fp32 also accepted), or the tuple
                `(x_fp8, scales)`: `[num_tokens, hidden]` with `torch.float8_e4m3fn` and
                `[num_tokens, num_scales]` with `torch.float` (or packed `torch.int`).
            handle: a handle from an earlier dispatch; if set, its layout is reused, no top-k may be given
                and the call returns only `recv_x`.
            num_tokens_per_rank: `[num_ranks]` with `torch.int`, from `get_dispatch_layout`.
            num_tokens_per_rdma_rank: `[num_rdma_ranks]` with `torch.int` or None, from `get_dispatch_layout`.
            is_token_in_rank: `[num_tokens, num_ranks]` with `torch.bool`, from `get_dispatch_layout`.
            num_tokens_per_expert: `[num_experts]` with `torch.int`, from `get_dispatch_layout`.
            topk_idx: `[num_tokens, num_topk]` with `torch.int64`, the experts of each token, `-1` for none.
            topk_weights: `[num_tokens, num_topk]` with `torch.float`, the expert weights of each token.
            expert_alignment: align each local expert's received token count up to this multiple.
            num_worst_tokens: if > 0, pad the received tensors to this many rows (-1 ids, 0 weights, zero
                rows) and return an empty count list, for fixed shapes.
            config: the performance tuning config (defaults to `get_dispatch_config`).
            previous_event: the event to wait for before communicating.
            async_finish: the current stream will not wait for the communication to finish if set.
            allocate_on_comm_stream: whether the outputs belong to the communication stream.

        Returns:
            recv_x: the received tokens, the same type (tensor or FP8 tuple) as `x`, rows grouped by source
                rank ascending and in source token order within a block.
            recv_topk_idx: `[num_recv_tokens, num_topk]` with `torch.int64`, local expert ids in
                `[0, num_local_experts)` or -1 for experts on other ranks; None for a cached dispatch.
            recv_topk_weights: `[num_recv_tokens, num_topk]` with `torch.float`, 0 where the id is -1.
            num_recv_tokens_per_expert_list: Python list `[num_local_experts]`, tokens received by each local
                expert, aligned to `expert_alignment` (empty with `num_worst_tokens`).
            handle: a `DispatchHandle` (`handle[0]` is the rank prefix matrix) for `combine` and cached
                dispatch.
            event: the event after the communication (valid only if `async_finish` is set).
        """
        self._check_alive()
        data, scales = split_x(x)
        num_channels = (config or self.get_dispatch_config(self.group_size)).num_channels
        if expert_alignment < 1:
            raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
        if num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
        if handle is not None:
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("a cached dispatch (handle given) takes no topk_idx / topk_weights")
            handle = DispatchHandle(*handle[:6])
            _check_rows("x", data, handle.is_token_in_rank.size(0))
            (recv_x, recv_scales, _), event = self._streams.run(
                lambda: normal.dispatch_cached(self.group, data, scales, handle, self._workspace),
                data.device, previous_event, async_finish, allocate_on_comm_stream, (data, scales),
            )
            return _with_scales(recv_x, recv_scales), None, None, None, None, event

        self._check_fresh_dispatch(data, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights)
        result, event = self._streams.run(
            lambda: normal.dispatch_fresh(
                self.group, data, scales, topk_idx, topk_weights, is_token_in_rank, num_tokens_per_expert,
                num_worst_tokens, num_channels, self._workspace,
            ),
            data.device, previous_event, async_finish, allocate_on_comm_stream,
            (data, scales, topk_idx, topk_weights, is_token_in_rank),
        )
        per_expert = [] if num_worst_tokens else aligned_counts(result.local_expert_counts, expert_alignment)
        return (_with_scales(result.recv_x, result.recv_scales), result.recv_topk_idx, result.recv_topk_weights,
                per_expert, result.handle, event)

    def _check_fresh_dispatch(self, data, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights) -> None:
        if is_token_in_rank is None or num_tokens_per_expert is None:
            raise ValueError("dispatch without a handle needs is_token_in_rank and num_tokens_per_expert "
                             "(from get_dispatch_layout)")
        num_tokens = data.size(0)
        check_tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), ndim=2, rows=num_tokens)
        if is_token_in_rank.size(1) != self.group_size:
            raise ValueError(f"is_token_in_rank must have {self.group_size} columns, got {is_token_in_rank.size(1)}")
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, (torch.int32,), ndim=1)
        num_experts = num_tokens_per_expert.numel()
        check_num_experts(num_experts, self.group_size)
        if topk_idx is not None:
            check_topk_idx(topk_idx, num_experts, rows=num_tokens)
        if topk_weights is not None:
            if topk_idx is None:
                raise ValueError("topk_weights needs topk_idx")
            check_tensor("topk_weights", topk_weights, (torch.float32,), ndim=2, rows=num_tokens)
            if topk_weights.shape != topk_idx.shape:
                raise ValueError(f"topk_weights shape {tuple(topk_weights.shape)} != topk_idx shape "
                                 f"{tuple(topk_idx.shape)}")

    def combine(
        self,
        x: torch.Tensor,
        handle: Tuple,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """
        Combine (reduce) tokens **without** weights: each original token becomes the sum of the rows every
        rank it was dispatched to returns, plus the optional bias. Accumulation is in fp32.

        Arguments:
            x: `[num_recv_tokens, hidden]` with `torch.bfloat16` (fp16 / fp32 also accepted), rows in the
                order `dispatch` returned them (extra padding rows from `num_worst_tokens` are ignored).
            handle: the handle from the matching `dispatch`.
            topk_weights: `[num_recv_tokens, num_topk]` with `torch.float`, summed back the same way.
            bias: 0, 1 or 2 tensors `[num_tokens, hidden]` added to the output.
            config: the performance tuning config (unused by the portable backend).
            previous_event: the event to wait for before communicating.
            async_finish: the current stream will not wait for the communication to finish if set.
            allocate_on_comm_stream: whether the outputs belong to the communication stream.

        Returns:
            combined_x: `[num_tokens, hidden]` with `x.dtype`, the reduced tokens.
            combined_topk_weights: `[num_tokens, num_topk]` with `torch.float`, or None.
            event: the event after the communication (valid only if `async_finish` is set).
        """
        self._check_alive()
        del config
        handle = DispatchHandle(*handle[:6])
        num_recv = int(handle.rank_prefix_matrix[-1, self.rank])
        check_tensor("x", x, PAYLOAD_DTYPES, ndim=2)
        if x.size(0) < num_recv:
            raise ValueError(f"combine got {x.size(0)} rows but this rank received {num_recv} in dispatch")
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, (torch.float32,), ndim=2)
        biases = split_bias(bias, handle.is_token_in_rank.size(0), x.size(1))
        (combined, weights), event = self._streams.run(
            lambda: normal.combine(self.group, x, handle, topk_weights, biases, self._workspace),
            x.device, previous_event, async_finish, allocate_on_comm_stream, (x, topk_weights, *biases),
        )
        return combined, weights, event

    # ----------------------------------------------------------------- low-latency path

    def _check_low_latency(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> int:
        self._check_alive()
        if not self.low_latency_mode:
            raise RuntimeError("low-latency methods need Buffer(..., low_latency_mode=True)")
        if num_max_dispatch_tokens_per_rank <= 0 or hidden <= 0:
            raise ValueError("num_max_dispatch_tokens_per_rank and hidden must be positive")
        return check_num_experts(num_experts, self.group_size)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """
        Reset the low-latency buffer between normal and low-latency use. DeepEP must zero its signalling
        memory here; the portable backend allocates per call, so this only drops the zero-copy buffer.

        Arguments:
            num_max_dispatch_tokens_per_rank: the most tokens one rank dispatches; equal on all ranks.
            hidden: the hidden dimension of each token.
            num_experts: the number of all experts.
        """
        self._check_low_latency(num_max_dispatch_tokens_per_rank, hidden, num_experts)
        self._ll_combine_buffer = None

    def low_latency_dispatch(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        num_max_dispatch_tokens_per_rank: int,
        num_experts: int,
        cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
        dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None,
        use_fp8: bool = True,
        round_scale: bool = False,
        use_ue8m0: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
    ) -> Tuple[Union[Tuple[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor, LowLatencyHandle,
               EventOverlap, Optional[Callable[[], None]]]:
        """
        Dispatch each (token, expert) pair into fixed-shape per-expert slots.

        Arguments:
            x: `[num_tokens, hidden]` with `torch.bfloat16`; `num_tokens <= num_max_dispatch_tokens_per_rank`.
            topk_idx: `[num_tokens, num_topk]` with `torch.int64`, `-1` for no expert.
            num_max_dispatch_tokens_per_rank: `M`, the most tokens any rank dispatches; equal on all ranks.
            num_experts: the number of all experts.
            cumulative_local_expert_recv_stats: `[num_local_experts]` with `torch.int`; `recv_count` is
                added to it in place (EP load-balance monitoring).
            dispatch_wait_recv_cost_stats: `[num_ranks, num_ranks]` with `torch.int64`; accepted, left as is
                (the portable backend has no per-token wait to time).
            use_fp8: cast to FP8 (per token, per 128 channels) before sending.
            round_scale: round the scales up to powers of two.
            use_ue8m0: pack the scales as UE8M0 exponents (needs `round_scale` and `hidden % 512 == 0`).
            async_finish: the current stream will not wait for the communication to finish if set.
            return_recv_hook: also return a hook; the data has already arrived, so the hook does nothing.

        Returns:
            recv_x: `[num_local_experts, num_ranks * M, hidden]` with `torch.bfloat16`; with `use_fp8`, the
                tuple of that shape in `torch.float8_e4m3fn` and the scales `[num_local_experts,
                num_ranks * M, hidden // 128]` with `torch.float` (or `hidden // 512` with `torch.int` for
                UE8M0), column-major in the last two dims. Only the first `recv_count[e]` rows of expert
                `e` are valid; the rest are zero.
            recv_count: `[num_local_experts]` with `torch.int`, the valid rows of each local expert.
            handle: a `LowLatencyHandle` `(src_info, layout_range, M, hidden, num_experts)`.
            event: the event after the communication (valid only if `async_finish` is set).
            hook: a callable if `return_recv_hook` is set, else None.
        """
        del dispatch_wait_recv_cost_stats
        num_local = self._check_low_latency(num_max_dispatch_tokens_per_rank, x.size(-1), num_experts)
        check_tensor("x", x, PAYLOAD_DTYPES, ndim=2)
        check_topk_idx(topk_idx, num_experts, rows=x.size(0))
        if x.size(0) > num_max_dispatch_tokens_per_rank:
            raise ValueError(f"{x.size(0)} tokens exceed num_max_dispatch_tokens_per_rank="
                             f"{num_max_dispatch_tokens_per_rank}")
        if use_fp8 and x.size(1) % 128 != 0:
            raise ValueError(f"use_fp8 needs hidden divisible by 128, got {x.size(1)}")
        if use_ue8m0 and (not round_scale or x.size(1) % 512 != 0):
            raise ValueError("use_ue8m0 needs round_scale=True and hidden divisible by 512")
        result, event = self._streams.run(
            lambda: low_latency.ll_dispatch(self.group, x, topk_idx, num_max_dispatch_tokens_per_rank,
                                            num_experts, use_fp8, round_scale, use_ue8m0),
            x.device, None, async_finish, False, (x, topk_idx),
        )
        recv_x, recv_scales, recv_count, handle = result
        if cumulative_local_expert_recv_stats is not None:
            check_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, (torch.int32,),
                         ndim=1, rows=num_local)
            cumulative_local_expert_recv_stats += recv_count
        hook = (lambda: None) if return_recv_hook else None
        return _with_scales(recv_x, recv_scales), recv_count, handle, event, hook

    def low_latency_combine(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weights: torch.Tensor,
        handle: Tuple,
        use_logfmt: bool = False,
        zero_copy: bool = False,
        async_finish: bool = False,
        return_recv_hook: bool = False,
        out: Optional[torch.Tensor] = None,
        combine_wait_recv_cost_stats: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, EventOverlap, Optional[Callable[[], None]]]:
        """
        Combine the expert outputs of a low-latency dispatch **with weights**: each token becomes
        `sum_k topk_weights[t, k] * x_from(expert topk_idx[t, k])`, skipping `-1`.

        Arguments:
            x: `[num_local_experts, num_ranks * M, hidden]` with `torch.bfloat16`, the expert outputs in the
                slots `low_latency_dispatch` filled (ignored with `zero_copy`).
            topk_idx: `[num_tokens, num_topk]` with `torch.int64`, the ids given to the dispatch.
            topk_weights: `[num_tokens, num_topk]` with `torch.float`, the weights to reduce with.
            handle: the handle from the matching `low_latency_dispatch`.
            use_logfmt: DeepEP's 10-bit LogFMT; accepted, the portable backend sends exact values.
            zero_copy: take the expert outputs from `get_next_low_latency_combine_buffer` instead of `x`.
            async_finish: the current stream will not wait for the communication to finish if set.
            return_recv_hook: also return a hook; the data has already arrived, so the hook does nothing.
            out: `[num_tokens, hidden]` to write the result into.
            combine_wait_recv_cost_stats: accepted, left as is.

        Returns:
            combined_x: `[num_tokens, hidden]` with `x.dtype` (`out` when given).
            event: the event after the communication (valid only if `async_finish` is set).
            hook: a callable if `return_recv_hook` is set, else None.
        """
        del use_logfmt, combine_wait_recv_cost_stats
        handle = LowLatencyHandle(*handle)
        self._check_low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        if zero_copy:
            if self._ll_combine_buffer is None:
                raise RuntimeError("zero_copy needs get_next_low_latency_combine_buffer(handle) to be filled first")
            x = self._ll_combine_buffer
        check_tensor("x", x, PAYLOAD_DTYPES, ndim=3)
        expected = (handle.src_info.size(0), handle.src_info.size(1), handle.hidden)
        if tuple(x.shape) != expected:
            raise ValueError(f"x must be {list(expected)} (local experts, ranks * M, hidden), got {list(x.shape)}")
        check_topk_idx(topk_idx, handle.num_experts)
        check_tensor("topk_weights", topk_weights, (torch.float32,), ndim=2, rows=topk_idx.size(0))
        combined, event = self._streams.run(
            lambda: low_latency.ll_combine(self.group, x, topk_idx, topk_weights, handle),
            x.device, None, async_finish, False, (x, topk_idx, topk_weights),
        )
        if out is not None:
            out.copy_(combined)
            combined = out
        hook = (lambda: None) if return_recv_hook else None
        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: Tuple) -> torch.Tensor:
        """
        Get the buffer the next `low_latency_combine(..., zero_copy=True)` reads from, so expert outputs
        can be written straight into it.

        Arguments:
            handle: the handle from `low_latency_dispatch`.

        Returns:
            buffer: `[num_local_experts, num_ranks * M, hidden]` with `torch.bfloat16`, to fill in place.
        """
        handle = LowLatencyHandle(*handle)
        self._check_low_latency(handle.num_max_dispatch_tokens_per_rank, handle.hidden, handle.num_experts)
        shape = (handle.src_info.size(0), handle.src_info.size(1), handle.hidden)
        buffer = self._ll_combine_buffer
        if buffer is None or tuple(buffer.shape) != shape or buffer.device != handle.src_info.device:
            buffer = torch.zeros(shape, dtype=torch.bfloat16, device=handle.src_info.device)
            self._ll_combine_buffer = buffer
        return buffer


def _check_rows(name: str, t: torch.Tensor, rows: int) -> None:
    if t.size(0) != rows:
        raise ValueError(f"{name} has {t.size(0)} rows but the handle was made for {rows} tokens")


def _with_scales(recv_x: torch.Tensor, recv_scales: Optional[torch.Tensor]):
    return (recv_x, recv_scales) if recv_scales is not None else recv_x
