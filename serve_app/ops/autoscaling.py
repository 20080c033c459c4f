"""Replica autoscaling on latency and queue depth: Serve's `autoscaling_config.policy`.

Each workload replica keeps a `LoadWindow` of its requests and reports, through
`record_autoscaling_stats`, its recent p95 latency and the work waiting for its model
(`p95_latency_s`, `queued`). The Serve controller calls `LatencyQueuePolicy` every
control-loop tick with those reports in an `AutoscalingContext`:

- up when p95 passes the latency threshold (the strictest SLO of the subnets the
  workload serves, times `up_at`) or waiting work per replica passes `target_queued`:
  to the replicas the worse of the two ratios asks for, at most `max_step_up` times as
  many, and not again while replicas it asked for are still starting;
- down, one replica at a time, only after both signals stayed below `down_at` of their
  thresholds (with one replica fewer) for `quiet_period_s`;
- otherwise hold: between the two watermarks nothing moves, so it does not oscillate.

The policy owns the delays (the deployment's Serve `upscale_delay_s`/`downscale_delay_s`
are 0, see `serve_autoscaling_config`), so every decision it logs is the one taken.
Each decision is one JSON line on the controller's log (`ray.serve` logger: the Serve
controller's log in the dashboard) whenever the decision or its reason changes, and again
every `HEARTBEAT_S` while it does not; every evaluation counts in
`torchrank_autoscaling_decisions{decision, reason}`. Replicas report every `REPORT_INTERVAL_S`.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from serve_app.config import ReplicaAutoscaling

log = logging.getLogger("ray.serve.torchrank.autoscaling")  # a child of Serve's logger: the controller's log

P95_KEY = "p95_latency_s"
QUEUED_KEY = "queued"

# Reasons, bounded: they are metric labels.
LATENCY = "latency_over_slo"
QUEUE = "queue_over_target"
STARTING = "replicas_starting"
AT_MAX = "at_max_replicas"
IN_BAND = "in_band"
QUIET = "quiet_period"
QUIET_DONE = "quiet_period_over"
AT_MIN = "at_min_replicas"
NO_REPORTS = "no_reports"
BELOW_MIN = "below_min_replicas"

HEARTBEAT_S = 60.0  # an unchanged decision is logged again this often
REPORT_INTERVAL_S = 1.0  # replicas and handles report their autoscaling metrics this often (metrics_interval_s)


class LoadWindow:
    """A replica's recent request latencies, for `record_autoscaling_stats`.

    p95 is over the requests that finished in the last `window_s`, and never less than
    the age of the oldest request still running: a replica whose requests stall reports
    high latency at once, not only when they finish.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._done: deque[tuple[float, float]] = deque()  # (finished at, seconds)
        self._running: dict[int, float] = {}
        self._ids = itertools.count()

    @contextmanager
    def track(self) -> Iterator[None]:
        """Time one request (failed ones too: a slow failure is still slow)."""
        key, started = next(self._ids), self._clock()
        self._running[key] = started
        try:
            yield
        finally:
            del self._running[key]
            now = self._clock()
            self._done.append((now, now - started))
            self._forget_before(now)  # bounded even where nobody asks for p95 (no autoscaling)

    def _forget_before(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def p95(self) -> float:
        now = self._clock()
        self._forget_before(now)
        latencies = sorted(seconds for _, seconds in self._done)
        finished = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else 0.0
        oldest = now - min(self._running.values()) if self._running else 0.0
        return max(finished, oldest)

    def stats(self, queued: int) -> dict[str, float]:
        """What a replica reports: its p95 and the work (items) waiting for its model."""
        return {P95_KEY: self.p95(), QUEUED_KEY: float(queued)}


def latest(series_by_replica: Optional[dict]) -> dict:
    """{replica: its newest reported value}: the replicas' own windows already smooth them."""
    out = {}
    for replica, series in (series_by_replica or {}).items():
        if series:
            out[replica] = float(max(series, key=lambda point: point.timestamp).value)
    return out


# The policy's tuning fields of ReplicaAutoscaling, in its constructor's order.
TUNING = ("up_at", "down_at", "quiet_period_s", "max_step_up")


class LatencyQueuePolicy:
    """Serve custom autoscaling policy (a class: Serve builds it once with `policy_kwargs`).

    `latency_slo_s`: scale up when the replicas' p95 passes `up_at` × this.
    `target_queued`: scale up when waiting items per replica pass this.
    """

    def __init__(self, latency_slo_s: float, target_queued: float, metrics: bool = True, **tuning):
        # `tuning`: TUNING's fields, with ReplicaAutoscaling's defaults and checks (one place for both).
        if set(tuning) - set(TUNING):
            raise ValueError(f"policy tuning takes only {TUNING}, not {sorted(set(tuning) - set(TUNING))}")
        tuned = ReplicaAutoscaling(**tuning)
        if latency_slo_s <= 0 or target_queued <= 0:
            raise ValueError("need latency_slo_s > 0 and target_queued > 0")
        up_at, down_at, quiet_period_s, max_step_up = (getattr(tuned, name) for name in TUNING)
        self.latency_up_s = latency_slo_s * up_at
        self.target_queued = target_queued
        self.down_at = down_at
        self.quiet_period_s = quiet_period_s
        self.max_step_up = max_step_up
        self._metrics = _DecisionMetrics() if metrics else None
        self._logged: dict[str, tuple[str, str, float]] = {}  # deployment -> (decision, reason, when)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        state = dict(ctx.policy_state or {})
        desired, reason, inputs = self.decide(ctx, state, now)
        self._report(ctx, desired, reason, inputs, now)
        return desired, state

    def decide(self, ctx, state: dict, now: float) -> tuple[int, str, dict]:
        """(replicas wanted, reason, the inputs it saw); updates `state` (the quiet period's start)."""
        running, target = ctx.current_num_replicas, ctx.target_num_replicas
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        reports = ctx.raw_metrics or {}
        p95s, queued = latest(reports.get(P95_KEY)), latest(reports.get(QUEUED_KEY))
        p95 = max(p95s.values(), default=0.0)
        # Waiting work: items inside replicas plus requests Serve holds at handles for lack of a free replica.
        waiting = sum(queued.values()) + (ctx.total_queued_requests or 0.0)
        per_replica = waiting / max(running, 1)
        inputs = {"running": running, "target": target, "p95_s": round(p95, 4), "queued": round(waiting, 2),
                  "queued_per_replica": round(per_replica, 2), "latency_up_s": self.latency_up_s,
                  "target_queued": self.target_queued, "min": lo, "max": hi}
        if target < lo:
            state.pop("quiet_since", None)
            return lo, BELOW_MIN, inputs
        if running == 0 or not p95s:
            state.pop("quiet_since", None)
            return max(target, lo), NO_REPORTS, inputs
        latency_ratio, queue_ratio = p95 / self.latency_up_s, per_replica / self.target_queued
        if latency_ratio > 1 or queue_ratio > 1:
            state.pop("quiet_since", None)
            reason = LATENCY if latency_ratio >= queue_ratio else QUEUE
            if target > running:  # what it asked for last time is not up yet: wait for it
                return target, STARTING, inputs
            if running >= hi:
                return hi, AT_MAX, inputs
            wanted = math.ceil(running * min(self.max_step_up, max(latency_ratio, queue_ratio)))
            return min(hi, max(running + 1, wanted)), reason, inputs
        # Quiet: both signals below the low watermark, the queue even with one replica fewer.
        quiet = (p95 < self.down_at * self.latency_up_s
                 and waiting / max(running - 1, 1) < self.down_at * self.target_queued)
        if not quiet or running <= lo:
            state.pop("quiet_since", None)
            return max(min(target, hi), lo), (AT_MIN if quiet else IN_BAND), inputs
        since = state.setdefault("quiet_since", now)
        inputs["quiet_s"] = round(now - since, 1)
        if now - since < self.quiet_period_s:
            return target, QUIET, inputs
        state["quiet_since"] = now  # the next step down needs a quiet period of its own
        return max(lo, min(target, running) - 1), QUIET_DONE, inputs

    def _report(self, ctx, desired: int, reason: str, inputs: dict, now: float) -> None:
        name = ctx.deployment_name
        decision = "up" if desired > ctx.target_num_replicas else "down" if desired < ctx.target_num_replicas else "hold"
        if self._metrics is not None:
            self._metrics.record(ctx.app_name or "", name, decision, reason, desired, inputs)
        last = self._logged.get(name)
        if last is None or last[:2] != (decision, reason) or now - last[2] >= HEARTBEAT_S:
            self._logged[name] = (decision, reason, now)
            log.info(json.dumps({"event": "autoscaling_decision", "application": ctx.app_name, "deployment": name,
                                 "decision": decision, "replicas": desired, "reason": reason, "inputs": inputs}))


class _DecisionMetrics:
    """The policy's metrics, made on first use in the Serve controller (plain Ray metrics:
    the controller is no replica, so `ray.serve.metrics` would add nothing)."""

    def __init__(self) -> None:
        self._made: Optional[tuple] = None

    def record(self, app: str, deployment: str, decision: str, reason: str, desired: int, inputs: dict) -> None:
        try:
            if self._made is None:
                from ray.util import metrics

                tags = ("application", "deployment")
                self._made = (
                    metrics.Counter("torchrank_autoscaling_decisions", "Autoscaling policy evaluations, by decision "
                                    "and reason.", tag_keys=(*tags, "decision", "reason")),
                    metrics.Gauge("torchrank_autoscaling_desired_replicas", "Replicas the policy asks for.",
                                  tag_keys=tags),
                    metrics.Gauge("torchrank_autoscaling_p95_seconds", "The replicas' recent p95 latency "
                                  "the policy saw.", tag_keys=tags),
                    metrics.Gauge("torchrank_autoscaling_queued_per_replica", "Waiting work per replica the "
                                  "policy saw.", tag_keys=tags),
                )
            decisions, desired_gauge, p95_gauge, queued_gauge = self._made
            tags = {"application": app, "deployment": deployment}
            decisions.inc(1, {**tags, "decision": decision, "reason": reason})
            desired_gauge.set(desired, tags)
            p95_gauge.set(inputs["p95_s"], tags)
            queued_gauge.set(inputs["queued_per_replica"], tags)
        except Exception:  # metrics must never stop the autoscaler
            log.debug("autoscaling metrics unavailable", exc_info=True)


def serve_autoscaling_config(scaling, latency_slo_s: float, target_queued: int) -> dict:
    """Serve's `autoscaling_config` for a workload's `ReplicaAutoscaling`, with this policy."""
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "initial_replicas": scaling.initial_replicas,
        # Replicas and handles report every second, not every 10 s: the policy sees a load step at
        # once. ray 2.60 reads this deprecated field for both; the RAY_SERVE_*_METRIC_PUSH_INTERVAL_S
        # variables its deprecation note names are not read yet.
        "metrics_interval_s": REPORT_INTERVAL_S,
        # The policy keeps its own quiet period and waits for starting replicas.
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {
            "policy_function": f"{__name__}:{LatencyQueuePolicy.__name__}",
            "policy_kwargs": {
                "latency_slo_s": scaling.latency_slo_s or latency_slo_s,
                "target_queued": scaling.target_queued or target_queued,
                **{name: getattr(scaling, name) for name in TUNING},
            },
        },
    }
