"""DeepEP's expert-parallel buffer API (`Buffer`, `Config`, `EventOverlap`, `EventHandle`) on torch.distributed."""

from .buffer import Buffer
from .config import Config, get_low_latency_rdma_size_hint
from .event import EventHandle, EventOverlap
from .handle import DispatchHandle, LowLatencyHandle

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EventHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "get_low_latency_rdma_size_hint",
]
