"""The leader/follower batcher: every caller gets its own result, concurrent callers share batches,
an idle caller runs at once, and an error reaches only the callers whose items raise it; coroutine
callers likewise, without a thread each."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagesearch.server.batching import Batcher
from imagesearch.server.budget import PixelBudget


class SlowDoubler:
    """Doubles numbers, taking a while per batch (not per item), and records the batch sizes."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.sizes: list[int] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.sizes.append(len(items))
        time.sleep(self.delay_s)
        return [2 * item for item in items]


def test_an_idle_caller_runs_at_once_alone():
    work = SlowDoubler(0.0)
    batcher = Batcher(work)
    started = time.perf_counter()
    assert batcher.submit(21) == 42
    assert time.perf_counter() - started < 0.01
    assert work.sizes == [1]


def test_concurrent_callers_share_batches_and_each_gets_its_own_result():
    work = SlowDoubler()
    batcher = Batcher(work)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(batcher.submit, range(200)))
    assert results == [2 * i for i in range(200)]
    assert sum(work.sizes) == 200
    assert len(work.sizes) < 60, f"200 callers in {len(work.sizes)} batches: {work.sizes}"
    assert max(work.sizes) > 1


def test_submit_many_keeps_order_and_respects_max_batch():
    work = SlowDoubler(0.0)
    batcher = Batcher(work, max_batch=4)
    assert batcher.submit_many(list(range(10))) == [2 * i for i in range(10)]
    assert work.sizes == [4, 4, 2]


def test_an_error_reaches_the_callers_of_its_batch_only():
    calls: list[Sequence[int]] = []

    def fails_on_13(items: Sequence[int]) -> list[int]:
        calls.append(items)
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    batcher = Batcher(fails_on_13)
    with pytest.raises(ValueError, match="unlucky"):
        batcher.submit(13)
    assert batcher.submit(7) == 7  # the batcher is not stuck after a failure


def test_a_failing_batch_of_several_callers_fails_only_the_caller_that_caused_it():
    """A plugin that refuses one caller's image failed every caller that shared the batch (an
    outside test: 4 of 5 innocent requests INTERNAL). The batch is run again call by call."""
    release = threading.Event()
    sizes: list[int] = []

    def fails_on_13(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 1:
            release.wait(5)  # the first batch runs while the others queue up together
        if 13 in items:
            raise ValueError("unlucky")
        return [2 * item for item in items]

    batcher = Batcher(fails_on_13)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.submit, 0)
        time.sleep(0.05)
        innocent = [pool.submit(batcher.submit_many, [i, i + 100]) for i in (1, 2, 3)]
        guilty = pool.submit(batcher.submit_many, [12, 13])
        time.sleep(0.05)
        release.set()
        assert first.result() == 0
        assert [f.result() for f in innocent] == [[2, 202], [4, 204], [6, 206]]
        with pytest.raises(ValueError, match="unlucky"):
            guilty.result()
    assert sizes[:2] == [1, 8] and sorted(sizes[2:]) == [2, 2, 2, 2]  # the shared batch, then call by call


def test_a_lone_caller_whose_batch_fails_is_not_run_twice():
    calls: list[Sequence[int]] = []

    def fails(items: Sequence[int]) -> list[int]:
        calls.append(items)
        raise ValueError("always")

    with pytest.raises(ValueError, match="always"):
        Batcher(fails).submit_many([1, 2, 3])
    assert calls == [[1, 2, 3]]


