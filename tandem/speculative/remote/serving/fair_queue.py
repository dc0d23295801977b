"""Who runs the target next: one forward at a time, clients served in turn, a bounded waiting room.

The target runs one batch at a time (its aux-hidden capture hooks are shared state). A plain lock hands it to
whichever thread the OS wakes first, so a client with many requests in flight could keep another waiting for
many of its forwards. :class:`FairQueue` serves round-robin across clients, first-in first-out within one: a
client waits for at most one forward of every other client with work queued. A request takes a place before
its body is read (a full queue is refused with 503 at once, before any memory is spent) and joins its
client's line only once its body is read and checked, so a slow upload never holds up the line.
"""

from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from tandem.speculative.remote.serving.request_checks import RequestError

# Seconds a refused client is told to wait (``Retry-After``); its retries back off further by themselves.
RETRY_AFTER_S = 1


class Place:
    """A request's place in the queue, from :meth:`FairQueue.reserve` until the end of its turn."""

    def __init__(self, queue: "FairQueue", client_id: str):
        self._queue = queue
        self.client_id = client_id
        self._granted = False
        self._done = False

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Wait in this client's line until the target is ours; it passes on when the block ends."""
        self._queue._wait_for_turn(self)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Give the place up (idempotent): after the turn, or when the request failed before it."""
        if not self._done:
            self._done = True
            self._queue._release(self)


class FairQueue:
    """Round-robin across clients, FIFO within one, at most ``max_waiting`` requests holding a place.

    Arguments:
        max_waiting: places (requests admitted and not yet done, the running one included); one more is
            refused with 503 and ``Retry-After``.
    """

    def __init__(self, max_waiting: int):
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._places = 0
        self._lines: dict[str, deque[Place]] = {}  # client -> its places waiting for a turn, oldest first
        self._rotation: deque[str] = deque()  # clients with a place waiting, in the order they are served
        self._running: Place | None = None
        self.served = 0

    def reserve(self, client_id: str) -> Place:
        """A place for one request of ``client_id``; ``RequestError`` 503 when every place is taken."""
        with self._cond:
            if self._places >= self.max_waiting:
                raise RequestError(503, f"the target server is saturated: {self._places} requests are queued (the "
                                        f"limit is --max-queued-requests {self.max_waiting}); retry later",
                                   {"Retry-After": str(RETRY_AFTER_S)})
            self._places += 1
            return Place(self, client_id)

    @property
    def waiting(self) -> int:
        """Places taken (running, waiting for a turn, or still reading their body)."""
        with self._cond:
            return self._places

    def _wait_for_turn(self, place: Place) -> None:
        with self._cond:
            line = self._lines.get(place.client_id)
            if line is None:
                line = self._lines[place.client_id] = deque()
                self._rotation.append(place.client_id)
            line.append(place)
            self._hand_over()
            while not place._granted:
                self._cond.wait()

    def _hand_over(self) -> None:
        """Give the target to the head of the next client's line if nobody holds it. Lock held."""
        if self._running is not None or not self._rotation:
            return
        client_id = self._rotation.popleft()
        line = self._lines[client_id]
        place = line.popleft()
        if line:
            self._rotation.append(client_id)  # its next request waits for every other client's turn
        else:
            del self._lines[client_id]
        place._granted = True
        self._running = place
        self._cond.notify_all()

    def _release(self, place: Place) -> None:
        with self._cond:
            self._places -= 1
            if self._running is place:
                self._running = None
                self.served += 1
                self._hand_over()
