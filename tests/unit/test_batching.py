"""CallBatcher: concurrent requests share remote calls, and each still gets its own answer."""

import asyncio

import pytest

from serve_app.router.batching import CallBatcher


async def settle():
    """Let the tasks started so far run up to their next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


class Remote:
    """The remote end, isolated: records each call's items and answers when released."""

    def __init__(self):
        self.calls: list[list] = []
        self.gates: list[asyncio.Event] = []

    async def send(self, items):
        self.calls.append(list(items))
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return [ValueError(f"bad {i}") if isinstance(i, str) and i.startswith("bad") else i * 10 for i in items]

    def release_all(self):
        for gate in self.gates:
            gate.set()


def test_a_lone_item_goes_at_once_and_later_items_share_the_next_call():
    async def scenario():
        remote = Remote()
        batcher = CallBatcher(remote.send, max_concurrent=1)
        first = asyncio.create_task(batcher.submit(1))
        await settle()
        assert remote.calls == [[1]]  # no waiting for company
        rest = [asyncio.create_task(batcher.submit(i)) for i in (2, 3, 4)]
        await settle()
        assert remote.calls == [[1]]  # one call out: the others wait for it
        remote.gates[0].set()
        assert await first == 10
        await settle()
        assert remote.calls == [[1], [2, 3, 4]]
        remote.release_all()
        return await asyncio.gather(*rest), batcher

    results, batcher = asyncio.run(scenario())
    assert results == [20, 30, 40] and (batcher.calls, batcher.items) == (2, 4)


def test_up_to_max_concurrent_calls_and_max_items_per_call():
    async def scenario():
        remote = Remote()
        batcher = CallBatcher(remote.send, max_concurrent=2, max_items=3)
        tasks = [asyncio.create_task(batcher.submit(i)) for i in range(1, 9)]
        await settle()
        assert remote.calls == [[1], [2]]  # two out at once, each sent as it came
        remote.release_all()
        await settle()
        remote.release_all()
        return await asyncio.gather(*tasks), remote.calls

    results, calls = asyncio.run(scenario())
    assert results == [i * 10 for i in range(1, 9)]
    assert calls[2:] == [[3, 4, 5], [6, 7, 8]]  # what queued meanwhile, at most 3 a call


def test_a_failed_item_fails_alone_and_a_failed_call_fails_all_of_its_items():
    async def scenario():
        remote = Remote()
        batcher = CallBatcher(remote.send, max_concurrent=1)
        blocker = asyncio.create_task(batcher.submit(0))
        await settle()
        tasks = [asyncio.create_task(batcher.submit(x)) for x in (1, "bad", 3)]
        await settle()
        remote.release_all()
        await settle()
        remote.release_all()
        per_item = await asyncio.gather(*tasks, return_exceptions=True)
        await blocker
        assert remote.calls[1] == [1, "bad", 3]  # one call for the three

        async def broken(items):
            raise ConnectionError("the replica died")

        dead = CallBatcher(broken, max_concurrent=1)
        whole = await asyncio.gather(dead.submit(1), dead.submit(2), return_exceptions=True)
        return per_item, whole

    per_item, whole = asyncio.run(scenario())
    assert per_item[0] == 10 and per_item[2] == 30 and isinstance(per_item[1], ValueError)
    assert all(isinstance(r, ConnectionError) for r in whole)


def test_a_caller_that_stops_waiting_takes_nothing_from_the_others():
    async def scenario():
        remote = Remote()
        batcher = CallBatcher(remote.send, max_concurrent=1)
        first = asyncio.create_task(batcher.submit(1))
        await settle()
        gone = asyncio.create_task(batcher.submit(2))
        stays = asyncio.create_task(batcher.submit(3))
        await settle()
        gone.cancel()  # before its call left: it is not sent at all
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(first, 0.01)  # a timed-out caller: its call still completes for the rest
        remote.gates[0].set()
        await settle()
        remote.release_all()
        return await stays, remote.calls

    stays, calls = asyncio.run(scenario())
    assert stays == 30 and calls == [[1], [3]]
