"""A circuit breaker per (subnet, workload): stop sending work to a workload that keeps failing.

closed    -> every call goes through; failures are counted.
open      -> calls fail fast (503 with Retry-After) for `open_s`; the workload gets room to recover.
half_open -> up to `half_open_probes` calls go through as probes; a success closes the
             breaker, a failure opens it again.
It opens after `consecutive_failures` failures in a row, or when the failure rate over the
last `window_s` is above `failure_rate` with at least `min_calls` calls in that window.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from serve_app.config import BreakerConfig

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}  # the metric's encoding


class CircuitBreaker:
    def __init__(self, cfg: BreakerConfig, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self._state = CLOSED
        self.opened_at = 0.0
        self.consecutive = 0
        self.probes = 0
        self.calls: deque[tuple[float, bool]] = deque()  # (time, failed) within the window
        self.failures = 0  # of them, failed
        self.times_opened = 0
        self.reason = ""

    @property
    def state(self) -> str:
        if self._state == OPEN and self.clock() - self.opened_at >= self.cfg.open_s:
            self._state, self.probes = HALF_OPEN, 0
        return self._state

    def retry_after_s(self) -> float:
        return max(0.0, self.cfg.open_s - (self.clock() - self.opened_at)) if self.state == OPEN else 0.0

    def allow(self) -> bool:
        """May a call go through now? In half-open, each True is a probe that must be reported."""
        state = self.state
        if state == CLOSED:
            return True
        if state == HALF_OPEN and self.probes < self.cfg.half_open_probes:
            self.probes += 1
            return True
        return False

    def abandon(self) -> None:
        """A call let through ended with no verdict (the caller left): free its probe."""
        if self._state == HALF_OPEN:
            self.probes = max(0, self.probes - 1)

    def record(self, failed: bool) -> None:
        now = self.clock()
        state = self.state
        if state == HALF_OPEN:
            self.probes = max(0, self.probes - 1)
            if failed:
                self._open(now, "a half-open probe failed")
            else:
                self._close()
            return
        if state == OPEN:
            return  # a call admitted before the breaker opened: its result changes nothing
        self.calls.append((now, failed))
        self.failures += failed
        while self.calls and now - self.calls[0][0] > self.cfg.window_s:
            self.failures -= self.calls.popleft()[1]
        self.consecutive = self.consecutive + 1 if failed else 0
        if self.consecutive >= self.cfg.consecutive_failures:
            self._open(now, f"{self.consecutive} failures in a row")
            return
        # A running count: the window holds every call of the last window_s (thousands at full load).
        failures = self.failures
        if len(self.calls) >= self.cfg.min_calls and failures / len(self.calls) > self.cfg.failure_rate:
            self._open(now, f"{failures} of the last {len(self.calls)} calls failed")

    def _open(self, now: float, reason: str) -> None:
        self._state, self.opened_at, self.reason = OPEN, now, reason
        self.times_opened += 1
        self.calls.clear()
        self.failures = 0
        self.consecutive = 0

    def _close(self) -> None:
        self._state, self.reason = CLOSED, ""
        self.calls.clear()
        self.failures = 0
        self.consecutive = 0

    def snapshot(self) -> dict:
        state = self.state
        return {"state": state, "reason": self.reason or None, "times_opened": self.times_opened,
                "retry_after_s": round(self.retry_after_s(), 2) if state == OPEN else None}
