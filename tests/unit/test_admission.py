import asyncio
import time

import pytest

from serve_app.config import AdmissionConfig
from serve_app.ops.admission import Admission, QueueDeadline, Shed


def run(coro):
    return asyncio.run(coro)


async def hold(adm, prio, release, log, name, deadline_s=10.0):
    try:
        async with adm.slot(prio, time.monotonic() + deadline_s):
            log.append(("in", name))
            await release.wait()
    except (Shed, QueueDeadline) as exc:
        log.append((type(exc).__name__, name))


def test_slots_go_to_the_highest_stake_waiter_first():
    async def scenario():
        adm = Admission(AdmissionConfig(max_in_flight=1, max_queued=5, max_wait_s=5))
        release, log = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(adm, 1, release, log, "first"))]
        await asyncio.sleep(0.01)
        for prio, name in [(5, "low"), (50, "high"), (5, "low2")]:
            tasks.append(asyncio.create_task(hold(adm, prio, release, log, name)))
            await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*tasks)
        return [name for kind, name in log if kind == "in"], adm

    order, adm = run(scenario())
    assert order == ["first", "high", "low", "low2"]
    assert adm.in_flight == 0 and not adm.waiting


def test_full_queue_sheds_the_newcomer_or_displaces_lower_stake():
    async def scenario():
        adm = Admission(AdmissionConfig(max_in_flight=1, max_queued=1, max_wait_s=5))
        release, log = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(adm, 1, release, log, "running"))]
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(hold(adm, 10, release, log, "queued")))
        await asyncio.sleep(0.01)
        started = time.monotonic()
        await hold(adm, 5, release, log, "lower")  # queue full of a higher stake: shed at once
        shed_ms = (time.monotonic() - started) * 1000
        tasks.append(asyncio.create_task(hold(adm, 100, release, log, "higher")))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*tasks)
        return log, shed_ms, adm

    log, shed_ms, adm = run(scenario())
    assert ("Shed", "lower") in log and ("Shed", "queued") in log  # displaced by "higher"
    assert ("in", "higher") in log
    assert shed_ms < 50
    assert adm.displaced_total == 1 and adm.shed_total == 2


def test_waiting_is_bounded_by_max_wait_and_by_the_deadline():
    async def scenario():
        adm = Admission(AdmissionConfig(max_in_flight=1, max_queued=5, max_wait_s=0.05))
        release, log = asyncio.Event(), []
        holder = asyncio.create_task(hold(adm, 1, release, log, "running"))
        await asyncio.sleep(0.01)
        await hold(adm, 1, release, log, "waited")
        await hold(adm, 1, release, log, "late", deadline_s=0.01)
        release.set()
        await holder
        return log, adm

    log, adm = run(scenario())
    assert ("Shed", "waited") in log and ("QueueDeadline", "late") in log
    assert adm.in_flight == 0 and not adm.waiting


def test_a_cancelled_waiter_leaves_no_slot_behind():
    async def scenario():
        adm = Admission(AdmissionConfig(max_in_flight=1, max_queued=5, max_wait_s=5))
        release, log = asyncio.Event(), []
        holder = asyncio.create_task(hold(adm, 1, release, log, "running"))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(hold(adm, 1, release, log, "gone"))
        await asyncio.sleep(0.01)
        waiter.cancel()
        release.set()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return adm

    adm = run(scenario())
    assert adm.in_flight == 0 and not adm.waiting


def test_resize_grows_the_bounds_with_the_replicas_and_admits_waiters_at_once():
    async def scenario():
        adm = Admission(AdmissionConfig(max_in_flight=2, max_queued=3, max_wait_s=5))
        release, log = asyncio.Event(), []
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(hold(adm, 1, release, log, f"r{i}")))
            await asyncio.sleep(0.01)
        admitted_before = sum(1 for kind, _ in log if kind == "in")
        adm.resize(2.0)  # a second workload replica runs: twice the slots, the waiters go in now
        await asyncio.sleep(0.01)
        admitted_after = sum(1 for kind, _ in log if kind == "in")
        bounds = (adm.max_in_flight, adm.max_queued)
        adm.resize(0.5)  # never below the configured bounds
        release.set()
        await asyncio.gather(*tasks)
        return admitted_before, admitted_after, bounds, (adm.max_in_flight, adm.max_queued)

    before, after, grown, floor = run(scenario())
    assert (before, after) == (2, 4)
    assert grown == (4, 6) and floor == (2, 3)
