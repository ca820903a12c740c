"""server/parallel.py: items taken in order by several threads, one Future per item."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagesearch.server.parallel import Pulling, map_pulling


@pytest.fixture
def pool():
    with ThreadPoolExecutor(4) as executor:
        yield executor


def test_map_pulling_keeps_order_and_uses_every_worker(pool):
    seen: set[str] = set()
    started = threading.Barrier(2)

    def work(item: int) -> int:
        if item < 2:  # the first two items run at once, on two threads
            started.wait(timeout=10)
        seen.add(threading.current_thread().name)
        return item * item

    assert map_pulling(work, list(range(7)), 2, pool) == [i * i for i in range(7)]
    assert len(seen) == 2
    assert map_pulling(work, [], 2, pool) == []


def test_map_pulling_raises_the_first_error_and_stops_taking_items(pool):
    done: list[int] = []

    def work(item: int) -> int:
        if item == 1:
            raise ValueError("bad item")
        done.append(item)
        return item

    with pytest.raises(ValueError, match="bad item"):
        map_pulling(work, list(range(50)), 1, pool)
    assert done == [0]


def test_each_item_fails_on_its_own_when_the_job_goes_on(pool):
    def work(item: int) -> int:
        if item % 3 == 0:
            raise ValueError(f"bad {item}")
        return item

    job = Pulling(work, list(range(7)), stop_on_error=False)
    job.start_helpers(pool, 2)
    outcomes = []
    for future in job.futures:
        try:
            outcomes.append(future.result(timeout=10))
        except ValueError as error:
            outcomes.append(str(error))
    job.finish()
    assert outcomes == ["bad 0", 1, 2, "bad 3", 4, 5, "bad 6"]


def test_finish_cancels_what_was_not_started_and_waits_for_what_runs(pool):
    running: list[int] = []

    def slow(item: int) -> int:
        running.append(item)
        time.sleep(0.05)
        running.remove(item)
        return item

    job = Pulling(slow, list(range(40)), stop_on_error=False)
    job.start_helpers(pool, 2)
    assert job.futures[0].result(timeout=10) == 0
    job.finish()
    assert running == []
    assert any(future.cancelled() for future in job.futures)
    assert all(future.done() for future in job.futures)


def test_a_small_job_does_not_wait_behind_a_large_one(pool):
    """Each job keeps its own queue: the pool holds only its pullers, not one task per item."""
    big = Pulling(lambda item: time.sleep(0.02), list(range(100)), stop_on_error=False)
    big.start_helpers(pool, 2)
    small = Pulling(lambda item: item, [1, 2], stop_on_error=False)
    small.start_helpers(pool, 2)
    started = time.perf_counter()
    assert [future.result(timeout=10) for future in small.futures] == [1, 2]
    assert time.perf_counter() - started < 0.5  # the big job alone takes ~1 s on two threads
    big.finish()
    small.finish()
