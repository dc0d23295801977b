"""`EventHandle` and `EventOverlap`: DeepEP's stream-ordering objects, on torch streams.

On CUDA an `EventHandle` is a `torch.cuda.Event` recorded on a stream, and `EventOverlap` lets the
caller make the current stream wait for the communication stream, either explicitly or by leaving a
`with` block (DeepEP's overlap idiom). On CPU every collective has finished when the call returns, so
both objects are kept for API parity and their waits are ordered no-ops.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch


class EventHandle:
    """A point in a CUDA stream's work; on CPU, a point that has already been reached.

    `EventHandle()` records on the current CUDA stream, as DeepEP's does; pass `stream` to record on
    another one (the buffer records on its communication stream).
    """

    def __init__(self, stream: Optional["torch.cuda.Stream"] = None) -> None:
        self.event = None
        if stream is None and torch.cuda.is_available() and torch.cuda.is_initialized():
            stream = torch.cuda.current_stream()
        if stream is not None:
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def current_stream_wait(self) -> None:
        """Make the current CUDA stream wait for this event (no-op on CPU)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: "torch.cuda.Stream") -> None:
        """Make `stream` wait for this event (no-op on CPU)."""
        if self.event is not None:
            stream.wait_event(self.event)

    def query(self) -> bool:
        """True once the recorded work has finished (always true on CPU)."""
        return self.event is None or self.event.query()


class EventOverlap:
    """
    A wrapper of `EventHandle` for communication-computation overlap, with DeepEP's interface.

    Attributes:
        event: the `EventHandle`, or None when the call finished synchronously.
        extra_tensors: tensors kept alive until the event is waited on, so the caching allocator does not
            hand their memory to another stream while the communication stream still uses it.
    """

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[Tuple[Any, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Make the current stream wait for the event; releases `extra_tensors` afterwards."""
        if self.event is None:
            raise RuntimeError("EventOverlap has no event: the call was made without async_finish=True")
        self.event.current_stream_wait()
        self.extra_tensors = None

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        # DeepEP's idiom: `with buffer.dispatch(..., async_finish=True)[-1]: compute()` waits at exit.
        if self.event is not None:
            self.event.current_stream_wait()
            self.extra_tensors = None
