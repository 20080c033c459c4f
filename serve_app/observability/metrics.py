"""The miner's Prometheus metrics, exported through Ray's metrics agent.

`ray.serve.metrics` adds deployment, replica and application tags; Ray's exporter adds
the `ray_` prefix, so `torchrank_requests` is scraped as `ray_torchrank_requests_total`.
Labels stay bounded: netuid, route, outcome (an error code or "ok"), caller class
(never a raw hotkey), workload.

SLO accounting happens here too: every admitted request (it passed authentication,
authorisation and validation) counts towards its subnet's availability SLO (failed if
the miner answered 5xx) and, if it succeeded, its latency SLO (failed if slower than the
threshold). The objectives are exported as gauges, so one set of Prometheus rules
serves every subnet (monitoring/rules/torchrank.yml).
"""

from __future__ import annotations

from typing import Optional

from ray.serve import metrics

from serve_app.errors import MINER_FAILURES

# Ray exports a gauge value only for a while after it is set (2 export periods, 2 s at the
# fastest): replicas set their gauges again this often.
GAUGE_PERIOD_S = 1.0

# Seconds: from a fast embedding (5 ms) to a slow diffusion or agent run (60 s).
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]



# Standing fields -> their gauge's help; each is exported as torchrank_own_<field>.
STANDING_GAUGES = {
    "uid": "The miner's uid.",
    "incentive": "Incentive, 0-1: the miner's share of the miners' emission.",
    "trust": "Trust, 0-1.",
    "consensus": "Consensus, 0-1.",
    "rank": "Rank, 0-1.",
    "emission_alpha": "Alpha received at the last epoch.",
    "emission_tao": "TAO value of the alpha received at the last epoch, at the subnet's price.",
    "tao_per_day": "TAO value a day at the last epoch's emission: emission_tao x 7200 / (tempo + 1).",
    "pruning_position": "1 = the first neuron deregistered when a registration needs a slot.",
    "immunity_blocks_left": "Blocks of immunity from deregistration left.",
    "free_uids": "Empty uid slots on the subnet: while there are any, no one is deregistered.",
}


# The tags of RouterMetrics' per-request counters, in the order RouterMetrics.record gives them.
COUNTER_TAGS = {"requests": ("netuid", "route", "workload", "outcome", "caller"), "egress": ("netuid", "route"),
                "tasks": ("netuid", "workload", "result"), "slo_requests": ("netuid", "slo"),
                "slo_errors": ("netuid", "slo")}


