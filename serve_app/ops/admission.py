"""Bounded admission to a workload, by stake priority.

At most `max_in_flight` requests of this router replica are at the workload at once; up
to `max_queued` more wait here. When the queue is full, a newcomer with more stake than
the lowest-stake waiter takes that waiter's place (the waiter is shed at once); otherwise
the newcomer is shed. A freed slot goes to the highest-stake waiter, first come first
served among equals. Nobody waits past `max_wait_s` or its own deadline: a refusal in
milliseconds beats an answer after the validator has given up.

With an autoscaled workload the router calls `resize(running replicas / min_replicas)`:
the bounds are set for the smallest size and grow with it, so replicas the autoscaler
adds get work (a fixed cap would hold the load at the router, out of the autoscaler's sight).

The queue is also bounded by what can drain in `max_wait_s` at the rate slots are being
freed: a request that would wait longer than that anyway is refused at once, and
`would_shed` lets the router refuse it before spending CPU on its signature.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from serve_app.config import AdmissionConfig


class Shed(Exception):
    """Refused for load; `reason` says why (queue full, displaced, waited too long)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class QueueDeadline(Exception):
    """The request's own deadline passed while it waited for a slot."""


@dataclass(order=True)
class _Waiter:
    sort_key: tuple  # (-priority, arrival): the smallest goes first
    future: asyncio.Future = field(compare=False)


class Admission:
    def __init__(self, cfg: AdmissionConfig):
        self.cfg = cfg
        self.in_flight = 0
        self.waiting: list[_Waiter] = []
        self._arrivals = itertools.count()
        self.shed_total = 0
        self.displaced_total = 0
        self._releases: deque[float] = deque(maxlen=256)  # when slots were freed: the drain rate
        self.scale = 1.0

    @property
    def max_in_flight(self) -> int:
        return math.ceil(self.cfg.max_in_flight * self.scale)

    @property
    def max_queued(self) -> int:
        return math.ceil(self.cfg.max_queued * self.scale)

    def resize(self, scale: float) -> None:
        """Bounds at `scale` x the configured ones (at least 1 x); more slots go to waiters at once."""
        self.scale = max(1.0, scale)
        self._grant()

    def drain_rate(self) -> float | None:
        """Slots freed per second lately (None until there is enough to tell)."""
        if len(self._releases) < 8:
            return None
        span = self._releases[-1] - self._releases[0]
        if time.monotonic() - self._releases[-1] > 1.0 or span <= 0:
            return None  # idle, or a stale burst: no evidence about the current drain
        return (len(self._releases) - 1) / span

    def queue_bound(self) -> int:
        rate = self.drain_rate()
        if rate is None:
            return self.max_queued
        return min(self.max_queued, max(1, math.floor(rate * self.cfg.max_wait_s)))

    def would_shed(self, priority: float) -> bool:
        """Would a request of this priority be refused right now? (A cheap pre-check.)"""
        if self.in_flight < self.max_in_flight and not self.waiting:
            return False
        if len(self.waiting) < self.queue_bound():
            return False
        return not self.waiting or -max(self.waiting).sort_key[0] >= priority

    @asynccontextmanager
    async def slot(self, priority: float, deadline: float):
        """Hold one of the workload's slots for the body of the `async with`.

        `deadline` is on time.monotonic(). Raises Shed or QueueDeadline without holding one.
        """
        await self._acquire(priority, deadline)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: float, deadline: float) -> None:
        if self.in_flight < self.max_in_flight and not self.waiting:
            self.in_flight += 1
            return
        if self.would_shed(priority):
            self.shed_total += 1
            raise Shed("the workload's queue is full")
        if len(self.waiting) >= self.queue_bound():  # full, and the newcomer outranks the lowest waiter
            lowest = max(self.waiting)
            self.waiting.remove(lowest)
            self.displaced_total += 1
            self.shed_total += 1
            if not lowest.future.done():
                lowest.future.set_exception(Shed("displaced from the queue by a higher-stake validator"))
        waiter = _Waiter((-priority, next(self._arrivals)), asyncio.get_running_loop().create_future())
        self.waiting.append(waiter)
        wait_s = min(self.cfg.max_wait_s, deadline - time.monotonic())
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, wait_s))
        except asyncio.TimeoutError:
            if waiter.future.done() and not waiter.future.exception():
                return  # granted in the same instant: keep the slot
            self._forget(waiter)
            if deadline - time.monotonic() <= 0.001:
                raise QueueDeadline() from None
            self.shed_total += 1
            raise Shed(f"no slot within {self.cfg.max_wait_s:g}s") from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled() and not waiter.future.exception():
                self._release()  # granted, then the caller went away: pass the slot on
            self._forget(waiter)
            raise

    def _forget(self, waiter: _Waiter) -> None:
        if waiter in self.waiting:
            self.waiting.remove(waiter)
        if not waiter.future.done():
            waiter.future.cancel()

    def _release(self) -> None:
        self.in_flight -= 1
        self._releases.append(time.monotonic())
        self._grant()

    def _grant(self) -> None:
        """Free slots to the highest-stake waiters."""
        while self.waiting and self.in_flight < self.max_in_flight:
            best = min(self.waiting)
            self.waiting.remove(best)
            if not best.future.done():
                self.in_flight += 1
                best.future.set_result(None)
