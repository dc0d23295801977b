"""UCCLBuffer: DeepEP's Buffer API with single-node detection (see buffer.py)."""

from .buffer import Buffer, EventHandle, EventOverlap, UCCLBuffer

__all__ = ["UCCLBuffer", "Buffer", "EventOverlap", "EventHandle"]