class RouterMetrics:
    def __init__(self) -> None:
        self._pending: dict[tuple, float] = {}  # (counter, *tag values) -> added since the last flush
        self.latency = metrics.Histogram(
            "torchrank_request_seconds", "End-to-end time at the router, by subnet, route, workload and outcome.",
            boundaries=LATENCY_BUCKETS, tag_keys=("netuid", "route", "workload", "outcome"))
        self.requests = metrics.Counter(
            "torchrank_requests", "Requests by subnet, route, workload, outcome and caller class.",
            tag_keys=("netuid", "route", "workload", "outcome", "caller"))
        self.in_flight = metrics.Gauge("torchrank_router_in_flight", "Requests inside this router replica.",
                                       tag_keys=("netuid",))
        self.egress = metrics.Counter("torchrank_response_bytes", "Response body bytes sent.",
                                      tag_keys=("netuid", "route"))
        self.tasks = metrics.Counter(
            "torchrank_tasks", "Admitted requests by result: accepted (answered inside the latency SLO), late "
                               "(answered slower), failed (not answered); the economics' acceptance proxy.",
            tag_keys=("netuid", "workload", "result"))
        self.slo_requests = metrics.Counter("torchrank_slo_requests", "Admitted requests, per SLO.",
                                            tag_keys=("netuid", "slo"))
        self.slo_errors = metrics.Counter("torchrank_slo_errors", "Admitted requests that missed the SLO.",
                                          tag_keys=("netuid", "slo"))
        self.slo_objective = metrics.Gauge("torchrank_slo_objective", "Each subnet's objective, 0-1.",
                                           tag_keys=("netuid", "slo"))
        self.slo_latency = metrics.Gauge("torchrank_slo_latency_seconds", "The latency SLO's threshold.",
                                         tag_keys=("netuid",))
        self.metagraph_age = metrics.Gauge("torchrank_metagraph_age_seconds",
                                           "Seconds since this replica's metagraph was read.", tag_keys=("netuid",))
        self.metagraph_block = metrics.Gauge("torchrank_metagraph_block", "Block of the metagraph in use.",
                                             tag_keys=("netuid",))
        self.breaker_state = metrics.Gauge("torchrank_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
                                           tag_keys=("netuid", "workload"))
        self.degraded = metrics.Gauge("torchrank_subnet_degraded", "1 while the subnet's watchdog finds it degraded.",
                                      tag_keys=("netuid",))
        self.edge_refused = metrics.Counter(
            "torchrank_edge_refused", "Requests HAProxy refused at the edge before they reached a router, by subnet, "
                                      "route and reason (the error code it answered; route unmatched: no route).",
            tag_keys=("netuid", "route", "reason"))
        self.admission_queue = metrics.Gauge("torchrank_admission_queued", "Requests waiting for a workload slot.",
                                             tag_keys=("workload",))
        self.build = metrics.Gauge("torchrank_build_info", "1, labelled with what this miner runs.",
                                   tag_keys=("version", "git_sha", "models"))
        # The miner's own standing per subnet, from its metagraph (serve_app/chain/standing.py).
        self.registered = metrics.Gauge("torchrank_own_registered",
                                        "1 while the miner's hotkey is in the subnet's metagraph, 0 once it is not.",
                                        tag_keys=("netuid",))
        self.standing = {name: metrics.Gauge(f"torchrank_own_{name}", help, tag_keys=("netuid",))
                         for name, help in STANDING_GAUGES.items()}
        self.axon_matches = metrics.Gauge(
            "torchrank_axon_matches", "1 while the chain's axon for the miner's hotkey is the configured endpoint "
                                      "(subnets[].endpoint), 0 when it differs or is not served.", tag_keys=("netuid",))

        # Rollouts (serve_app/router/rollouts.py): `digest` is the weights' sha256 prefix of the side's model.
        self.rollout_state = metrics.Gauge(
            "torchrank_rollout_state", "1 for a workload's rollout state (shadow, canary, promoted, rolled_back).",
            tag_keys=("workload", "state", "stable_digest", "candidate_digest"))
        self.rollout_weight = metrics.Gauge("torchrank_rollout_weight", "Share of validators the candidate serves.",
                                            tag_keys=("workload",))
        self.rollout_calls = metrics.Counter(
            "torchrank_rollout_calls", "Calls to each side of a rollout (served or mirrored), by outcome (ok, failed).",
            tag_keys=("workload", "role", "digest", "outcome"))
        self.rollout_seconds = metrics.Histogram(
            "torchrank_rollout_call_seconds", "Time of each side's calls in a rollout.", boundaries=LATENCY_BUCKETS,
            tag_keys=("workload", "role", "digest"))
        self.rollout_comparisons = metrics.Counter(
            "torchrank_rollout_comparisons", "Answers of both sides compared, by result (agree, disagree).",
            tag_keys=("workload", "result"))

    def publish_slos(self, subnets) -> None:
        for subnet in subnets:
            netuid = str(subnet.netuid)
            self.slo_objective.set(subnet.slo.availability_objective, {"netuid": netuid, "slo": "availability"})
            self.slo_objective.set(subnet.slo.latency_objective, {"netuid": netuid, "slo": "latency"})
            self.slo_latency.set(subnet.slo.latency_s, {"netuid": netuid})

    def record(self, netuid: str, route: str, workload: str, outcome: str, caller: str, seconds: float,
               response_bytes: int, admitted: bool, slo_latency_s: Optional[float]) -> None:
        """One request's metrics. The counters are added up here and handed to Ray by `flush`
        (every GAUGE_PERIOD_S): each Ray metric call costs ~30 us, and a request made up to six."""
        self.latency.observe(seconds, {"netuid": netuid, "route": route, "workload": workload, "outcome": outcome})
        add = self._add
        add("requests", 1, netuid, route, workload, outcome, caller)
        if response_bytes:
            add("egress", response_bytes, netuid, route)
        if not admitted:
            return
        on_time = slo_latency_s is None or seconds <= slo_latency_s
        add("tasks", 1, netuid, workload, "failed" if outcome != "ok" else "accepted" if on_time else "late")
        add("slo_requests", 1, netuid, "availability")
        if outcome in MINER_FAILURES:
            add("slo_errors", 1, netuid, "availability")
        if outcome == "ok" and slo_latency_s is not None:
            add("slo_requests", 1, netuid, "latency")
            if seconds > slo_latency_s:
                add("slo_errors", 1, netuid, "latency")

    def _add(self, counter: str, value: float, *tags: str) -> None:
        key = (counter, *tags)
        self._pending[key] = self._pending.get(key, 0) + value

    def flush(self) -> None:
        """The counters added up since the last flush, to Ray (which refuses an increment of 0)."""
        pending, self._pending = self._pending, {}
        for (counter, *values), value in pending.items():
            if value:
                metric = getattr(self, counter)
                metric.inc(value, dict(zip(COUNTER_TAGS[counter], values)))


