"""Supervision requested ahead of the step that needs it, so a remote target's forward overlaps training."""

from __future__ import annotations

import threading
import time

from tandem.speculative.training.image_patches import batch_patches, image_context


class SupervisionPrefetcher:
    """Requests the supervision of the next ``depth`` micro-batches ahead of the step that needs them.

    A remote target's forward then overlaps the draft's training step. Micro-batches are a pure function
    of their index, so the prefetched supervision is exactly what a synchronous request would return.

    Arguments:
        target: anything with ``supervise_async(input_ids, attention_mask, loss_mask) -> Future``.
        micro_batch: index -> batch dict (``input_ids``, ``attention_mask``, ``loss_mask``; images' patches, sent
            inside ``target.with_images``).
        depth: micro-batches requested ahead (the target may cap what is in flight further).
        stop: the first index never to request (the end of training).
    """

    def __init__(self, target, micro_batch, depth: int, stop: int):
        self.target, self.micro_batch, self.depth, self.stop = target, micro_batch, max(depth, 1), stop
        self.pending: dict[int, object] = {}
        self.latency_s = 0.0
        """Summed request-to-answer time of the completed requests (throughput report)."""
        self.answered = 0
        self._lock = threading.Lock()

    def _request(self, index: int):
        batch = self.micro_batch(index)
        with image_context(self.target, batch_patches(batch)):  # the request's body is built inside
            future = self.target.supervise_async(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        future.add_done_callback(self._timer(time.perf_counter()))
        return future

    def _timer(self, submitted: float):
        def done(future) -> None:
            if not future.cancelled():
                with self._lock:  # runs on the client's threads, several at once
                    self.latency_s += time.perf_counter() - submitted
                    self.answered += 1
        return done

    def take(self, indices) -> list:
        """Futures for ``indices`` (consecutive), after requesting up to ``depth`` micro-batches beyond."""
        first = indices[0]
        futures = [self.pending.pop(i, None) or self._request(i) for i in indices]
        for stale in [i for i in self.pending if i < first]:
            self.pending.pop(stale).cancel()
        for index in range(indices[-1] + 1, min(indices[-1] + 1 + self.depth, self.stop)):
            if index not in self.pending:
                self.pending[index] = self._request(index)
        return futures
