"""`torchrank-miner status`: a per-subnet table read from the miner's own metrics, for an
operator without Grafana.

It scrapes Ray's metrics endpoints twice, `interval` seconds apart: requests/s and the
latency percentiles come from the difference (from the totals since start when no
request arrived in between), error budget left from the SLO counters since the
replicas started (Prometheus' 30-day figure is `torchrank:slo_error_budget_remaining:30d`),
queue depth and in-flight from the gauges, and each subnet's standing (the miner's uid,
incentive, TAO a day, pruning position, immunity, axon) from the standing gauges.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

SERVICE_DISCOVERY = Path("/tmp/ray/prom_metrics_service_discovery.json")
STANDING_PREFIX, AXON_MATCHES = "ray_torchrank_own_", "ray_torchrank_axon_matches"
WORST_IS_LOWEST = {"axon_matches", "registered", "pruning_position", "incentive", "tao_per_day"}
QUANTILES = (0.5, 0.95, 0.99)


def ray_metrics_urls(path: Path = SERVICE_DISCOVERY) -> list[str]:
    """Every node's metrics endpoint of the local Ray cluster, from Ray's own discovery file."""
    groups = json.loads(path.read_text())
    return [f"http://{target}/metrics" for group in groups for target in group["targets"]]


@dataclass
class Sample:
    """Only the miner's series, summed over replicas and nodes."""

    requests: dict = field(default_factory=lambda: defaultdict(float))  # (netuid, outcome) -> count
    buckets: dict = field(default_factory=lambda: defaultdict(float))  # (netuid, le) -> count of ok
    slo: dict = field(default_factory=lambda: defaultdict(float))  # (netuid, slo, "requests"|"errors") -> count
    objective: dict = field(default_factory=dict)  # (netuid, slo) -> objective
    in_flight: dict = field(default_factory=lambda: defaultdict(float))  # netuid -> requests
    queued: dict = field(default_factory=lambda: defaultdict(float))  # workload -> items
    replicas: dict = field(default_factory=dict)  # "app/deployment" -> replicas the autoscaler asks for
    standing: dict = field(default_factory=lambda: defaultdict(dict))  # netuid -> {field: value} over replicas
    edge: dict = field(default_factory=lambda: defaultdict(float))  # reason -> refused by HAProxy, all routes
    at: float = 0.0


def parse(texts: Iterable[str], at: float) -> Sample:
    from prometheus_client.parser import text_string_to_metric_families

    s = Sample(at=at)
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                netuid = labels.get("netuid", "-")
                if name == "ray_torchrank_requests_total":
                    s.requests[(netuid, labels["outcome"])] += value
                elif name == "ray_torchrank_edge_refused_total":
                    s.edge[labels.get("reason", "-")] += value
                elif name == "ray_torchrank_request_seconds_bucket" and labels.get("outcome") == "ok":
                    s.buckets[(netuid, float(labels["le"]))] += value
                elif name in ("ray_torchrank_slo_requests_total", "ray_torchrank_slo_errors_total"):
                    kind = "requests" if "requests" in name else "errors"
                    s.slo[(netuid, labels["slo"], kind)] += value
                elif name == "ray_torchrank_slo_objective":
                    s.objective[(netuid, labels["slo"])] = value
                elif name == "ray_torchrank_router_in_flight":
                    s.in_flight[netuid] += value
                elif name == "ray_torchrank_queue_depth":
                    s.queued[labels.get("workload", "-")] += value
                elif name.startswith(STANDING_PREFIX) or name == AXON_MATCHES:
                    key = name.removeprefix(STANDING_PREFIX) if name != AXON_MATCHES else "axon_matches"
                    # Router replicas agree unless one read a newer metagraph: the worst one counts.
                    worst = min if key in WORST_IS_LOWEST else max
                    held = s.standing[netuid].get(key)
                    s.standing[netuid][key] = value if held is None else worst(held, value)
                elif name == "ray_torchrank_autoscaling_desired_replicas":
                    s.replicas[f"{labels.get('application', '-')}/{labels.get('deployment', '-')}"] = value
    # Ray's gauges keep their last value: once deregistered, the rest of the standing is stale.
    for netuid, values in s.standing.items():
        if values.get("registered") == 0:
            s.standing[netuid] = {"registered": 0.0}
    return s


