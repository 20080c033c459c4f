"""Admission to a workload by deadline, in stake order.

A request is refused only when it cannot be answered inside its deadline. Each request
has a cost in the workload's items (texts, images at the default preset, sessions). The
router sends work ahead to the workload up to `in_flight_items` (about two full passes:
one running, one forming), and the rest waits here, ordered by stake (allow-listed
hotkeys first, first come first served among equals). A newcomer is admitted when

    now + (work in flight + work queued ahead of it + its own cost) / drain rate
        <= now + deadline_share x (time left before its deadline)

(plus the smoothed lag: how much later than estimated admitted work has been finishing, the
router's own time that the rate does not see), where the drain rate is the workload's
measured throughput: items completed per second
during which this router had work at the workload (idle time does not dilute it), per
workload replica, times the replicas running now. Otherwise it is refused at once (503
`shed`): a refusal in milliseconds beats an answer after the validator has given up.

A higher-stake newcomer goes ahead of lower-stake waiters; a waiter it pushes past its
own deadline is shed at once (displaced). Until the first completions give a rate, the
speed the workload reported at start is used (`items_per_s_at_start` in its info: the
embeddings engine times its probe set); with neither, only the caps refuse. `max_in_flight` and `max_queued` are
safety caps for memory, and `max_wait_s` an optional operator bound on the estimated wait.

With an autoscaled workload the router calls `resize(running replicas / min_replicas)`:
the in-flight work and the caps grow with the replicas, and so does the drain rate.
`would_shed` lets the router refuse a request on its claimed stake before spending CPU
on its signature.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from serve_app.config import AdmissionConfig

# Completions the drain rate is measured over: enough to smooth passes of different sizes.
RATE_WINDOW = 128
RATE_MIN_SAMPLES = 4
# Weight of each finished request in the smoothed lag (about the last 5 count): it must catch up within a burst.
LAG_SMOOTHING = 0.2


class Shed(Exception):
    """Refused for load; `reason` says why (cannot make the deadline, displaced, caps)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class QueueDeadline(Exception):
    """The request's own deadline passed while it waited for a slot."""


@dataclass(order=True)
class _Waiter:
    sort_key: tuple  # (-priority, arrival): the smallest goes first
    cost: float = field(compare=False)
    deadline: float = field(compare=False)  # on the admission's clock (time.monotonic)
    future: asyncio.Future = field(compare=False)


class DrainRate:
    """Items per busy second of the workload, per replica, over the last completions.

    "Busy": some of this router's work was at the workload. Time with nothing in flight is
    left out, so a quiet period does not make the workload look slow."""

    def __init__(self) -> None:
        self.busy_s = 0.0  # cumulative
        self._busy_since: float | None = None
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=RATE_WINDOW)  # (busy_s, items, replicas)
        self._replicas_sum = 0.0  # of the samples' replicas: read on every request, kept as they come and go
        self._items = 0.0

    def busy(self, now: float, busy: bool) -> None:
        """Call on every change of the in-flight count."""
        if self._busy_since is not None:
            self.busy_s += now - self._busy_since
        self._busy_since = now if busy else None

    def completed(self, now: float, items: float, replicas: float) -> None:
        self.busy(now, True)
        self._items += items
        if len(self._samples) == RATE_WINDOW:
            self._replicas_sum -= self._samples[0][2]
        self._samples.append((self.busy_s, self._items, replicas))
        self._replicas_sum += replicas

    def per_replica(self) -> float | None:
        if len(self._samples) < RATE_MIN_SAMPLES:
            return None
        (busy0, items0, _), (busy1, items1, _) = self._samples[0], self._samples[-1]
        if busy1 - busy0 <= 1e-3:
            return None
        replicas = self._replicas_sum / len(self._samples)
        return (items1 - items0) / (busy1 - busy0) / replicas