def test_callers_arriving_during_a_batch_are_served_by_the_next_one():
    release = threading.Event()
    sizes: list[int] = []

    def gated(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        if len(sizes) == 1:
            release.wait(5)
        return list(items)

    batcher = Batcher(gated)
    with ThreadPoolExecutor(8) as pool:
        first = pool.submit(batcher.submit, 0)
        time.sleep(0.05)  # the first batch is running
        later = [pool.submit(batcher.submit, i) for i in range(1, 8)]
        time.sleep(0.05)
        release.set()
        assert first.result() == 0 and [f.result() for f in later] == list(range(1, 8))
    assert sizes == [1, 7]


def test_the_pixel_budget_makes_overdrawing_callers_wait():
    budget = PixelBudget(100)
    order: list[str] = []

    def second() -> None:
        with budget.hold(50):
            order.append("second")

    with budget.hold(80):
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(0.05)
        order.append("first releases")
    waiter.join(2)
    assert order == ["first releases", "second"]
    with budget.hold(10**9):  # more than the whole budget: holds all of it, never deadlocks
        assert budget.free == 0


def closed_loop_sizes(batcher: Batcher, callers: int, rounds: int, think_s: float) -> list[int]:
    """Callers that each submit, 'send the answer back' (think_s), and submit again."""

    def caller(worker: int) -> None:
        for i in range(rounds):
            assert batcher.submit(worker * 1000 + i) == 2 * (worker * 1000 + i)
            time.sleep(think_s)

    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(caller, range(callers)))
    return batcher.run.sizes  # type: ignore[attr-defined]


def test_closed_loop_callers_stay_in_one_batch_instead_of_alternating_halves():
    """Callers coming back a round trip after their batch would otherwise split: the first one
    back leads a batch alone while the rest queue behind it. The leader waits for the demand."""
    sizes = closed_loop_sizes(Batcher(SlowDoubler(0.005), max_wait_s=0.05), 8, 12, think_s=0.002)
    steady = sizes[2:-2]  # the first callers arrive over time; the last ones leave
    assert sum(steady) / len(steady) > 6, sizes
    without = closed_loop_sizes(Batcher(SlowDoubler(0.005), max_wait_s=0.0), 8, 12, think_s=0.002)
    assert len(without) > len(sizes), (without, sizes)


def test_a_single_caller_never_waits_for_company():
    work = SlowDoubler(0.0)
    batcher = Batcher(work, max_wait_s=1.0)
    started = time.perf_counter()
    for i in range(20):
        assert batcher.submit(i) == 2 * i
    assert time.perf_counter() - started < 0.5, "a lone caller waited for callers who never come"
    assert work.sizes == [1] * 20


def test_the_wait_ends_when_demand_falls():
    """After a batch of 8, a lone caller waits at most max_wait_s once, then runs at once again."""
    work = SlowDoubler(0.0)
    batcher = Batcher(work, max_wait_s=0.1)
    closed_loop_sizes(batcher, 8, 3, think_s=0.0)
    started = time.perf_counter()
    batcher.submit(1)
    first = time.perf_counter() - started
    started = time.perf_counter()
    batcher.submit(2)
    assert first < 0.25 and time.perf_counter() - started < 0.05


def test_batches_run_on_the_runner_thread_when_given_one():
    threads: set[str] = set()

    def work(items: Sequence[int]) -> list[int]:
        threads.add(threading.current_thread().name)
        return list(items)

    with ThreadPoolExecutor(1, thread_name_prefix="runner") as runner:
        batcher = Batcher(work, runner=runner)
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(batcher.submit, range(50))) == list(range(50))
    assert threads == {"runner_0"}


# -- coroutine callers (submit_many_async) ----------------------------------------------------
def test_coroutines_and_threads_share_batches_and_each_gets_its_own_result():
    """Coroutines on one event loop hold no thread while they wait: 100 of them and 40 threads
    are served by one runner thread, in shared batches."""
    work = SlowDoubler(0.01)
    with ThreadPoolExecutor(1) as runner, ThreadPoolExecutor(8) as pool:
        batcher = Batcher(work, runner=runner)

        async def coroutines() -> list[list[int]]:
            return await asyncio.gather(*(batcher.submit_many_async([i]) for i in range(100)))

        threads = [pool.submit(batcher.submit, 1000 + i) for i in range(40)]
        assert asyncio.run(coroutines()) == [[2 * i] for i in range(100)]
        assert [f.result() for f in threads] == [2 * (1000 + i) for i in range(40)]
    assert sum(work.sizes) == 140
    assert len(work.sizes) < 60, work.sizes


