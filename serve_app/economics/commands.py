"""What `torchrank-miner economics`, `ledger` and `report` print, from the ledger file: tables
for a terminal, and the JSON forms."""

from __future__ import annotations

import re
import time
from typing import Optional

from serve_app.config import MinerConfig
from serve_app.economics.ledger import MINUTES_KEPT_DAYS, Ledger, verdict
from serve_app.economics.money import HOURS_PER_MONTH, ROUTER, cost_per_hour, subnet_workloads

WINDOW = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PICK_WINDOW_S = 7 * 86400  # live throughput: the busiest minute of the last week


def window_seconds(text: str) -> float:
    """'24h' -> 86400.0; ValueError naming the forms it takes (up to the 35 days of minutes kept)."""
    match = WINDOW.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"window {text!r}: give a number and a unit, e.g. 1h, 24h, 7d, 30d")
    seconds = float(match.group(1)) * UNIT_S[match.group(2)]
    if seconds > MINUTES_KEPT_DAYS * 86400:
        raise ValueError(f"window {text!r}: at most {MINUTES_KEPT_DAYS}d (the ledger keeps its minutes that long; "
                         f"`ledger` shows every day kept)")
    return seconds


def money(value: Optional[float], currency: Optional[str], digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f} {currency}"


def economics_text(figs: dict[int, dict], window: str) -> str:
    lines = []
    for netuid, f in figs.items():
        cur = f["currency"]
        acceptance = "-" if f["acceptance_rate"] is None else f"{f['acceptance_rate']:.2%}"
        lines.append(f"subnet {netuid} over the last {window}:")
        lines.append(f"  tasks     {f['tasks']:>10}   answered {f['answered']}, accepted {f['accepted']} "
                     f"(acceptance {acceptance}), late {f['late']}, failed {f['failed']}, refused "
                     f"{sum(f['refused'].values()) - f['failed']} before admission, "
                     f"{f['retry_refusals']} told to retry")
        lines.append(f"  revenue   {money(f['revenue'], cur):>14}")
        lines.append(f"  cost      {money(f['cost'], cur):>14}")
        lines.append(f"  profit    {money(f['profit'], cur):>14}")
        lines.append(f"  unit_cost {money(f['unit_cost'], cur, 6):>14}   per 1,000 tasks "
                     f"{money(f['cost_per_1k_tasks'], cur, 4)}")
        held = ", ".join(f"{w} {h['cpu']:.3f} CPU-h {h['gpu']:.3f} GPU-h ({h['share']:.0%})"
                         for w, h in f["resource_hours"].items()) or "none recorded"
        lines.append(f"  held      {held}")
        if cur is None:
            lines.append("  (no economics: block in the serve config: counts only, no money)")
            continue
        i = f["inputs"]
        reward = ("chain emission: " + ("-" if i["chain_tao"] is None else f"{i['chain_tao']:.6f} TAO")
                  if f["reward_source"] == "chain" else f"{money(f['reward_per_task'], cur, 6)} per accepted task")
        lines.append(f"  inputs    reward {reward}; TAO at {i['tao_price']:g} {cur}; ops {money(i['ops'], cur, 4)}; "
                     f"egress {f['egress_gb']:.4f} GB = {money(i['egress'], cur, 4)}")
    return "\n".join(lines)


def ledger_json(cfg: MinerConfig, ledger: Ledger, last: Optional[int]) -> dict:
    days = ledger.days(cfg, last=None)
    return {"subnets": {str(netuid): {"days": rows if last is None else rows[-last:],
                                      "verdict": verdict(rows, cfg.ledger.verdict),
                                      "simulations": ledger.simulations(netuid)}
                        for netuid, rows in days.items()}}


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2%}"


def ledger_text(data: dict, currency: Optional[str]) -> str:
    lines = []
    for netuid, sub in data["subnets"].items():
        v = sub["verdict"]
        lines.append(f"subnet {netuid}: {v['verdict'].upper()} ({v['rule']})")
        lines += [f"  - {r}" for r in v["reasons"]]
        lines.append(f"  {'day':<12} {'requests':>8} {'avail':>8} {'latency':>8} {'p95 ms':>8} {'uptime':>8} "
                     f"{'SLOs':>5} {'profit':>12}  served by")
        for d in sub["days"]:
            p95 = "-" if d["p95_s"] is None else f"{d['p95_s'] * 1000:.1f}"
            met = "met" if d["slo_met"] else "MISS"
            served = ", ".join(d["versions"]) or "-"
            lines.append(f"  {d['label'] + ('*' if d['partial'] else ''):<12} {d['requests']:>8} "
                         f"{pct(d['availability']):>8} {pct(d['latency_attainment']):>8} {p95:>8} "
                         f"{pct(d['uptime']):>8} {met:>5} {money(d['profit'], currency):>12}  {served}")
        for sim in sub.get("simulations", []):
            lines.append(f"  simulated {time.strftime('%Y-%m-%d %H:%M', time.localtime(sim['at']))}: "
                         f"{sim['validators']} validators, {sim['rate']:g} req/s {sim['profile']} for "
                         f"{sim['seconds']:g} s, score {sim['score']:.3f}, "
                         f"{'holds' if sim['holds'] else 'would lose score'}"
                         + (f" (first limit: {sim['first_limit']})" if sim.get("first_limit") else ""))
    lines.append("(* today, so far: not judged)")
    return "\n".join(lines)


