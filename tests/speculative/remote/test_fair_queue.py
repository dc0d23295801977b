"""FairQueue: the order in which waiting requests get the target, and its bound."""

from __future__ import annotations

import threading
import time

import pytest

from tandem.speculative.remote.serving.fair_queue import FairQueue
from tandem.speculative.remote.serving.request_checks import RequestError


def wait_until(condition, limit_s: float = 10.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_waiting_requests_are_served_round_robin_across_clients_fifo_within_one():
    queue = FairQueue(max_waiting=16)
    order: list[str] = []
    hold = threading.Event()

    def request(client: str, name: str, until: threading.Event | None = None):
        place = queue.reserve(client)
        with place.turn():
            order.append(name)
            if until is not None:
                until.wait(10)

    threads = [threading.Thread(target=request, args=("a", "a0", hold), daemon=True)]
    threads[0].start()
    wait_until(lambda: order == ["a0"])  # "a" holds the target while the others line up
    for client, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        threads.append(threading.Thread(target=request, args=(client, name), daemon=True))
        threads[-1].start()
        waiting = len(threads) - 1
        wait_until(lambda: sum(len(line) for line in queue._lines.values()) == waiting)  # joined in this order
    hold.set()
    for thread in threads:
        thread.join(10)
    assert order == ["a0", "a1", "b1", "c1", "a2", "b2", "a3"]
    assert queue.waiting == 0 and queue.served == 7


def test_a_full_queue_is_503_with_retry_after_and_a_released_place_is_free_again():
    queue = FairQueue(max_waiting=2)
    first, second = queue.reserve("a"), queue.reserve("b")
    with pytest.raises(RequestError) as info:
        queue.reserve("c")
    assert info.value.status == 503 and info.value.headers == {"Retry-After": "1"}
    first.release()
    first.release()  # idempotent
    queue.reserve("c").release()
    second.release()
    assert queue.waiting == 0
