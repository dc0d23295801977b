"""UCCLBuffer: a DeepEP-compatible `Buffer` that detects single-node groups by itself.

When every rank of the group fits on one node (`group.size() <= LOCAL_WORLD_SIZE`, else the visible GPU
count, else 1), the buffer is built intranode: `is_intranode=True` and `num_rdma_bytes=0`, so no RDMA
memory is registered on a machine that has no use for it. Every other argument is forwarded unchanged.

Backend: when `uccl.ep` (or `deep_ep`) is importable and CUDA is available, the native buffer serves
behind the same API; otherwise tandem's portable `torch.distributed` buffer does. One log line says which.
Set `TANDEM_EP_BACKEND=portable` to force the portable one.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional, Tuple

import torch

from tandem.moe.ep import Buffer, EventHandle, EventOverlap

logger = logging.getLogger(__name__)

__all__ = ["UCCLBuffer", "Buffer", "EventOverlap", "EventHandle", "detect_intranode", "native_buffer_class"]


def local_world_size() -> int:
    """Ranks per node: `LOCAL_WORLD_SIZE` (set by torchrun), else the visible GPU count, else 1."""
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env:
        return int(env)
    return torch.cuda.device_count() or 1


def detect_intranode(group_size: int, is_intranode: bool, num_rdma_bytes: int) -> Tuple[bool, int]:
    """
    Arguments:
        group_size: the number of ranks in the EP group.
        is_intranode: the caller's flag (True keeps the group intranode whatever the detection says).
        num_rdma_bytes: the caller's RDMA buffer size.

    Returns:
        is_intranode: whether the group is one node.
        num_rdma_bytes: 0 when the group is one node (no RDMA registration), else unchanged.
    """
    if is_intranode or group_size <= local_world_size():
        return True, 0
    return False, num_rdma_bytes


def native_buffer_class() -> Optional[Tuple[str, type]]:
    """The native `(module name, Buffer class)` to use, or None for the portable backend."""
    if os.environ.get("TANDEM_EP_BACKEND", "").lower() == "portable" or not torch.cuda.is_available():
        return None
    for name in ("uccl.ep", "deep_ep"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        cls = getattr(module, "Buffer", None)
        if cls is not None:
            return name, cls
    return None


class UCCLBuffer(Buffer):
    """`Buffer` with automatic intranode detection; may return a native buffer (see module docstring)."""

    def __new__(cls, group, *args, **kwargs):
        native = native_buffer_class()
        if native is None:
            logger.info("tandem.moe: UCCLBuffer uses the portable torch.distributed backend")
            return super().__new__(cls)
        name, native_cls = native
        logger.info("tandem.moe: UCCLBuffer uses the native %s kernels", name)
        params = _bind(group, *args, **kwargs)
        params["is_intranode"], params["num_rdma_bytes"] = detect_intranode(
            group.size(), params["is_intranode"], params["num_rdma_bytes"]
        )
        if name == "deep_ep":
            # DeepEP has no is_intranode flag: it infers the node layout from the group itself.
            params.pop("is_intranode")
        # Not an instance of cls, so Python does not run __init__ on it again.
        return native_cls(**params)

    def __init__(
        self,
        group,
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        explicitly_destroy: bool = False,
        is_intranode: bool = False,
    ) -> None:
        """
        Initialize the buffer, detecting whether the group is one node.

        Arguments:
            group: the communication group.
            num_nvl_bytes: the buffer size for intranode NVLink communication.
            num_rdma_bytes: the buffer size for internode (and low-latency) RDMA communication; forced to 0
                when the group is one node.
            low_latency_mode: whether to enable the low-latency methods.
            num_qps_per_rank: RDMA queue pairs per rank.
            allow_nvlink_for_low_latency_mode: whether low-latency traffic may use NVLink.
            allow_mnnvl: whether to allow multi-node NVLink.
            explicitly_destroy: if set, `destroy()` must be called to release resources.
            is_intranode: force the intranode layout; otherwise detected from `LOCAL_WORLD_SIZE`.
        """
        is_intranode, num_rdma_bytes = detect_intranode(group.size(), is_intranode, num_rdma_bytes)
        super().__init__(
            group=group,
            num_nvl_bytes=num_nvl_bytes,
            num_rdma_bytes=num_rdma_bytes,
            low_latency_mode=low_latency_mode,
            num_qps_per_rank=num_qps_per_rank,
            allow_nvlink_for_low_latency_mode=allow_nvlink_for_low_latency_mode,
            allow_mnnvl=allow_mnnvl,
            explicitly_destroy=explicitly_destroy,
            is_intranode=is_intranode,
        )


def _bind(group, *args, **kwargs) -> dict:
    """UCCLBuffer's arguments as a keyword dict with defaults filled in (for the native constructor)."""
    import inspect

    bound = inspect.signature(UCCLBuffer.__init__).bind(None, group, *args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop("self")
    return params
