"""Per-hotkey token buckets, refilled in proportion to each validator's stake share.

A validator with share s of the subnet's validator stake gets `max(floor_rps,
s * total_rps)` requests per second, with a burst of `burst_s` seconds of that rate (at
least one request). `overrides` set a hotkey's rate outright; allow-listed hotkeys are
not limited unless overridden. Each router replica keeps its own buckets, so the
configured rates are divided among the replicas (traffic is spread evenly across them).
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

from serve_app.chain.metagraph import MetagraphView
from serve_app.config import RateLimitConfig

IDLE_BUCKET_S = 600.0  # buckets untouched this long are dropped: memory stays bounded


class RateLimiter:
    def __init__(self, cfg: RateLimitConfig, replicas: int = 1, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.replicas = max(1, replicas)
        self.clock = clock
        self.buckets: dict[str, list[float]] = {}  # hotkey -> [tokens, last refill]
        self._stake_total: tuple[tuple, float] = ((), 0.0)  # (which metagraph, its validator stake)
        self._last_sweep = clock()

    def rate(self, hotkey: str, view: Optional[MetagraphView], allow_listed: bool) -> Optional[float]:
        """This replica's requests per second for the hotkey; None means unlimited."""
        if hotkey in self.cfg.overrides:
            return self.cfg.overrides[hotkey] / self.replicas
        if allow_listed:
            return None
        neuron = view.neuron(hotkey) if view is not None else None
        stake = neuron.stake if neuron is not None else 0.0
        total = self._validator_stake(view)
        share = stake / total if total > 0 else 0.0
        return max(self.cfg.floor_rps, share * self.cfg.total_rps) / self.replicas

    def _validator_stake(self, view: Optional[MetagraphView]) -> float:
        if view is None:
            return 0.0
        key = (view.block, view.fetched_at)
        if self._stake_total[0] != key:  # a new metagraph: sum once, not per request
            total = sum(n.stake for n in view.neurons.values() if n.validator_permit)
            self._stake_total = (key, total)
        return self._stake_total[1]

    def check(self, hotkey: str, view: Optional[MetagraphView], allow_listed: bool = False) -> Optional[float]:
        """Take a token: None if allowed, else the seconds until one is available."""
        rate = self.rate(hotkey, view, allow_listed)
        if rate is None:
            return None
        if rate <= 0:
            return math.inf
        now = self.clock()
        self._sweep(now)
        capacity = max(1.0, rate * self.cfg.burst_s)
        bucket = self.buckets.get(hotkey)
        if bucket is None:
            bucket = self.buckets[hotkey] = [capacity, now]
        bucket[0] = min(capacity, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return None
        return (1.0 - bucket[0]) / rate

    def _sweep(self, now: float) -> None:
        if now - self._last_sweep < IDLE_BUCKET_S:
            return
        self._last_sweep = now
        for hotkey in [h for h, (_, last) in self.buckets.items() if now - last > IDLE_BUCKET_S]:
            del self.buckets[hotkey]
