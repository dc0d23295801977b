"""Scratch memory a buffer reuses across calls, the portable counterpart of DeepEP's registered buffer.

Staging rows for a collective and accumulating a combine need large temporaries on every call. Fresh
allocations of that size are page-faulted in each time on CPU (tens of milliseconds for tens of MB on a
small machine, more than the collective itself), so the buffer keeps them, grow-only. Nothing returned to
the caller ever aliases this memory; on CUDA every use is ordered on the buffer's communication stream.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Tuple

import torch


class Workspace:
    """Named, grow-only byte buffers, one per (name, device)."""

    def __init__(self) -> None:
        self._buffers: Dict[Tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """
        A tensor of `shape` and `dtype` backed by the named buffer (contents undefined).

        Arguments:
            name: which scratch buffer; two live temporaries of one call must use different names.
            shape: the tensor's shape.
            dtype: the tensor's dtype.
            device: where it lives.

        Returns:
            view: a contiguous tensor valid until the next `get` of the same name.
        """
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        key = (name, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
            self._buffers[key] = buf
        return buf[:nbytes].view(dtype).view(*shape)

    def clear(self) -> None:
        self._buffers.clear()
