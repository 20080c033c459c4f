"""When requests arrive: open loop (they come whether or not the miner keeps up), as a Poisson
process whose rate follows a profile over the run. Seeded: the same seed, the same arrivals.

  steady   the rate all along
  bursty   bursts at BURST x the rate for the last tenth of every period (a minute, or a third
           of a shorter run), a lower rate between: the same mean over whole periods
  diurnal  a day compressed into the run: from a trough at half the rate at the start, up to
           1.5 x in the middle and back (mean: the rate)
"""

from __future__ import annotations

import math
import random

PROFILES = ("steady", "bursty", "diurnal")
BURST = 3.0  # x the mean rate during a burst
BURST_SHARE = 0.1  # of each period
BURST_PERIOD_S = 60.0  # at most; shorter runs get three bursts
DIURNAL_SWING = 0.5  # the rate goes from (1 - swing) to (1 + swing) x the mean


def burst_period_s(seconds: float) -> float:
    return min(BURST_PERIOD_S, seconds / 3)


def rate_at(profile: str, t: float, seconds: float, rate: float) -> float:
    """The arrival rate (requests/s) `t` seconds into a run of `seconds`."""
    if profile == "steady":
        return rate
    if profile == "bursty":
        period = burst_period_s(seconds)
        in_burst = (t % period) >= period * (1 - BURST_SHARE)  # the last tenth: a run starts quiet
        low = rate * (1 - BURST * BURST_SHARE) / (1 - BURST_SHARE)
        return rate * BURST if in_burst else low
    if profile == "diurnal":
        return rate * (1 - DIURNAL_SWING * math.cos(2 * math.pi * t / seconds))
    raise ValueError(f"unknown profile {profile!r}: one of {', '.join(PROFILES)}")


def peak_rate(profile: str, rate: float) -> float:
    rate_at(profile, 0.0, 1.0, rate)  # an unknown profile: its clear error
    return {"steady": rate, "bursty": rate * BURST, "diurnal": rate * (1 + DIURNAL_SWING)}[profile]


def arrival_times(rate: float, seconds: float, profile: str = "steady", seed: int = 0) -> list[float]:
    """Arrival offsets in [0, seconds): a Poisson process of rate `rate_at(profile, t)`, drawn by
    thinning one at the peak rate (Lewis and Shedler)."""
    if not (math.isfinite(rate) and math.isfinite(seconds)) or rate < 0 or seconds < 0:
        raise ValueError(f"arrivals need a finite rate and length, not {rate} req/s for {seconds} s")
    if rate == 0 or seconds == 0:
        return []
    rng = random.Random(seed)
    peak = peak_rate(profile, rate)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= seconds:
            return out
        if rng.random() * peak < rate_at(profile, t, seconds, rate):
            out.append(t)


def pick(rng: random.Random, weights: dict) -> object:
    """A key of `weights`, drawn in proportion to its weight."""
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]
