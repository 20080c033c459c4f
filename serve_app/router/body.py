"""Reading request bodies: under a size cap (refused early where the size is declared), at a
minimum rate, on a budget of their own."""

from __future__ import annotations

import asyncio
import time

from ray.exceptions import RayActorError, TaskCancelledError
from starlette.requests import ClientDisconnect, Request

from serve_app.errors import ApiError, ErrorCode, shed, unavailable

# A body timeout whose timer fired later than this: the router's lag, not the client's slowness.
LOOP_LAG_S = 0.5
# "1" when HAProxy held the whole body before passing the request on (deployments/haproxy/edge.cfg,
# `option http-buffer-request`): such a body is never slow, however late a busy router reads it.
BODY_WHOLE_HEADER = "x-torchrank-body-whole"


def check_content_type(value: str | None) -> None:
    """JSON or unstated; anything else (a form, plain text) is refused with 415."""
    if value is None:
        return
    media = value.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise ApiError(ErrorCode.unsupported_media_type, f"the body must be application/json, not {media[:80] or 'empty'}")


def too_large(limit: int) -> ApiError:
    return ApiError(ErrorCode.body_too_large, f"request body is over the {limit}-byte limit")


class BodyReads:
    """Bodies being read: the work of callers not yet authenticated, on a budget of its own.

    After its first bytes, a body must keep arriving at `min_bytes_per_s` (after `grace_s`),
    and all of it within `timeout_s` (408 otherwise), so a client trickling bytes holds a slot
    briefly. When `limit` bodies are being read, a newcomer cuts the read furthest behind that
    rate (408): a flood of slow bodies then only displaces itself, while a validator's body,
    which arrives at the speed of its link, is never the furthest behind.

    The rate is timed from the first bytes the router reads, not from the request's start: a
    router lagging behind its event loop under overload reads a body that came whole (HAProxy
    buffers small ones) late, and must not take its own lag for a slow client.
    """

    def __init__(self, limit: int, max_bytes: int, timeout_s: float, grace_s: float, min_bytes_per_s: float):
        self.limit, self.max_bytes, self.timeout_s = limit, max_bytes, timeout_s
        self.grace_s, self.min_bytes_per_s = grace_s, min_bytes_per_s
        self.reading: dict[asyncio.Task, list] = {}  # -> [started, bytes received, bytes declared or None]
        self._cut: set[asyncio.Task] = set()
        self.cut_total = 0

    async def read(self, request: Request) -> bytes:
        """The body; ApiError 413 over `max_bytes`, 408 if too slow or cut, 400 on a bad length."""
        _check_declared_length(request, self.max_bytes)  # refused before it may cut anyone
        if len(self.reading) >= self.limit and not self._cut_the_slowest():
            # Every read is keeping pace (bodies HAProxy buffered whole, read by a busy router): none
            # is a slow client's to cut, so the newcomer waits for another time.
            raise shed("the miner is reading as many request bodies as it can", retry_after_s=1)
        declared = request.headers.get("content-length")
        whole = request.headers.get(BODY_WHOLE_HEADER) == "1"
        progress = [time.monotonic(), 0.0, int(declared) if declared is not None else None, whole]
        reader = asyncio.ensure_future(self._read(request, progress))
        self.reading[reader] = progress
        try:
            return await asyncio.wait_for(reader, self.timeout_s)
        except asyncio.TimeoutError:
            if time.monotonic() - progress[0] - self.timeout_s > LOOP_LAG_S:
                # The timer itself ran late: the router is behind its event loop (overload), and the
                # body may have been waiting for it rather than it for the body. Not the client's fault.
                raise shed("the miner is overloaded and fell behind reading this request", retry_after_s=1) from None
            raise ApiError(ErrorCode.body_timeout, f"the request body did not arrive within {self.timeout_s:g}s") from None
        except asyncio.CancelledError:
            if reader in self._cut:
                raise ApiError(ErrorCode.body_timeout, "the request body was arriving slower than the others when the "
                                                    "miner needed the room for newer requests") from None
            raise
        finally:
            self.reading.pop(reader, None)
            self._cut.discard(reader)

    def _cut_the_slowest(self) -> bool:
        """Cancel the read furthest behind the minimum rate (time taken minus time its bytes allow)
        among those still waiting for bytes; False when every body has arrived whole (read in full,
        or held whole by HAProxy and not yet read by a router behind its event loop): a fast client
        is never cut for the router's own lag (under overload it was: 87 x 408 in a 10 s run)."""
        now = time.monotonic()

        def behind(reader) -> float:
            started, received = self.reading[reader][:2]
            return (now - started) - received / self.min_bytes_per_s

        waiting = [r for r, (_, received, declared, whole) in self.reading.items()
                   if not whole and (declared is None or received < declared)]
        if not waiting:
            return False
        slowest = max(waiting, key=behind)
        del self.reading[slowest]
        self._cut.add(slowest)
        self.cut_total += 1
        slowest.cancel()
        return True

    async def _read(self, request: Request, progress: list[float]) -> bytes:
        first: float | None = None  # when the first bytes were read, and how many
        chunks, size, first_size = [], 0, 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                progress[1] = size
                if size > self.max_bytes:
                    raise too_large(self.max_bytes)
                chunks.append(chunk)
                if first is None:
                    first, first_size = time.monotonic(), size
                elif time.monotonic() - first > self.grace_s + (size - first_size) / self.min_bytes_per_s:
                    raise ApiError(ErrorCode.body_timeout, f"the request body is arriving slower than "
                                                        f"{self.min_bytes_per_s:g} bytes/s")
        except (ClientDisconnect, TaskCancelledError):
            # TaskCancelledError: a body relayed by Serve's proxy, which cancelled the relay (its
            # client went away): the caller's doing, not a miner failure (it was a 500).
            raise ApiError(ErrorCode.client_disconnected, "the client went away before the body was complete") from None
        except RayActorError:
            # The Serve proxy relaying the body died mid-body (it was a 500 under overload).
            raise unavailable("the proxy relaying this request went away before its body was complete; send it "
                              "again", retry_after_s=1) from None
        return b"".join(chunks)


def _check_declared_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.isdigit():
        raise ApiError(ErrorCode.bad_request, "Content-Length is not a whole number")
    if int(declared) > limit:
        raise too_large(limit)  # before reading a byte of it
