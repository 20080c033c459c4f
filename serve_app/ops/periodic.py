"""The one way a replica runs work in the background: `every(period, fn, what)`.

Gauges, readiness probes and log flushes all run this way. An exception is logged and the
loop goes on: the staleness and GPU-idle alerts depend on these loops, so they must never
die silently."""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Callable, Union

log = logging.getLogger("ray.serve.torchrank")

Period = Union[float, Callable[[], float]]


async def every(period_s: Period, fn: Callable[[], object], what: str, wait_first: bool = False) -> None:
    """Call `fn` (plain or async) now (after one period with `wait_first`) and then every `period_s`
    seconds (a number, or a function giving the next wait) until cancelled. A failed call is
    logged as "`what` failed"."""
    if wait_first:
        await asyncio.sleep(period_s() if callable(period_s) else period_s)
    while True:
        try:
            result = fn()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(period_s() if callable(period_s) else period_s)
