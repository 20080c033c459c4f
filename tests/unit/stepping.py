"""Driving concurrent code step by step in unit tests: wait for a state, never for a time (a busy
CI machine reorders whatever a few milliseconds of sleep were meant to order)."""

import asyncio


async def until(condition, max_yields: int = 1_000_000, pause_s: float = 0.0) -> None:
    """Yield to the event loop until `condition()` holds; AssertionError if it never does.
    `pause_s`: how long each yield sleeps, where another thread must make progress."""
    for _ in range(max_yields):
        if condition():
            return
        await asyncio.sleep(pause_s)
    raise AssertionError("the awaited state never came")
