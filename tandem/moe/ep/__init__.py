"""DeepEP's expert-parallel buffer APIs on torch.distributed: V1 (`Buffer`, `Config`, `EventOverlap`,
`EventHandle`) and V2 (`ElasticBuffer`, `EPHandle`)."""

from .buffer import Buffer
from .config import Config, get_low_latency_rdma_size_hint
from .elastic import ElasticBuffer
from .ep_handle import EPHandle
from .event import EventHandle, EventOverlap
from .handle import DispatchHandle, LowLatencyHandle

__all__ = [
    "Buffer",
    "Config",
    "DispatchHandle",
    "EPHandle",
    "ElasticBuffer",
    "EventHandle",
    "EventOverlap",
    "LowLatencyHandle",
    "get_low_latency_rdma_size_hint",
]
