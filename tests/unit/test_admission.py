"""Admission by deadline and stake (serve_app/ops/admission.py), on a fake clock where time matters."""

import asyncio

import pytest

from serve_app.config import AdmissionConfig
from serve_app.ops.admission import Admission, QueueDeadline, Shed


def run(coro):
    return asyncio.run(coro)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


async def hold(adm, prio, release, log, name, deadline_s=10.0, cost=1.0):
    try:
        async with adm.slot(prio, adm.clock() + deadline_s, cost):
            log.append(("in", name))
            await release.wait()
    except (Shed, QueueDeadline) as exc:
        log.append((type(exc).__name__, name))


async def measure(adm, clock, items_per_s, requests=8, cost=1.0):
    """Complete `requests` one after another at `items_per_s`: the admission learns the drain rate."""
    for _ in range(requests):
        async with adm.slot(0, clock() + 100, cost):
            clock.now += cost / items_per_s


async def queue_behind(adm, log, release, specs):
    """Start one holder of all in-flight room, then the waiters (prio, name, deadline_s, cost) in order."""
    tasks = [asyncio.create_task(hold(adm, 0, release, log, "running", 100, cost=adm.in_flight_items))]
    await asyncio.sleep(0)
    for prio, name, deadline_s, cost in specs:
        tasks.append(asyncio.create_task(hold(adm, prio, release, log, name, deadline_s, cost)))
        await asyncio.sleep(0)
    return tasks


def test_slots_go_to_the_highest_stake_waiter_first():
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(), in_flight_items=1, clock=clock)
        await measure(adm, clock, items_per_s=100)
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
    assert adm.in_flight == 0 and not adm.waiting and adm.queued_work == 0


def test_work_goes_ahead_to_the_workload_up_to_in_flight_items():
    async def scenario():
        adm = Admission(AdmissionConfig(), in_flight_items=8)
        release, log = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(adm, 1, release, log, f"r{i}", cost=3)) for i in range(4)]
        await asyncio.sleep(0.01)
        sent = (adm.in_flight, adm.work_in_flight, len(adm.waiting))
        release.set()
        await asyncio.gather(*tasks)
        return sent

    # 3 + 3 fit in 8 texts; the third request waits at the router (in stake order) until room frees.
    assert run(scenario()) == (2, 6.0, 2)


def test_refused_only_when_the_estimated_finish_misses_the_deadline():
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(deadline_share=1.0), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=100)
        assert adm.drain_rate() == pytest.approx(100)
        release, log = asyncio.Event(), []
        # 10 items in flight and 20 queued: a newcomer of 1 item finishes in (10 + 20 + 1) / 100 = 0.31 s.
        tasks = await queue_behind(adm, log, release, [(1, "q1", 100, 10), (1, "q2", 100, 10)])
        assert adm.estimated_wait_s(1) == pytest.approx(0.30)
        await hold(adm, 1, release, log, "too_late", deadline_s=0.30)
        tasks.append(asyncio.create_task(hold(adm, 1, release, log, "in_time", deadline_s=0.32)))
        await asyncio.sleep(0)
        assert adm.would_shed(1, clock() + 0.29) and not adm.would_shed(1, clock() + 0.31)
        release.set()
        await asyncio.gather(*tasks)
        return log, adm

    log, adm = run(scenario())
    assert ("Shed", "too_late") in log and ("in", "in_time") in log
    assert adm.shed_total == 1 and adm.in_flight == 0


def test_work_the_workload_does_for_the_agents_tools_counts_ahead_of_newcomers():
    # The retrieve tool's texts reach the embeddings without a router: the monitor reads them
    # (Embeddings.outside_work) and admission counts them, as if they were in flight from here.
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(deadline_share=1.0), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=100)
        release, log = asyncio.Event(), []
        tasks = await queue_behind(adm, log, release, [])  # 10 items of ours in flight: 0.10 s ahead
        assert not adm.would_shed(0, clock() + 0.2)
        adm.outside_work = 20.0  # and 20 texts of agents' retrieve calls
        assert adm.estimated_wait_s(0) == pytest.approx(0.30)
        assert adm.would_shed(0, clock() + 0.2) and not adm.would_shed(0, clock() + 0.31)
        await hold(adm, 0, release, log, "late", deadline_s=0.25)
        release.set()
        await asyncio.gather(*tasks)
        return log, adm.snapshot()

    log, snapshot = run(scenario())
    assert ("Shed", "late") in log and snapshot["outside_work"] == 20.0