def busiest_per_hour(ledger: Ledger, cfg: MinerConfig) -> dict[str, float]:
    """workload -> answered tasks an hour in the busiest ledger minute of the last week: a floor of
    what this hardware answers (it answered that much)."""
    now = ledger.clock.now()
    low = ledger.clock.bucket(now - PICK_WINDOW_S / ledger.clock.scale)
    out: dict[str, float] = {}
    for workload, answered in ledger.db.execute(
            "SELECT workload, MAX(s) FROM (SELECT bucket, workload, SUM(answered) AS s FROM usage WHERE scale='m' "
            "AND bucket>=? GROUP BY bucket, workload) GROUP BY workload", (low,)):
        out[workload] = answered * 60.0
    return out


def placement_cost_per_hour(cfg: MinerConfig, workload: str) -> float:
    """What the workload's configured replicas hold, an hour (at min_replicas when autoscaled)."""
    wl = getattr(cfg.workloads, workload)
    scaling = wl.placement.autoscaling
    replicas = scaling.min_replicas if scaling else wl.placement.num_replicas
    return cost_per_hour(cfg.economics, workload, replicas * wl.placement.num_cpus, replicas * wl.placement.num_gpus)


def pick(cfg: MinerConfig, ledger: Optional[Ledger], throughput: dict[str, float], window_s: float) -> dict:
    """Served and candidate subnets ranked by expected profit an hour on this hardware, and what
    would change the ranking. Tasks an hour: a served subnet's own demand over the window, a
    candidate's declared one, never more than the workload answers (`throughput`, tasks/s, else the
    live busiest minute). Cost an hour: the workload's configured replicas, the router's, and a
    subnet's share of ops."""
    econ = cfg.economics
    live = busiest_per_hour(ledger, cfg) if ledger is not None else {}
    capacity = {w: (throughput[w] * 3600, "--throughput") if w in throughput else (live[w], "busiest minute")
                for w in set(throughput) | set(live)}
    figs = ledger.window(cfg, window_s) if ledger is not None else {}
    # Each row as if it ran alone on this hardware: the router's cost, and a subnet's share of ops.
    fixed = (econ.ops_per_month / HOURS_PER_MONTH / len(cfg.subnets)
             + cost_per_hour(econ, ROUTER, cfg.router.num_replicas * cfg.router.num_cpus, 0.0))
    rows = []

    def row(netuid, name, demands: dict, reward_source, per_task, tao_per_day, acceptance, served):
        """`demands`: workload -> tasks an hour its validators send it (None: unknown)."""
        tasks, capacities, sources = 0.0, 0.0, set()
        for workload, demand in demands.items():
            cap, cap_from = capacity.get(workload, (None, None))
            sources.add(cap_from or "unknown")
            capacities = None if cap is None or capacities is None else capacities + cap
            answered = demand if cap is None else cap if demand is None else min(demand, cap)
            tasks = None if answered is None or tasks is None else tasks + answered
        cost = sum(placement_cost_per_hour(cfg, w) for w in demands) + fixed
        if reward_source == "chain":
            revenue = None if tao_per_day is None else tao_per_day / 24 * econ.tao_price
        else:
            revenue = None if tasks is None else tasks * acceptance * per_task * econ.tao_price
        rows.append({"netuid": netuid, "name": name, "workload": ", ".join(sorted(demands)), "served": served,
                     "tasks_per_hour": tasks, "capacity_per_hour": capacities,
                     "capacity_from": ", ".join(sorted(sources)),
                     "demand_per_hour": None if any(d is None for d in demands.values()) else sum(demands.values()),
                     "acceptance": acceptance, "reward_source": reward_source,
                     "reward_per_task_tao": per_task if reward_source == "fixed" else None,
                     "tao_per_day": tao_per_day, "revenue_per_hour": revenue, "cost_per_hour": cost,
                     "profit_per_hour": None if revenue is None else revenue - cost})

    routes = subnet_workloads(cfg)
    for subnet in cfg.subnets:
        f = figs.get(subnet.netuid)
        hours = f["hours"] if f else 0.0  # the window's part since the ledger started
        # Its own demand: the tasks it sent each workload over the window (none known: no ledger yet).
        demands = {w: f["workloads"][w]["tasks"] / hours if f and hours else None
                   for w in sorted(routes[subnet.netuid])}
        tao = (f["inputs"]["chain_tao"] or 0) / hours * 24 if subnet.reward.source == "chain" and f and hours else None
        row(subnet.netuid, f"subnet {subnet.netuid}", demands, subnet.reward.source, subnet.reward.per_task_tao, tao,
            f["acceptance_rate"] if f and f["acceptance_rate"] is not None else 0.95, True)
    for c in econ.candidates:
        if getattr(cfg.workloads, c.workload) is None:
            continue  # not on this hardware
        row(c.netuid, c.name or f"subnet {c.netuid}", {c.workload: c.tasks_per_hour}, c.reward.source,
            c.reward.per_task_tao, c.tao_per_day, c.acceptance, False)
    rows.sort(key=lambda r: (r["profit_per_hour"] is None, -(r["profit_per_hour"] or 0)))
    for above, below in zip(rows, rows[1:]):
        below["to_overtake"] = overtake(above, below, econ.tao_price)
    return {"currency": econ.currency, "tao_price": econ.tao_price, "ranking": rows}


