"""The agents' model steps in one running batch: continuous batching over the engine's `decode`.

A session's step is queued here; the drain loop, one engine call at a time on the engine
thread, hands the engine the steps that queued (joins), the keys of those whose callers
went away or whose deadline passed (cancels), and lets it decode a few tokens; whatever
finished comes back and its caller goes on to its tool while the rest keep decoding.

`mode`: "continuous" lets a step join the running batch at any call; "static" only when
the batch is empty (every step of a batch waits for the longest: what the engine did
before, kept to compare with in benchmarks/agents.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from typing import Callable, Optional

from serve_app.contracts import DeadlinePassed, Generation, StepRequest
from serve_app.inference.thread import EngineThread

# decode(joins, cancels, max_iterations) -> {"finished": [(key, Generation)], "tokens": int, "passes": int}
DecodeFn = Callable[[list, list, int], dict]
MODES = ("continuous", "static")


class ContinuousRunner:
    def __init__(self, thread: EngineThread, decode: DecodeFn, max_rows: int, mode: str = "continuous",
                 iterations: int = 8):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self._thread, self._decode, self.max_rows, self.mode = thread, decode, max_rows, mode
        self.iterations = iterations  # tokens per engine call at most: how soon a join or a cancel lands
        self._keys = itertools.count()
        self._pending: deque[tuple[StepRequest, asyncio.Future, Optional[float]]] = deque()
        self._active: dict[int, tuple[asyncio.Future, Optional[float]]] = {}
        self._drainer: asyncio.Task | None = None
        self.passes = 0  # engine calls
        self.forward_passes = 0
        self.tokens = 0
        self.largest_pass = 0  # the most rows decoding together
        self.expired = 0
        self.busy_s = 0.0

    @property
    def queued_items(self) -> int:
        """Steps waiting to join the batch (not those decoding)."""
        return len(self._pending)

    @property
    def running(self) -> int:
        return len(self._active)

    @property
    def idle(self) -> bool:
        return self._drainer is None and not self._pending and not self._active

    async def run(self, messages: list[dict], grammar: Optional[str] = None, max_new_tokens: Optional[int] = None,
                  deadline: Optional[float] = None) -> Generation:
        """The next message of `messages`; DeadlinePassed if `deadline` (time.time()) passes first."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((StepRequest(next(self._keys), messages, grammar, max_new_tokens), future, deadline))
        if self._drainer is None:
            self._drainer = asyncio.create_task(self._drain())
        return await future

    def _cancels(self, now: float) -> list[int]:
        gone = []
        for key, (future, deadline) in list(self._active.items()):
            expired = deadline is not None and now >= deadline
            if future.done() or expired:
                del self._active[key]
                gone.append(key)
                if expired and not future.done():
                    self.expired += 1
                    future.set_exception(DeadlinePassed())
        return gone

    def _joins(self, now: float) -> list[StepRequest]:
        joins = []
        if self.mode == "static" and self._active:
            return joins
        while self._pending and len(self._active) < self.max_rows:  # the joined are in _active
            step, future, deadline = self._pending.popleft()
            if future.done():  # the caller went away while it waited
                continue
            if deadline is not None and now >= deadline:
                self.expired += 1
                future.set_exception(DeadlinePassed())
                continue
            self._active[step.key] = (future, deadline)
            joins.append(step)
        return joins

    async def _drain(self) -> None:
        try:
            while self._pending or self._active:
                now = time.time()
                cancels = self._cancels(now)
                joins = self._joins(now)
                if not joins and not self._active and not cancels:
                    continue
                started = time.perf_counter()
                try:
                    out = await self._thread.run(self._decode, joins, cancels, self.iterations)
                except Exception as exc:  # the engine drops its batch on an error: fail every step in it
                    for future, _ in self._active.values():
                        if not future.done():
                            future.set_exception(exc)
                    self._active.clear()
                    continue
                self.busy_s += time.perf_counter() - started
                self.passes += 1
                self.forward_passes += out["passes"]
                self.tokens += out["tokens"]
                self.largest_pass = max(self.largest_pass, len(self._active))
                for key, generation in out["finished"]:
                    future, _ = self._active.pop(key, (None, None))
                    if future is not None and not future.done():
                        future.set_result(generation)
        except BaseException:
            # Cancelled (replica shutting down): no admitted caller is left waiting forever.
            for future in [f for f, _ in self._active.values()] + [f for _, f, _ in self._pending]:
                if not future.done():
                    future.cancel()
            raise
        finally:
            self._drainer = None
