"""Argument checks with messages that name the argument, the expectation and what was given.

DeepEP asserts inside its C++ runtime; a portable backend that runs in unit tests and notebooks owes its
users a readable error instead.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

# dtypes the portable high-throughput path moves as token payload. DeepEP's kernels take bf16 (or the
# FP8 tuple); fp16 and fp32 are accepted too so an fp32 model can check its gradients exactly.
PAYLOAD_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name))


def check_tensor(
    name: str,
    t: torch.Tensor,
    dtypes: Sequence[torch.dtype],
    ndim: Optional[int] = None,
    rows: Optional[int] = None,
) -> None:
    """Raise TypeError / ValueError unless `t` is a contiguous tensor of one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if rows is not None and t.size(0) != rows:
        raise ValueError(f"{name} must have {rows} rows (one per token), got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {t.stride()}")


def check_num_experts(num_experts: int, num_ranks: int) -> int:
    """Return the number of experts per rank, or raise if they do not divide evenly."""
    if num_experts <= 0 or num_experts % num_ranks != 0:
        raise ValueError(
            f"num_experts={num_experts} must be a positive multiple of the group size {num_ranks} "
            "(each rank holds num_experts // num_ranks experts)"
        )
    return num_experts // num_ranks


def check_topk_idx(topk_idx: torch.Tensor, num_experts: int, rows: Optional[int] = None) -> None:
    """topk_idx must be int64 `[num_tokens, num_topk]` with values in [-1, num_experts)."""
    check_tensor("topk_idx", topk_idx, (torch.int64,), ndim=2, rows=rows)
    if topk_idx.numel() > 0:
        # One host sync; a bad id would otherwise silently land on the wrong rank.
        lo, hi = (int(v) for v in torch.aminmax(topk_idx))
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"topk_idx values must lie in [-1, {num_experts}); found range [{lo}, {hi}]")


def split_x(
    x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], name: str = "x"
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Check a dispatch input (a tensor, or the FP8 tuple `(x_fp8, scales)`) and split it."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} as a tuple must be (x_fp8, scales), got {len(x)} elements")
        data, scales = x
        if not FP8_DTYPES:
            raise TypeError("this torch build has no float8 dtypes; the FP8 tuple input is unavailable")
        check_tensor(f"{name}[0]", data, FP8_DTYPES, ndim=2)
        check_tensor(f"{name}[1] (scales)", scales, (torch.float32, torch.int32), ndim=2, rows=data.size(0))
        if scales.device != data.device:
            raise ValueError(f"{name}[1] (scales) is on {scales.device} but {name}[0] is on {data.device}")
        return data, scales
    if isinstance(x, torch.Tensor) and x.dtype in FP8_DTYPES:
        raise TypeError(f"{name} is {x.dtype}: pass FP8 data as the tuple (x_fp8, scales)")
    check_tensor(name, x, PAYLOAD_DTYPES, ndim=2)
    return x, None


def split_bias(bias, num_tokens: int, hidden: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """DeepEP's bias argument: None, one tensor, or a pair, each `[num_tokens, hidden]`."""
    if bias is None:
        pair = (None, None)
    elif isinstance(bias, torch.Tensor):
        pair = (bias, None)
    elif isinstance(bias, (tuple, list)) and len(bias) == 2:
        pair = tuple(bias)
    else:
        raise ValueError("bias must be None, a tensor, or a pair of tensors")
    for i, b in enumerate(pair):
        if b is not None:
            check_tensor(f"bias[{i}]", b, PAYLOAD_DTYPES, ndim=2, rows=num_tokens)
            if b.size(1) != hidden:
                raise ValueError(f"bias[{i}] must be [{num_tokens}, {hidden}], got {list(b.shape)}")
    return pair