class WorkloadMetrics:
    """Model time, batch sizes, items and queue depth of one workload replica."""

    def __init__(self, workload: str) -> None:
        self.tags = {"workload": workload}
        self.model_time = metrics.Histogram("torchrank_model_seconds", "Time of one forward pass.",
                                            boundaries=LATENCY_BUCKETS, tag_keys=("workload",))
        self.batch = metrics.Histogram("torchrank_batch_size", "Items per forward pass.",
                                       boundaries=BATCH_BUCKETS, tag_keys=("workload",))
        self.items = metrics.Counter("torchrank_items", "Items processed (texts, tokens, images).",
                                     tag_keys=("workload", "kind"))
        self.queued = metrics.Gauge("torchrank_queue_depth", "Items waiting for the model in this replica.",
                                    tag_keys=("workload",))
        self.in_flight = metrics.Gauge("torchrank_workload_in_flight", "Requests inside this workload replica.",
                                       tag_keys=("workload",))
        self.degraded = metrics.Gauge("torchrank_workload_degraded", "1 while the cheaper preset is on in this replica.",
                                      tag_keys=("workload",))
        self.cache = metrics.Counter("torchrank_result_cache", "Result cache lookups by result (hit, miss).",
                                     tag_keys=("workload", "result"))
        self.cache_bytes = metrics.Gauge("torchrank_result_cache_bytes", "Bytes held by this replica's result cache.",
                                         tag_keys=("workload",))
        self.gpu_util = metrics.Gauge("torchrank_gpu_utilization", "GPU utilisation 0-1 (absent on CPU).",
                                      tag_keys=("workload", "gpu"))
        self.gpu_memory = metrics.Gauge("torchrank_gpu_memory_bytes", "GPU memory allocated by this replica (absent on CPU).",
                                        tag_keys=("workload", "gpu"))

    def record_pass(self, seconds: float, items: int, **counts: int) -> None:
        self.model_time.observe(seconds, self.tags)
        self.batch.observe(items, self.tags)
        for kind, n in counts.items():
            if n:  # Ray's Counter refuses 0
                self.items.inc(n, {**self.tags, "kind": kind})

    def record_cache(self, hits: int, misses: int) -> None:
        if hits:
            self.cache.inc(hits, {**self.tags, "result": "hit"})
        if misses:
            self.cache.inc(misses, {**self.tags, "result": "miss"})

    def record_gpu(self, usage: dict[int, tuple[int, Optional[float]]]) -> None:
        """Set the GPU gauges from gpu_usage(); on CPU there is none, so they stay absent."""
        for index, (allocated, utilization) in usage.items():
            tags = {**self.tags, "gpu": str(index)}
            self.gpu_memory.set(allocated, tags)
            if utilization is not None:
                self.gpu_util.set(utilization, tags)

