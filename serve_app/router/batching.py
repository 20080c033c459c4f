"""One remote call for many concurrent requests: the router's calls to the replay store
and to the Embeddings workload.

Every call costs both ends a fixed CPU price (serialisation, gRPC, the event loop), about
what a small forward pass costs per text (benchmarks/README.md, "Where the CPU goes"). `CallBatcher` sends an item at once when
fewer than `max_concurrent` calls are out; otherwise it waits, and the items that queued
meanwhile leave together in the next call as soon as one comes back. No timer: it waits
only while a call is known to be coming back, so a lone request never waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable

# send(items) -> one result per item, in order; a result may be an exception (that item failed).
Send = Callable[[list], Awaitable[list]]


class CallBatcher:
    def __init__(self, send: Send, max_concurrent: int = 2, max_items: int = 64):
        self._send_fn = send
        self.max_concurrent = max_concurrent
        self.max_items = max_items
        self._pending: deque[tuple[Any, int, asyncio.Future]] = deque()
        self._sending = 0
        self.calls = 0
        self.items = 0

    async def submit(self, item, size: int = 1):
        """The result for `item` (`size`: its weight against max_items). A caller that
        stops waiting (cancelled, timed out) takes nothing from the others' call."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((item, size, future))
        self._kick()
        return await future

    def _kick(self) -> None:
        while self._pending and self._sending < self.max_concurrent:
            batch, size = [], 0
            while self._pending:
                item, weight, future = self._pending[0]
                if future.done():  # its caller went away before the call left
                    self._pending.popleft()
                    continue
                if batch and size + weight > self.max_items:
                    break
                batch.append(self._pending.popleft())
                size += weight
            if not batch:
                return
            self._sending += 1
            asyncio.get_running_loop().create_task(self._send(batch))

    async def _send(self, batch: list[tuple[Any, int, asyncio.Future]]) -> None:
        self.calls += 1
        self.items += len(batch)
        try:
            results = await self._send_fn([item for item, _, _ in batch])
            for (_, _, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        except BaseException as exc:  # the whole call failed: every item in it did
            for _, _, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self._sending -= 1
            self._kick()
