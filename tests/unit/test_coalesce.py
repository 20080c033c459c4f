"""CoalescingRunner: work queued behind a busy engine goes into its next pass, split back per caller."""

import asyncio
import threading

import numpy as np
import pytest

from serve_app.contracts import DeadlinePassed
from serve_app.inference.coalesce import CoalescingRunner
from serve_app.inference.thread import EngineThread
from tests.unit.stepping import until


class Engine:
    """Doubles numbers; the first pass blocks until released, so the test can queue work behind it."""

    def __init__(self):
        self.passes: list[list[int]] = []
        self.release = threading.Event()
        self.busy = threading.Event()  # set once the first pass has started

    def __call__(self, items):
        if not self.passes:
            self.busy.set()
            self.release.wait(5)
        self.passes.append(list(items))
        if any(x < 0 for x in items):
            raise ValueError("negative input")
        arr = np.asarray(items)
        return arr * 2, arr + 100


def run(coro):
    return asyncio.run(coro)


async def queue_behind_first(runner, engine, later):
    first = asyncio.create_task(runner.run([1]))
    await until(engine.busy.is_set, pause_s=0.001)  # the engine is now busy with [1]
    rest = [asyncio.create_task(runner.run(items)) for items in later]
    await until(lambda: runner.queued_items == sum(map(len, later)))
    engine.release.set()
    return await first, await asyncio.gather(*rest, return_exceptions=True)


def test_work_queued_while_busy_runs_in_one_pass_and_splits_back():
    engine = Engine()
    runner = CoalescingRunner(EngineThread("t"), engine, max_items=64)
    first, rest = run(queue_behind_first(runner, engine, [[2, 3], [4], [5, 6, 7]]))
    assert engine.passes == [[1], [2, 3, 4, 5, 6, 7]]
    assert first[0].tolist() == [2] and first[1].tolist() == [101]
    assert [r[0].tolist() for r in rest] == [[4, 6], [8], [10, 12, 14]]
    assert [r[1].tolist() for r in rest] == [[102, 103], [104], [105, 106, 107]]
    assert (runner.passes, runner.items_done, runner.largest_pass) == (2, 7, 6)


def test_a_pass_never_exceeds_max_items_and_never_splits_a_request():
    engine = Engine()
    runner = CoalescingRunner(EngineThread("t"), engine, max_items=4)
    _, rest = run(queue_behind_first(runner, engine, [[2, 3], [4, 5], [6], [7, 8, 9]]))
    assert engine.passes == [[1], [2, 3, 4, 5], [6, 7, 8, 9]]
    assert [r[0].tolist() for r in rest] == [[4, 6], [8, 10], [12], [14, 16, 18]]


def test_an_error_reaches_only_the_callers_of_that_pass_and_the_runner_goes_on():
    engine = Engine()
    runner = CoalescingRunner(EngineThread("t"), engine, max_items=3)
    _, rest = run(queue_behind_first(runner, engine, [[2], [-1], [3, 4]]))
    assert engine.passes == [[1], [2, -1], [3, 4]]
    assert isinstance(rest[0], ValueError) and isinstance(rest[1], ValueError)
    assert rest[2][0].tolist() == [6, 8]

    async def again():
        return await runner.run([5])

    assert run(again())[0].tolist() == [10]


def test_a_cancelled_caller_is_skipped():
    engine = Engine()
    runner = CoalescingRunner(EngineThread("t"), engine, max_items=64)

    async def scenario():
        first = asyncio.create_task(runner.run([1]))
        await until(engine.busy.is_set, pause_s=0.001)
        gone = asyncio.create_task(runner.run([2]))
        kept = asyncio.create_task(runner.run([3]))
        await until(lambda: runner.queued_items == 2)
        gone.cancel()
        engine.release.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    assert run(scenario())[0].tolist() == [6]
    assert engine.passes == [[1], [3]]


def test_work_whose_deadline_passed_while_queued_is_dropped_not_computed():
    import time


    engine = Engine()
    runner = CoalescingRunner(EngineThread("t"), engine, max_items=64)

    async def scenario():
        first = asyncio.create_task(runner.run([1]))
        await until(engine.busy.is_set, pause_s=0.001)
        late = asyncio.create_task(runner.run([2], deadline=time.time() + 0.01))
        fine = asyncio.create_task(runner.run([3], deadline=time.time() + 10))
        await until(lambda: runner.queued_items == 2)
        await asyncio.sleep(0.05)  # past late's deadline (a lower bound: any delay only adds to it)
        engine.release.set()
        return await first, await asyncio.gather(late, fine, return_exceptions=True)

    _, (late, fine) = run(scenario())
    assert isinstance(late, DeadlinePassed)
    assert fine[0].tolist() == [6]
    assert engine.passes == [[1], [3]] and runner.expired == 1
