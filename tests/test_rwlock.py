"""The collection's readers-writer lock: readers share, a writer is alone and preferred, and a
writer taking the lock again lets the readers already waiting in first."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from imagesearch.server.rwlock import ReadWriteLock
from tests.support.waiting import until


def test_readers_share_and_a_writer_is_alone() -> None:
    lock = ReadWriteLock()
    inside = threading.Barrier(2, timeout=5)

    def read() -> None:
        with lock.read():
            inside.wait()  # both readers at once, or the barrier times out

    with ThreadPoolExecutor(2) as pool:
        for future in [pool.submit(read), pool.submit(read)]:
            future.result(timeout=5)
        with lock.write():
            reading = pool.submit(lambda: lock.read().__enter__())
            time.sleep(0.05)
            assert not reading.done(), "a reader waits for the writer"
        reading.result(timeout=5)


def test_a_writer_that_takes_the_lock_again_lets_the_waiting_readers_in_first() -> None:
    """A writer re-taking the lock at once got it back before the readers it had woken ran: an add
    applied to HNSW piece by piece held every search until its last piece."""
    lock = ReadWriteLock()
    order: list[str] = []

    def search() -> None:
        with lock.read():
            order.append("search")

    with ThreadPoolExecutor(3) as pool:
        with lock.write():
            order.append("piece 1")
            searches = [pool.submit(search) for _ in range(3)]
            assert until(lambda: lock._readers_waiting == 3)
        with lock.write(after_waiting_readers=True):
            order.append("piece 2")
        for future in searches:
            future.result(timeout=5)
        assert order == ["piece 1", "search", "search", "search", "piece 2"]
        with lock.write():  # without it, the writer goes first as before
            searches = [pool.submit(search)]
            assert until(lambda: lock._readers_waiting == 1)
        with lock.write():
            order.append("piece 3")
        searches[0].result(timeout=5)
    assert order[-2:] in (["piece 3", "search"], ["search", "piece 3"])


def test_a_writer_letting_readers_in_queues_behind_another_writer_instead_of_waiting_forever() -> None:
    """The readers it lets in first cannot enter while another writer waits: it queues then."""
    lock = ReadWriteLock()
    order: list[str] = []

    def write(name: str, **kwargs: bool) -> None:
        with lock.write(**kwargs):
            order.append(name)

    def read() -> None:
        with lock.read():
            order.append("search")

    with ThreadPoolExecutor(3) as pool:
        with lock.read():
            other = pool.submit(write, "other writer")
            assert until(lambda: lock._writers_waiting == 1)
            reader = pool.submit(read)
            assert until(lambda: lock._readers_waiting == 1)
            piece = pool.submit(write, "piece", after_waiting_readers=True)
            assert until(lambda: lock._writers_waiting == 2), "queued as a writer"
        for future in (other, reader, piece):
            future.result(timeout=5)
    assert sorted(order[:2]) == ["other writer", "piece"] and order[2] == "search"  # writers preferred
