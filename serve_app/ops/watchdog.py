"""Is a subnet healthy? A rolling window of its admitted requests plus its metagraph age.

The router feeds every admitted request in; `verdict()` names what is wrong: a stale
metagraph, p95 over the SLO, or too many failures. The window is bounded by time and
by count, so memory stays flat under any load.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional

from serve_app.config import SubnetConfig

MAX_SAMPLES = 10_000


class SubnetWatchdog:
    def __init__(self, subnet: SubnetConfig, clock: Callable[[], float] = time.monotonic):
        self.subnet = subnet
        self.cfg = subnet.watchdog
        self.clock = clock
        self.samples: deque[tuple[float, float, bool]] = deque(maxlen=MAX_SAMPLES)  # (time, seconds, failed)
        self.reasons: list[str] = []

    def observe(self, seconds: float, failed: bool) -> None:
        self.samples.append((self.clock(), seconds, failed))

    def verdict(self, metagraph_age_s: Optional[float]) -> list[str]:
        """Reasons this subnet is degraded now (empty when healthy)."""
        now = self.clock()
        while self.samples and now - self.samples[0][0] > self.cfg.window_s:
            self.samples.popleft()
        reasons = []
        if metagraph_age_s is None:
            reasons.append("no metagraph loaded")
        elif metagraph_age_s > self.cfg.max_metagraph_age_s:
            reasons.append(f"metagraph is {metagraph_age_s:.0f}s old (limit {self.cfg.max_metagraph_age_s:g}s)")
        if len(self.samples) >= self.cfg.min_requests:
            ok = sorted(s for _, s, failed in self.samples if not failed)
            if ok:
                p95 = ok[min(len(ok) - 1, int(0.95 * len(ok)))]
                if p95 > self.subnet.slo.latency_s:
                    reasons.append(f"p95 {p95 * 1000:.0f} ms over the {self.subnet.slo.latency_s:g}s SLO")
            failures = sum(1 for _, _, failed in self.samples if failed)
            if failures / len(self.samples) > self.cfg.max_error_rate:
                reasons.append(f"{failures} of {len(self.samples)} requests failed in {self.cfg.window_s:g}s")
        self.reasons = reasons
        return reasons
