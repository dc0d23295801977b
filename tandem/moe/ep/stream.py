"""Run a buffer operation on a communication stream, ordered against the caller's stream as DeepEP does.

On CUDA the work is issued on a per-device side stream that first waits for `previous_event` (or for the
current stream), and the returned `EventOverlap` lets the caller wait later (`async_finish=True`) or
has already made the current stream wait (`async_finish=False`). On CPU the collectives are synchronous,
so the work simply runs and the same flags are accepted as ordered no-ops.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch

from .event import EventHandle, EventOverlap


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples / lists (handles are NamedTuples, so they are covered)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from iter_tensors(item)


class CommStreams:
    """One communication stream per CUDA device, created on first use and owned by one buffer."""

    def __init__(self) -> None:
        self._streams: Dict[int, "torch.cuda.Stream"] = {}

    def get(self, device: torch.device) -> Optional["torch.cuda.Stream"]:
        if device.type != "cuda":
            return None
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._streams:
            self._streams[index] = torch.cuda.Stream(device=index)
        return self._streams[index]

    def run(
        self,
        fn: Callable[[], Any],
        device: torch.device,
        previous_event: Optional[EventOverlap],
        async_finish: bool,
        allocate_on_comm_stream: bool,
        inputs: Tuple[Any, ...] = (),
    ) -> Tuple[Any, EventOverlap]:
        """
        Run `fn` ordered after `previous_event` and return its result with DeepEP's event semantics.

        Arguments:
            fn: the operation; it allocates its outputs and issues the collectives.
            device: where the tensors live; only `cuda` uses a side stream.
            previous_event: wait for this instead of the whole current stream before starting.
            async_finish: leave the caller's stream free; the caller waits on the returned event.
            allocate_on_comm_stream: outputs belong to the communication stream's memory pool.
            inputs: tensors read by `fn`, kept alive until the communication stream is done with them.

        Returns:
            result: what `fn` returned.
            event: an `EventOverlap` holding the finishing event when `async_finish` is set, else empty.
        """
        stream = self.get(device)
        if stream is None:
            result = fn()
            # There is nothing to wait for on CPU, but a caller that asked for an event gets one to wait on.
            return result, EventOverlap(EventHandle() if async_finish else None)

        compute = torch.cuda.current_stream(device)
        if previous_event is not None and previous_event.event is not None:
            previous_event.event.stream_wait(stream)
        else:
            stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            result = fn()
        for t in iter_tensors(inputs):
            if t.is_cuda:
                # Inputs come from the compute stream's pool; keep it from reusing them under our feet.
                t.record_stream(stream)
        outputs = list(iter_tensors(result))
        if not allocate_on_comm_stream:
            for t in outputs:
                if t.is_cuda:
                    t.record_stream(compute)
        event = EventHandle(stream)
        if async_finish:
            return result, EventOverlap(event, tuple(iter_tensors(inputs)) + tuple(outputs))
        event.current_stream_wait()
        return result, EventOverlap(None)
