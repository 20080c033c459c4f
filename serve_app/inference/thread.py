"""One dedicated thread for all of an engine's torch work.

Each thread that calls into torch gets its own OpenMP thread team, and an idle team
spin-waits. Loading a model on one thread and running it on another leaves two teams
fighting for the cores, and a forward pass from another thread is much slower than one
on the loading thread (benchmarks/README.md, "One thread for all torch work"). So the
engine is built, warmed up and run on the same single thread, which also keeps the
replica's event loop free to queue the next batch.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


class EngineThread:
    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def run_sync(self, fn: Callable[..., T], *args, timeout: Optional[float] = None) -> T:
        """fn(*args) on the thread; concurrent.futures.TimeoutError after `timeout` (it still runs)."""
        return self._pool.submit(fn, *args).result(timeout)

    async def run(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """No more work: what is queued is cancelled; a call running ends on its own (not waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
