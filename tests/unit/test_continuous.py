"""The ContinuousRunner over a scripted engine: steps join a running batch and leave it when
done (continuous) or only when it is empty (static); callers that go away or run out of
time leave it at the next call; an engine error fails the steps in the batch, not the runner."""

import asyncio
import threading
import time

import pytest

from serve_app.contracts import DeadlinePassed, Generation
from serve_app.inference.continuous import ContinuousRunner
from serve_app.inference.thread import EngineThread
from tests.unit.stepping import until


class ScriptedEngine:
    """A step's message is its length in tokens ("5"); one token per row per iteration."""

    def __init__(self):
        self.rows: dict[int, list] = {}  # key -> [left, length]
        self.calls: list[tuple[list, list]] = []  # (joined keys, cancelled keys) per call
        self.fail_next = False
        self.release_first = None  # a threading.Event: the first call returns once it is set

    def decode(self, joins, cancels, iterations):
        self.calls.append(([s.key for s in joins], list(cancels)))
        if len(self.calls) == 1 and self.release_first is not None:
            assert self.release_first.wait(30), "the test never released the first call"
        for key in cancels:
            self.rows.pop(key, None)
        if self.fail_next:
            self.fail_next, self.rows = False, {}
            raise RuntimeError("the model failed")
        for step in joins:
            length = int(step.messages[-1]["content"])
            self.rows[step.key] = [length, length]
        finished, tokens = [], 0
        for _ in range(max(1, iterations)):
            for key, row in list(self.rows.items()):
                row[0] -= 1
                tokens += 1
                if row[0] == 0:
                    del self.rows[key]
                    finished.append((key, Generation(f"done {row[1]}", 1, row[1])))
            if finished or not self.rows:
                break
        time.sleep(0.002)
        return {"finished": finished, "tokens": tokens, "passes": 1}


def runner(mode="continuous", max_rows=8, iterations=4):
    engine = ScriptedEngine()
    return engine, ContinuousRunner(EngineThread("test"), engine.decode, max_rows=max_rows, mode=mode,
                                    iterations=iterations)


def step(n):
    return [{"role": "user", "content": str(n)}]


@pytest.mark.parametrize("mode", ["continuous", "static"])
def test_short_steps_do_not_wait_for_long_ones_when_continuous(mode):
    engine, r = runner(mode)
    engine.release_first = threading.Event()

    async def scenario():
        done = []

        async def one(n):
            await r.run(step(n))
            done.append(n)

        # Step by step: the long step is decoding (its first call held open) when the short ones queue.
        tasks = [asyncio.ensure_future(one(40))]
        await until(lambda: len(engine.calls) == 1, pause_s=0.001)
        tasks += [asyncio.ensure_future(one(2)) for _ in range(2)]
        await until(lambda: r.queued_items == 2)
        engine.release_first.set()
        await asyncio.gather(*tasks)
        return done

    done = asyncio.run(scenario())
    if mode == "continuous":  # the short ones joined the long one's batch and left it first
        assert done == [2, 2, 40] and engine.calls[1][0] == [1, 2]
    else:  # they waited for the long one to finish, then ran together
        assert done == [40, 2, 2] and [1, 2] in [j for j, _ in engine.calls]
        assert all(j == [] for j, _ in engine.calls[1:-1])
    assert r.idle and r.tokens == 44


def test_at_most_max_rows_decode_together():
    engine, r = runner(max_rows=2)

    async def scenario():
        return await asyncio.gather(*(r.run(step(3)) for _ in range(5)))

    assert [g.text for g in asyncio.run(scenario())] == ["done 3"] * 5
    assert r.largest_pass == 2


def test_a_caller_that_goes_away_or_runs_out_of_time_leaves_the_batch():
    engine, r = runner(iterations=2)

    async def scenario():
        gone = asyncio.ensure_future(r.run(step(1000)))
        late = asyncio.ensure_future(r.run(step(1000), deadline=time.time() + 0.5))
        await until(lambda: r.running == 2)  # both decoding
        gone.cancel()
        with pytest.raises(DeadlinePassed):
            await late
        return await r.run(step(3))

    assert asyncio.run(scenario()).text == "done 3"
    cancelled = [key for _, cancels in engine.calls for key in cancels]
    assert sorted(cancelled) == [0, 1] and engine.rows == {} and r.expired == 1


def test_an_engine_error_fails_the_batch_and_the_runner_goes_on():
    engine, r = runner()

    async def scenario():
        first = asyncio.ensure_future(r.run(step(50)))
        await asyncio.sleep(0.02)
        engine.fail_next = True
        with pytest.raises(RuntimeError, match="the model failed"):
            await first
        return await r.run(step(2))

    assert asyncio.run(scenario()).text == "done 2"


def test_the_mode_is_checked():
    with pytest.raises(ValueError, match="mode"):
        ContinuousRunner(EngineThread("t"), lambda *a: None, max_rows=1, mode="eager")
