"""Rollout decisions for one workload's candidate model: shadow, canary steps, promotion,
rollback. Plain logic on a stream of comparisons, no Serve: the router's RolloutRouter
(serve_app/router/rollouts.py) feeds it, through the miner's one RolloutCoordinator actor, so
every router replica sees the same decision.

- shadow: validators are served by stable; a share of requests is also sent to the
  candidate and the answers compared. After `step_s` of traffic and `min_comparisons`, the
  canary begins.
- canary: validators whose hotkey falls under the step's weight (sticky: the same hotkey
  stays on the candidate as the weight grows) are served by the candidate, falling back to
  stable when it fails; mirroring goes on both ways. Each step lasts `step_s` of traffic and
  `min_comparisons`; after the last the candidate is promoted.
- At any stage the candidate is rolled back, once `min_samples` say so, when it disagrees
  (agreement under `min_agreement`), fails more than stable (by `max_error_increase`), or is
  slower on the same requests (p95 over `max_latency_ratio` x stable's + `latency_slack_s`).
  Disagreement and failure also need MIN_BAD bad observations: one transient error is not a
  verdict.

Time counts only while traffic flows: an idle miner neither promotes nor rolls back.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional

from serve_app.config import CanaryConfig

SHADOW, CANARY, PROMOTED, ROLLED_BACK = "shadow", "canary", "promoted", "rolled_back"
STATES = (SHADOW, CANARY, PROMOTED, ROLLED_BACK)
STABLE, CANDIDATE = "stable", "candidate"
# A gap between reports longer than this is idle time: it does not count towards a stage.
TRAFFIC_GAP_S = 2.0
WINDOW = 200  # the comparisons and calls a verdict looks at: the most recent
# A verdict of disagreement or failure needs this many bad observations besides min_samples:
# one transient error (a replica restarting) must not roll a good candidate back.
MIN_BAD = 2
MIN_PAIRS = 20  # paired timings the latency verdict needs


@dataclass(frozen=True)
class Observation:
    """One request as the rollout saw it. A side not called has None for its seconds and failed."""

    stable_s: Optional[float] = None
    stable_failed: Optional[bool] = None
    candidate_s: Optional[float] = None
    candidate_failed: Optional[bool] = None
    agree: Optional[bool] = None  # both sides answered and the workload can compare answers
    measure: Optional[float] = None  # embeddings: the lowest cosine; images: the mean pixel difference

    @property
    def compared(self) -> bool:
        return self.stable_failed is not None and self.candidate_failed is not None


def on_candidate(hotkey: str, share: float, salt: str) -> bool:
    """Sticky assignment: the hotkey's fixed place in [0, 1) for this rollout, under `share`.
    A hotkey on the candidate at one weight stays on it at any larger weight."""
    place = int.from_bytes(hashlib.sha256(f"{salt}:{hotkey}".encode()).digest()[:8], "big") / 2**64
    return place < share


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


class Rollout:
    def __init__(self, workload: str, canary: CanaryConfig, stable_model: str, candidate_model: str):
        self.workload, self.canary = workload, canary
        self.stable_model, self.candidate_model = stable_model, candidate_model
        self.salt = f"{workload}:{candidate_model}"
        self.state, self.step = SHADOW, -1  # step: index into canary.steps while in canary
        self.reason = "shadowing: the candidate's answers are compared, validators are served by stable"
        self.recent: deque[Observation] = deque(maxlen=WINDOW)
        self.comparisons = 0  # all of them, since the rollout began
        self.stage_comparisons = 0
        self.stage_traffic_s = 0.0
        self.traffic_s = 0.0  # since the rollout began: when it decided is read against this
        self.decided_after_s: Optional[float] = None
        self.served = {STABLE: 0, CANDIDATE: 0}  # validator requests each side answered
        self.decided_by = "automatic"  # or "operator"
        self.claimed = False  # a router logged the decision and retired the loser (RolloutBook.claim)
        self._last_report: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.state in (PROMOTED, ROLLED_BACK)

    @property
    def weight(self) -> float:
        """Share of validators the candidate serves now."""
        if self.state == CANARY:
            return self.canary.weight * self.canary.steps[self.step]
        return 1.0 if self.state == PROMOTED else 0.0

    def observe(self, observations: list[Observation], served: dict[str, int], now: float) -> Optional[str]:
        """Take a router's report (at `now`, monotonic seconds); returns the decision it led to, if any."""
        if self.done:
            return None
        for side, count in served.items():
            self.served[side] += count
        if observations or any(served.values()):
            if self._last_report is not None:
                elapsed = min(now - self._last_report, TRAFFIC_GAP_S)
                self.stage_traffic_s += elapsed
                self.traffic_s += elapsed
            self._last_report = now
        for o in observations:
            self.recent.append(o)
            if o.compared:
                self.comparisons += 1
                self.stage_comparisons += 1
        why = self.regression()
        if why is not None:
            return self.roll_back(why)
        if self.stage_traffic_s >= self.canary.step_s and self.stage_comparisons >= self.canary.min_comparisons:
            return self._next_stage()
        return None

    def regression(self) -> Optional[str]:
        """Why the candidate must go, from the recent window; None while it holds up."""
        c, recent = self.canary, list(self.recent)
        judged = [o for o in recent if o.agree is not None]
        if len(judged) >= c.min_samples:
            agreeing = sum(o.agree for o in judged)
            if agreeing / len(judged) < c.min_agreement and len(judged) - agreeing >= MIN_BAD:
                worst = [o.measure for o in judged if not o.agree and o.measure is not None]
                detail = f" (worst {min(worst) if self.workload == 'embeddings' else max(worst):.3f})" if worst else ""
                return f"disagrees: {len(judged) - agreeing} of {len(judged)} answers differ from stable's{detail}"
        calls = [o.candidate_failed for o in recent if o.candidate_failed is not None]
        stable = [o.stable_failed for o in recent if o.stable_failed is not None]
        if len(calls) >= c.min_samples:
            cand_rate = sum(calls) / len(calls)
            stable_rate = sum(stable) / len(stable) if stable else 0.0
            if cand_rate - stable_rate > c.max_error_increase and sum(calls) >= MIN_BAD:
                return (f"fails more: {sum(calls)} of {len(calls)} candidate calls failed ({cand_rate:.0%}) "
                        f"against stable's {stable_rate:.0%}")
        paired = [o for o in recent if o.stable_failed is False and o.candidate_failed is False
                  and o.stable_s is not None and o.candidate_s is not None]
        # A p95 of fewer than MIN_PAIRS is the slowest call or two: one cold start is not slowness.
        if len(paired) >= max(c.min_samples, MIN_PAIRS):
            cand, stable_p95 = p95([o.candidate_s for o in paired]), p95([o.stable_s for o in paired])
            if cand > c.max_latency_ratio * stable_p95 + c.latency_slack_s:
                return (f"slower: p95 {cand * 1000:.0f} ms against stable's {stable_p95 * 1000:.0f} ms "
                        f"over the same {len(paired)} requests")
        return None

    def _next_stage(self) -> str:
        steps = self.canary.steps
        if self.step + 1 >= len(steps):
            return self.promote(f"promoted after {len(steps)} canary steps and {self.comparisons} comparisons")
        self.state, self.step = CANARY, self.step + 1
        self.stage_traffic_s, self.stage_comparisons = 0.0, 0
        self.reason = f"canary step {self.step + 1} of {len(steps)}: the candidate serves {self.weight:.0%} of validators"
        return "canary"

    def promote(self, reason: str) -> str:
        self.state, self.reason, self.decided_after_s = PROMOTED, reason, self.traffic_s
        return PROMOTED

    def roll_back(self, reason: str) -> str:
        self.state, self.reason, self.decided_after_s = ROLLED_BACK, reason, self.traffic_s
        return ROLLED_BACK

    def as_dict(self) -> dict:
        return {"state": self.state, "weight": round(self.weight, 4), "comparisons": self.comparisons,
                "reason": self.reason, "stable_model": self.stable_model, "candidate_model": self.candidate_model,
                "served": dict(self.served), "traffic_s": round(self.traffic_s, 1),
                "decided_after_s": None if self.decided_after_s is None else round(self.decided_after_s, 1),
                "decided_by": self.decided_by if self.done else None, "salt": self.salt}