def test_deadline_share_keeps_a_margin():
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(deadline_share=0.5), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=100)
        release, log = asyncio.Event(), []
        tasks = await queue_behind(adm, log, release, [])
        # The smallest request waits behind 10 items: 0.1 s. Refused with 0.18 s left (half is 0.09), admitted with 0.3 s.
        return adm.would_shed(1, clock() + 0.18), adm.would_shed(1, clock() + 0.3), release, tasks

    async def main():
        late, early, release, tasks = await scenario()
        release.set()
        await asyncio.gather(*tasks)
        return late, early

    assert run(main()) == (True, False)


def test_higher_stake_sees_less_work_ahead_and_displaces_waiters_it_makes_late():
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(deadline_share=1.0), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=100)
        release, log = asyncio.Event(), []
        # Low stake queued with 0.25 s left, 10 items: it finishes at (10 + 10) / 100 = 0.2 s.
        tasks = await queue_behind(adm, log, release, [(5, "low", 0.25, 10), (5, "low_roomy", 5.0, 1)])
        # A low-stake newcomer would wait behind 21 items: it cannot finish in 0.2 s. A high-stake one, behind 10, can.
        assert adm.would_shed(5, clock() + 0.2) and not adm.would_shed(50, clock() + 0.2)
        # The high-stake 10 items go first: "low" would now finish at 0.3 s, past its deadline -> shed at once.
        tasks.append(asyncio.create_task(hold(adm, 50, release, log, "high", 0.25, 10)))
        await asyncio.sleep(0.01)
        displaced = [name for kind, name in log if kind == "Shed"]
        release.set()
        await asyncio.gather(*tasks)
        return displaced, log, adm

    displaced, log, adm = run(scenario())
    assert displaced == ["low"]
    assert ("in", "high") in log and ("in", "low_roomy") in log
    assert adm.displaced_total == 1


def test_idle_time_does_not_slow_the_measured_rate():
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(), in_flight_items=10, clock=clock)
        for _ in range(8):
            await measure(adm, clock, items_per_s=200, requests=1)
            clock.now += 5.0  # nothing in flight for 5 s between requests
        return adm.drain_rate()

    assert run(scenario()) == pytest.approx(200)


def test_the_rate_follows_the_running_replicas():
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=100)
        one = adm.drain_rate()
        adm.resize(2.0)  # a second replica: twice the drain, twice the work sent ahead
        return one, adm.drain_rate(), adm.in_flight_items

    assert run(scenario()) == (pytest.approx(100), pytest.approx(200), 20)


def test_before_any_speed_is_known_only_the_caps_refuse():
    async def scenario():
        adm = Admission(AdmissionConfig(), in_flight_items=4)
        release, log = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(adm, 1, release, log, f"r{i}")) for i in range(10)]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*tasks)
        return log

    log = run(scenario())
    # A cold router cannot tell who would miss a deadline: all are admitted, 4 sent ahead, 6 queued.
    assert sum(kind == "in" for kind, _ in log) == 10


def test_safety_caps_and_max_wait():
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(max_queued=1, max_wait_s=0.5), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=100)
        release, log = asyncio.Event(), []
        tasks = await queue_behind(adm, log, release, [(5, "queued", 100, 1)])
        await hold(adm, 5, release, log, "over_cap")  # the queue is full and it does not outrank anyone
        tasks.append(asyncio.create_task(hold(adm, 9, release, log, "outranks", 100, 1)))
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        waits = Admission(AdmissionConfig(max_wait_s=0.05), in_flight_items=10, clock=clock)
        await measure(waits, clock, items_per_s=100)
        release = asyncio.Event()
        tasks = await queue_behind(waits, log, release, [(1, "w", 100, 1)])  # 0.11 s of work ahead
        over_wait = waits.would_shed(1, clock() + 100)
        release.set()
        await asyncio.gather(*tasks)
        return log, over_wait

    log, over_wait = run(scenario())
    assert ("Shed", "over_cap") in log and ("Shed", "queued") in log and ("in", "outranks") in log
    assert over_wait


