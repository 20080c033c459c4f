"""Merge work that queues behind a busy engine into its next forward pass.

ray 2.60's `@serve.batch` forms the next batch as soon as an item arrives, before the
running batch has finished (the `max_concurrent_batches` semaphore is taken after the
batch is cut; upstream ray PR #64595 moves it). With `batch_wait_timeout_s: 0` a busy
replica therefore queues a chain of one-item batches, nearly one forward pass per text
under concurrent single-text requests (figure: benchmarks/README.md, "Figures moved from
module docstrings").
`CoalescingRunner` restores opportunistic batching below it: one forward pass at a
time on the engine thread, and when the engine frees up, everything that queued
meanwhile (up to `max_items`) goes into the next pass.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable, Optional, Sequence

from serve_app.contracts import DeadlinePassed
from serve_app.inference.thread import EngineThread

# fn(flat items) -> a tuple of arrays (or lists) whose first axis follows the items.
BatchFn = Callable[[list], tuple]


class CoalescingRunner:
    def __init__(self, thread: EngineThread, fn: BatchFn, max_items: int):
        self._thread = thread
        self._fn = fn
        self.max_items = max_items
        self._pending: deque[tuple[list, asyncio.Future, Optional[float]]] = deque()
        self._drainer: asyncio.Task | None = None
        self.passes = 0
        self.items_done = 0
        self.largest_pass = 0
        self.expired = 0
        self.busy_s = 0.0  # seconds the engine spent in passes: utilisation for the degraded preset
        self.items_waited = 0  # items that arrived while the engine was busy: they had to wait

    @property
    def queued_items(self) -> int:
        """Items waiting for a pass (not the one running)."""
        return sum(len(items) for items, _, _ in self._pending)

    @property
    def idle(self) -> bool:
        """Nothing queued and no pass running."""
        return self._drainer is None and not self._pending

    async def run(self, items: Sequence, deadline: Optional[float] = None) -> tuple:
        """The outputs for `items`, computed in one pass with whatever else is queued.

        `deadline` (time.time()): if it passes while the items wait, they are dropped
        and DeadlinePassed is raised: nobody accepts an answer after its deadline.
        """
        future = asyncio.get_running_loop().create_future()
        if self._drainer is not None:
            self.items_waited += len(items)
        self._pending.append((list(items), future, deadline))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return await future

    def _next_pass(self) -> list[tuple[list, asyncio.Future, Optional[float]]]:
        taken, size, now = [], 0, time.time()
        while self._pending:
            items, future, deadline = self._pending[0]
            if future.cancelled():  # the caller went away: skip its work
                self._pending.popleft()
                continue
            if deadline is not None and now >= deadline:
                self._pending.popleft()
                self.expired += 1
                future.set_exception(DeadlinePassed())
                continue
            if taken and size + len(items) > self.max_items:
                break
            taken.append(self._pending.popleft())
            size += len(items)
        return taken

    async def _drain(self) -> None:
        taken: list[tuple[list, asyncio.Future, Optional[float]]] = []
        try:
            while self._pending:
                taken = self._next_pass()
                if not taken:
                    continue
                flat = [item for items, _, _ in taken for item in items]
                started = time.perf_counter()
                try:
                    outputs = await self._thread.run(self._fn, flat)
                except Exception as exc:  # the callers get the error; the runner goes on
                    for _, future, _ in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.busy_s += time.perf_counter() - started
                self.passes += 1
                self.items_done += len(flat)
                self.largest_pass = max(self.largest_pass, len(flat))
                start = 0
                for items, future, _ in taken:
                    if not future.done():
                        future.set_result(tuple(out[start : start + len(items)] for out in outputs))
                    start += len(items)
                taken = []
        except BaseException:
            # Cancelled (replica shutting down): no admitted caller is left waiting forever.
            for _, future, _ in [*taken, *self._pending]:
                if not future.done():
                    future.cancel()
            raise
        finally:
            self._drainer = None