def quantile(q: float, buckets: dict[float, float]) -> float:
    """histogram_quantile over cumulative buckets {le: count}; NaN without data."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    total, rank, prev_le, prev_count = buckets[bounds[-1]], q * buckets[bounds[-1]], 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_count) / (count - prev_count) if count > prev_count else 0)
        prev_le, prev_count = le, count
    return bounds[-1] if total else math.nan


def table(before: Sample, after: Sample) -> list[dict]:
    """One row per subnet: requests/s, ok share, p50/p95/p99 ms, error budget left, in-flight."""
    seconds = max(after.at - before.at, 1e-9)
    netuids = sorted({n for n, _ in after.requests} - {"-"}, key=lambda n: int(n) if n.isdigit() else 0)
    rows = []
    for netuid in netuids:
        delta = {o: after.requests[(n, o)] - before.requests.get((n, o), 0.0)
                 for (n, o) in after.requests if n == netuid}
        total = sum(delta.values())
        window = "interval"
        buckets = {le: after.buckets[(n, le)] - before.buckets.get((n, le), 0.0)
                   for (n, le) in after.buckets if n == netuid}
        if not buckets or max(buckets.values()) <= 0:  # quiet interval: totals since start
            buckets = {le: v for (n, le), v in after.buckets.items() if n == netuid}
            window = "since start"
        row = {"netuid": netuid, "req_per_s": total / seconds,
               "ok_share": delta.get("ok", 0.0) / total if total else math.nan, "latency_window": window}
        for q in QUANTILES:
            row[f"p{round(q * 100)}_ms"] = quantile(q, buckets) * 1000
        for slo in ("availability", "latency"):
            reqs = after.slo.get((netuid, slo, "requests"), 0.0)
            errs = after.slo.get((netuid, slo, "errors"), 0.0)
            objective = after.objective.get((netuid, slo))
            if reqs and objective is not None:
                row[f"{slo}_budget_left"] = 1 - (errs / reqs) / (1 - objective)
            else:
                row[f"{slo}_budget_left"] = math.nan
        row["in_flight"] = after.in_flight.get(netuid, 0.0)
        rows.append(row)
    return rows


def edge_refusals(before: Sample, after: Sample) -> dict[str, dict]:
    """reason -> {"per_s" over the interval, "total" since the routers started}: what HAProxy refused."""
    seconds = max(after.at - before.at, 1e-9)
    return {reason: {"per_s": (total - before.edge.get(reason, 0.0)) / seconds, "total": total}
            for reason, total in sorted(after.edge.items())}


def render(rows: list[dict], sample: Sample, edge: dict | None = None) -> str:
    def cell(value, fmt, scale=1.0, suffix=""):
        return "-" if value is None or math.isnan(value) else format(value * scale, fmt) + suffix

    lines = [f"{'netuid':>6} {'req/s':>8} {'ok':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
             f"{'avail budget':>13} {'latency budget':>15} {'in flight':>9}"]
    for r in rows:
        lines.append(
            f"{r['netuid']:>6} {cell(r['req_per_s'], '.2f'):>8} {cell(r['ok_share'], '.0f', 100, '%'):>6} "
            f"{cell(r['p50_ms'], '.1f'):>8} {cell(r['p95_ms'], '.1f'):>8} {cell(r['p99_ms'], '.1f'):>8} "
            f"{cell(r['availability_budget_left'], '.1f', 100, '%'):>13} "
            f"{cell(r['latency_budget_left'], '.1f', 100, '%'):>15} {cell(r['in_flight'], '.0f'):>9}")
    if not rows:
        lines.append("(no requests seen yet)")
    lines.append("queue depth: " + (", ".join(f"{w} {v:.0f}" for w, v in sorted(sample.queued.items())) or "-"))
    if edge:
        lines.append("refused by HAProxy at the edge (per s, total): "
                     + ", ".join(f"{reason} {v['per_s']:.1f}/s {v['total']:.0f}" for reason, v in edge.items()))
    if sample.replicas:
        lines.append("autoscaled replicas: " + ", ".join(f"{d} {v:.0f}" for d, v in sorted(sample.replicas.items())))
    if sample.standing:
        lines += ["", render_standing(sample.standing)]
    return "\n".join(lines)


def render_standing(standing: dict) -> str:
    def cell(values, key, fmt):
        value = values.get(key)
        return "-" if value is None else format(value, fmt)

    lines = [f"{'netuid':>6} {'uid':>5} {'incentive':>9} {'TAO/day':>9} {'pruning':>7} {'immunity':>8} "
             f"{'free uids':>9}  axon"]
    for netuid in sorted(standing, key=lambda n: int(n) if n.isdigit() else 0):
        v = standing[netuid]
        if v.get("registered") == 0:
            lines.append(f"{netuid:>6}  DEREGISTERED: the miner's hotkey is not in the metagraph")
            continue
        axon = {None: "-", 1.0: "ok"}.get(v.get("axon_matches"), "MISMATCH (torchrank-miner publish)")
        lines.append(f"{netuid:>6} {cell(v, 'uid', '.0f'):>5} {cell(v, 'incentive', '.4f'):>9} "
                     f"{cell(v, 'tao_per_day', '.3f'):>9} {cell(v, 'pruning_position', '.0f'):>7} "
                     f"{cell(v, 'immunity_blocks_left', '.0f'):>8} {cell(v, 'free_uids', '.0f'):>9}  {axon}")
    return "\n".join(lines)


def as_json(rows: list[dict], sample: Sample, edge: dict | None = None) -> str:
    """NaN (no data) becomes null: strict JSON."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    return json.dumps({"subnets": clean, "queue_depth": dict(sample.queued), "autoscaled_replicas": sample.replicas,
                       "standing": sample.standing, "edge_refused": edge or {}})


def collect(urls: list[str], interval_s: float, warn=print) -> tuple[Sample, Sample]:
    """Two reads of every endpoint that answers; an endpoint that does not is skipped with a
    warning (a node going away), and httpx.HTTPError is raised, without warnings, only when
    none answers (the caller says so once)."""
    import httpx

    def scrape() -> Sample:
        at, texts, skipped, last_error = time.monotonic(), [], [], None
        for url in urls:
            try:
                texts.append(httpx.get(url, timeout=5).raise_for_status().text)
            except httpx.HTTPError as exc:
                skipped.append(f"skipping {url}: {exc}")
                last_error = exc
        if not texts:
            raise last_error
        for line in skipped:
            warn(line)
        return parse(texts, at)

    before = scrape()
    time.sleep(interval_s)
    return before, scrape()