def test_a_waiter_whose_deadline_passes_gets_queue_deadline():
    async def scenario():
        adm = Admission(AdmissionConfig(), in_flight_items=1)
        release, log = asyncio.Event(), []
        holder = asyncio.create_task(hold(adm, 1, release, log, "running"))
        await asyncio.sleep(0.01)
        await hold(adm, 1, release, log, "late", deadline_s=0.02)
        release.set()
        await holder
        return log, adm

    log, adm = run(scenario())
    assert ("QueueDeadline", "late") in log
    assert adm.in_flight == 0 and not adm.waiting


def test_a_cancelled_waiter_leaves_no_slot_behind():
    async def scenario():
        adm = Admission(AdmissionConfig(), in_flight_items=1)
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
    assert adm.in_flight == 0 and not adm.waiting and adm.queued_work == 0


def test_resize_grows_the_bounds_with_the_replicas_and_admits_waiters_at_once():
    async def scenario():
        adm = Admission(AdmissionConfig(max_in_flight=2, max_queued=3), in_flight_items=10)
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


def test_before_measuring_the_speed_the_workload_reported_at_start_decides():
    async def scenario():
        adm = Admission(AdmissionConfig(), in_flight_items=4)
        adm.prior_rate = 1000.0  # the replica timed its probe set at start: 1000 items/s
        release, log = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(adm, 1, release, log, f"r{i}")) for i in range(10)]
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*tasks)
        return log

    assert [kind for kind, _ in run(scenario())].count("in") == 10  # all make their 10 s deadline


def test_work_that_finishes_later_than_estimated_makes_later_estimates_longer():
    """The router's own time (event loop, signatures) is not in the drain rate: admitted work
    that finishes later than estimated raises the lag, and the lag is added to estimates."""
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(deadline_share=1.0), in_flight_items=100, clock=clock)
        await measure(adm, clock, items_per_s=100)
        release, log = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(adm, 1, release, log, f"r{i}", 100)) for i in range(10)]
        await asyncio.sleep(0.01)  # ten admitted at once, each estimated to finish within 0.1 s
        clock.now += 0.5  # ...and all finish 0.5 s later
        release.set()
        await asyncio.gather(*tasks)
        learned = adm.lag_s
        adm = Admission(AdmissionConfig(deadline_share=1.0), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=100)
        release, log = asyncio.Event(), []
        tasks = await queue_behind(adm, log, release, [])  # 10 items ahead: 0.1 s
        adm.lag_s = 0.0
        fits_without = not adm.would_shed(1, clock() + 0.3)
        adm.lag_s = 0.5
        fits_with = not adm.would_shed(1, clock() + 0.3)
        release.set()
        await asyncio.gather(*tasks)
        return learned, fits_without, fits_with

    learned, fits_without, fits_with = run(scenario())
    assert learned > 0.1
    assert fits_without and not fits_with


def test_work_cut_short_counts_its_busy_time_but_drains_nothing():
    # Runs cancelled at their deadline must not make the workload look fast: a quarter-second
    # of a session that needs a second is not a session done.
    async def scenario():
        clock = Clock()
        adm = Admission(AdmissionConfig(), in_flight_items=10, clock=clock)
        await measure(adm, clock, items_per_s=1.0, requests=4)  # one item per second
        for _ in range(8):
            with pytest.raises(TimeoutError):
                async with adm.slot(0, clock() + 100, 1.0):
                    clock.now += 0.25
                    raise TimeoutError  # the call was cut at its deadline
        return adm.drain_rate()

    assert run(scenario()) < 1.0