def overtake(above: dict, below: dict, tao_price: float) -> list[str]:
    """What would put `below` above `above`: its reward, its tasks, or the TAO price."""
    if above["profit_per_hour"] is None or below["profit_per_hour"] is None:
        return ["no revenue figure: declare its tasks_per_hour or pass --throughput for its workload"]
    gap = above["profit_per_hour"] - below["profit_per_hour"]
    out = []
    if below["reward_source"] == "fixed" and below["tasks_per_hour"]:
        per_task = below["reward_per_task_tao"] + gap / (below["tasks_per_hour"] * below["acceptance"] * tao_price)
        out.append(f"a reward above {per_task:.8f} TAO per task (now {below['reward_per_task_tao']:.8f})")
        if below["capacity_per_hour"] is None or below["tasks_per_hour"] < below["capacity_per_hour"]:
            # Not at capacity: more demand would pay.
            per_hour = below["tasks_per_hour"] + gap / (below["acceptance"] * below["reward_per_task_tao"] * tao_price) \
                if below["reward_per_task_tao"] else None
            if per_hour is not None:
                out.append(f"more than {per_hour:,.0f} tasks an hour from its validators")
    elif below["reward_source"] == "chain" and below["tao_per_day"] is not None:
        out.append(f"an emission above {below['tao_per_day'] + gap * 24 / tao_price:.4f} TAO a day")
    delta_revenue = (below["revenue_per_hour"] - above["revenue_per_hour"]) / tao_price
    if delta_revenue > 0:  # revenue scales with the TAO price, cost does not
        price = (below["cost_per_hour"] - above["cost_per_hour"]) / delta_revenue
        if price > 0:
            out.append(f"TAO above {price:,.2f}" if price > tao_price else f"TAO below {price:,.2f}")
    elif delta_revenue < 0:
        price = (below["cost_per_hour"] - above["cost_per_hour"]) / delta_revenue
        if 0 < price < tao_price:
            out.append(f"TAO below {price:,.2f}")
    return out or ["nothing within its inputs: it costs more an hour than it can earn"]


def pick_text(result: dict) -> str:
    cur = result["currency"]
    lines = [f"subnets ranked by expected profit an hour on this hardware (TAO at {result['tao_price']:g} {cur}):"]
    for i, r in enumerate(result["ranking"], 1):
        tasks = "-" if r["tasks_per_hour"] is None else f"{r['tasks_per_hour']:,.0f}"
        cap = ("unknown" if r["capacity_per_hour"] is None
               else f"{r['capacity_per_hour']:,.0f}/h ({r['capacity_from']})")
        lines.append(f"{i}. {r['name']} ({r['workload']}{', served' if r['served'] else ', candidate'}): "
                     f"profit {money(r['profit_per_hour'], cur, 4)}/h = revenue {money(r['revenue_per_hour'], cur, 4)}"
                     f" - cost {money(r['cost_per_hour'], cur, 4)}; {tasks} tasks/h (capacity {cap})")
        for change in r.get("to_overtake", []):
            lines.append(f"     would move above #{i - 1} with {change}")
    return "\n".join(lines)


def report_data(cfg: MinerConfig, ledger: Ledger, window: str, hotkey: str) -> dict:
    """What render_report draws: every subnet's days and verdict, and the window's figures."""
    import time

    from serve_app.observability.info import BuildInfo

    build = BuildInfo()
    figs = ledger.window(cfg, window_seconds(window))
    days = ledger.days(cfg)
    return {"generated_at": time.time(), "window": window,
            "miner": {"name": cfg.name, "version": build.version, "git_sha": build.git_sha, "hotkey": hotkey},
            "currency": cfg.economics.currency if cfg.economics else None,
            "subnets": {str(netuid): {"days": rows, "verdict": verdict(rows, cfg.ledger.verdict),
                                      "economics": figs[netuid]} for netuid, rows in days.items()}}