class Admission:
    def __init__(self, cfg: AdmissionConfig, in_flight_items: float, clock=time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.base_in_flight_items = in_flight_items
        self.in_flight = 0  # requests at the workload
        self.work_in_flight = 0.0  # their items
        self.waiting: list[_Waiter] = []  # sorted: the next to go first
        self.queued_work = 0.0
        self._arrivals = itertools.count()
        self.shed_total = 0
        self.displaced_total = 0
        self.rate = DrainRate()
        self.prior_rate: float | None = None  # per replica, from the workload's own start (items_per_s_at_start)
        # How much later than estimated admitted work finished, smoothed: the router's own time
        # (its event loop, signatures, responses) that the drain rate does not see. Added to estimates.
        self.lag_s = 0.0
        self.scale = 1.0
        # Items the workload is doing for others than this router's requests, as it last reported
        # (the embeddings behind the agents' retrieve tool): they are ahead of every newcomer too.
        self.outside_work = 0.0

    @property
    def max_in_flight(self) -> int:
        return math.ceil(self.cfg.max_in_flight * self.scale)

    @property
    def max_queued(self) -> int:
        return math.ceil(self.cfg.max_queued * self.scale)

    @property
    def in_flight_items(self) -> float:
        return self.base_in_flight_items * self.scale

    def resize(self, scale: float) -> None:
        """Bounds at `scale` x the configured ones (at least 1 x); more slots go to waiters at once."""
        self.scale = max(1.0, scale)
        self._grant()

    def drain_rate(self) -> float | None:
        """Items per second the workload completes now: measured, else the workload's speed at
        start, else None (unknown)."""
        per_replica = self.rate.per_replica() or self.prior_rate
        return None if per_replica is None else per_replica * self.scale

    def estimated_wait_s(self, priority: float = 0.0) -> float | None:
        """How long new work of this priority would wait for its turn (None: not measured yet)."""
        rate = self.drain_rate()
        return None if rate is None else self._ahead(priority) / rate

    def _ahead(self, priority: float) -> float:
        """Items a newcomer of this priority would wait behind: in flight (ours and others') and queued ahead."""
        return self.work_in_flight + self.outside_work + self._work_ahead(priority)

    def _work_ahead(self, priority: float) -> float:
        """Queued work that a newcomer of this priority would wait behind (everyone at or above it)."""
        behind = 0.0
        for waiter in reversed(self.waiting):  # lowest first; usually none is below the newcomer
            if -waiter.sort_key[0] >= priority:
                break
            behind += waiter.cost
        return self.queued_work - behind

    def _queue_full_for(self, priority: float) -> bool:
        """The queue is full and no waiter has a lower stake for this newcomer to displace."""
        return len(self.waiting) >= self.max_queued and not (
            self.waiting and -self.waiting[-1].sort_key[0] < priority)

    def _refusal(self, priority: float, cost: float, deadline: float, now: float) -> str | None:
        """Why a newcomer must be refused now, or None to admit it."""
        if self.in_flight == 0:
            return None  # nothing ahead of it
        if self._queue_full_for(priority):
            return f"{len(self.waiting)} requests are queued (max_queued)"
        rate = self.drain_rate()
        ahead = self._ahead(priority)
        if rate is None:
            return None  # speed unknown (the first requests of a cold router): only the caps refuse
        wait_s = ahead / rate
        if self.cfg.max_wait_s is not None and wait_s > self.cfg.max_wait_s:
            return f"the estimated wait {wait_s:.2f}s exceeds max_wait_s {self.cfg.max_wait_s:g}s"
        finish_s = (ahead + cost) / rate + max(0.0, self.lag_s)
        allowed_s = self.cfg.deadline_share * (deadline - now)
        if finish_s > allowed_s:
            return f"it would finish in ~{finish_s:.2f}s, past its deadline ({deadline - now:.2f}s left)"
        return None

    def snapshot(self) -> dict:
        """For /info."""
        rate, wait = self.drain_rate(), self.estimated_wait_s()
        return {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "work_in_flight": round(self.work_in_flight, 2), "outside_work": round(self.outside_work, 2),
                "in_flight_items": round(self.in_flight_items, 2),
                "queued": len(self.waiting), "queued_work": round(self.queued_work, 2),
                "drain_rate_items_per_s": None if rate is None else round(rate, 1),
                "estimated_wait_s": None if wait is None else round(wait, 3), "lag_s": round(self.lag_s, 3),
                "shed": self.shed_total, "displaced": self.displaced_total}

    def least_deadline_s(self, priority: float) -> float:
        """The shortest deadline (seconds from now) inside which the smallest request of this
        priority would be admitted now: 0 when any would, inf when the caps refuse it whatever its
        deadline. What the edge (serve_app/router/edge.py) sheds on, before the request reaches Python."""
        if self.in_flight == 0:
            return 0.0
        if self._queue_full_for(priority):
            return math.inf
        rate = self.drain_rate()
        if rate is None:
            return 0.0
        wait_s = self._ahead(priority) / rate
        if self.cfg.max_wait_s is not None and wait_s > self.cfg.max_wait_s:
            return math.inf
        return (wait_s + max(0.0, self.lag_s)) / self.cfg.deadline_share

    def would_shed(self, priority: float, deadline: float) -> bool:
        """Would the smallest request of this priority be refused right now? (A cheap pre-check.)"""
        return self._refusal(priority, 0.0, deadline, self.clock()) is not None

    @asynccontextmanager
    async def slot(self, priority: float, deadline: float, cost: float = 1.0):
        """Hold a place at the workload for the body of the `async with`.

        `deadline` is on time.monotonic() (the admission's clock); `cost` in the workload's items. Raises Shed or
        QueueDeadline without holding one.
        """
        admitted_at = self.clock()
        rate = self.drain_rate()
        estimate = None if rate is None else (self._ahead(priority) + cost) / rate
        await self._acquire(priority, deadline, cost)
        done = False
        try:
            yield
            done = True
        finally:
            # Work cut short (its deadline, the caller gone, an error) drained nothing: its busy time
            # counts, its items do not, or a run of cancelled calls would make the workload look fast.
            self._release(cost, done)
            if estimate is not None and done:
                late = (self.clock() - admitted_at) - estimate
                self.lag_s += LAG_SMOOTHING * (late - self.lag_s)

    async def _acquire(self, priority: float, deadline: float, cost: float) -> None:
        now = self.clock()
        reason = self._refusal(priority, cost, deadline, now)
        if reason is not None:
            self.shed_total += 1
            raise Shed(reason)
        if not self.waiting and self._fits(cost):
            self._start(cost, now)
            return
        waiter = _Waiter((-priority, next(self._arrivals)), cost, deadline, asyncio.get_running_loop().create_future())
        position = bisect.bisect(self.waiting, waiter)
        self.waiting.insert(position, waiter)
        self.queued_work += cost
        if len(self.waiting) > self.max_queued:
            self._displace(self.waiting[-1], "displaced from a full queue by a higher-stake validator")
        if position < len(self.waiting) - 1:
            self._displace_late(position, now)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, deadline - self.clock()))
        except asyncio.TimeoutError:
            if waiter.future.done() and not waiter.future.exception():
                return  # granted in the same instant: keep the slot
            self._forget(waiter)
            raise QueueDeadline() from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and not waiter.future.exception():
                self._release(cost)  # granted, then the caller went away: pass the slot on
            self._forget(waiter)
            raise

    def _displace_late(self, position: int, now: float) -> None:
        """Waiters behind a newcomer at `position` that it pushed past their deadlines: shed now."""
        rate = self.drain_rate()
        if rate is None:
            return
        ahead = self.work_in_flight + self.outside_work + sum(w.cost for w in self.waiting[: position + 1])
        for waiter in list(self.waiting[position + 1:]):
            finish_s = (ahead + waiter.cost) / rate
            if finish_s > self.cfg.deadline_share * (waiter.deadline - now):
                self._displace(waiter, "displaced by a higher-stake validator: it could no longer make its deadline")
            else:
                ahead += waiter.cost

    def _displace(self, waiter: _Waiter, reason: str) -> None:
        self._remove(waiter)
        self.displaced_total += 1
        self.shed_total += 1
        if not waiter.future.done():
            waiter.future.set_exception(Shed(reason))

    def _remove(self, waiter: _Waiter) -> None:
        index = bisect.bisect_left(self.waiting, waiter)
        if index < len(self.waiting) and self.waiting[index] is waiter:
            del self.waiting[index]
            self.queued_work -= waiter.cost

    def _forget(self, waiter: _Waiter) -> None:
        self._remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()

    def _fits(self, cost: float) -> bool:
        """Room at the workload for this much more work (always for the first request)."""
        return self.in_flight < self.max_in_flight and (
            self.work_in_flight == 0 or self.work_in_flight + cost <= self.in_flight_items)

    def _start(self, cost: float, now: float) -> None:
        self.in_flight += 1
        self.work_in_flight += cost
        self.rate.busy(now, True)

    def _release(self, cost: float, done: bool = False) -> None:
        now = self.clock()
        self.in_flight -= 1
        self.work_in_flight -= cost
        self.rate.completed(now, cost if done else 0.0, self.scale)
        if self.in_flight == 0:
            self.work_in_flight = 0.0  # no float drift
            self.rate.busy(now, False)
        self._grant()

    def _grant(self) -> None:
        """Free room to the waiters in order."""
        now = self.clock()
        while self.waiting and self._fits(self.waiting[0].cost):
            best = self.waiting.pop(0)
            self.queued_work -= best.cost
            if not best.future.done():
                self._start(best.cost, now)
                best.future.set_result(None)
        if not self.waiting:
            self.queued_work = 0.0