def test_one_coroutines_items_over_several_batches_keep_their_order():
    work = SlowDoubler(0.0)
    with ThreadPoolExecutor(1) as runner:
        batcher = Batcher(work, max_batch=4, runner=runner)
        assert asyncio.run(batcher.submit_many_async(list(range(10)))) == [2 * i for i in range(10)]
    assert work.sizes == [4, 4, 2]


def test_an_error_reaches_the_coroutines_of_its_batch_only():
    def fails_on_13(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    with ThreadPoolExecutor(1) as runner:
        batcher = Batcher(fails_on_13, runner=runner)
        with pytest.raises(ValueError, match="unlucky"):
            asyncio.run(batcher.submit_many_async([13]))
        assert asyncio.run(batcher.submit_many_async([7])) == [7]


def test_a_failing_batch_of_coroutines_fails_only_the_one_that_caused_it():
    def fails_on_13(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    async def together() -> list[object]:
        return await asyncio.gather(
            *(batcher.submit_many_async(items) for items in ([1], [13, 2], [3])), return_exceptions=True
        )

    with ThreadPoolExecutor(1) as runner:
        batcher = Batcher(fails_on_13, runner=runner)
        outcomes = asyncio.run(together())
    assert outcomes[0] == [1] and outcomes[2] == [3] and isinstance(outcomes[1], ValueError)


def test_a_cancelled_coroutine_leaves_the_batcher_serving_the_others():
    """A caller that goes away (its RPC cancelled) while queued: its batch still runs, the others
    get their results, and the next caller is served."""
    gate = threading.Event()

    def gated(items: Sequence[int]) -> list[int]:
        gate.wait(5)
        return list(items)

    async def scenario(batcher: Batcher) -> None:
        first = asyncio.ensure_future(batcher.submit_many_async([1]))
        await asyncio.sleep(0.05)  # the first batch runs, and waits at the gate
        leaving = asyncio.ensure_future(batcher.submit_many_async([2]))
        staying = asyncio.ensure_future(batcher.submit_many_async([3]))
        await asyncio.sleep(0.05)
        leaving.cancel()
        gate.set()
        assert await asyncio.wait_for(first, 5) == [1]
        assert await asyncio.wait_for(staying, 5) == [3]
        with pytest.raises(asyncio.CancelledError):
            await leaving
        assert await asyncio.wait_for(batcher.submit_many_async([4]), 5) == [4]

    with ThreadPoolExecutor(1) as runner:
        asyncio.run(scenario(Batcher(gated, runner=runner)))


def test_a_coroutine_needs_a_runner_to_lead_on():
    with pytest.raises(RuntimeError, match="runner"):
        asyncio.run(Batcher(list).submit_many_async([1]))


def test_a_shut_down_runner_fails_coroutines_instead_of_leaving_them_waiting():
    runner = ThreadPoolExecutor(1)
    runner.shutdown()
    batcher = Batcher(list, runner=runner)
    for _ in range(2):  # and the batcher is not left busy by the first failure
        with pytest.raises(RuntimeError, match="shutdown"):
            asyncio.run(asyncio.wait_for(batcher.submit_many_async([1]), 5))


def test_a_gathering_leader_starts_as_soon_as_the_demand_is_there():
    """The leader waits for as many callers as came around the last batch, but is woken the
    moment they are all queued: not at max_wait_s, and not by each of them (a thread switch)."""
    work = SlowDoubler(0.0)
    batcher = Batcher(work, max_wait_s=5.0)
    batcher.submit_many(list(range(8)))  # a batch of 8 just ended: the next leader expects 8
    with ThreadPoolExecutor(8) as pool:
        started = time.perf_counter()
        assert list(pool.map(batcher.submit, range(8))) == [2 * i for i in range(8)]
    assert time.perf_counter() - started < 2.5, "the leader waited out max_wait_s with everyone there"
