"""The miner guide's arithmetic on the miner's own figures:

    rev       = tasks x acceptance_rate x reward_per_task
    unit_cost = (gpu_hours x price_per_hour + power + ops) / tasks
    profit    = rev - unit_cost x tasks

`tasks` are the admitted requests (the work the miner took on), `acceptance_rate` the share
of them answered inside the deadline and faster than the subnet's latency SLO (the proxy for
what a validator scores), `reward_per_task` the subnet's reward in the configured currency.

Costs are what the replicas held (units x hours x price, plus their power), not what they
used: a replica holds its CPU/GPU share whether it is busy or idle. Workloads are shared by
subnets, so each workload's cost is split by the subnets' shares of its tasks (equally among
the subnets routing to it when it had none), the router's (and a workload's that no route
uses) by the shares of all tasks, ops equally; egress is each subnet's own.

Nothing here reads a clock or a file: the ledger hands in the sums of a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from serve_app.config import EconomicsConfig, MinerConfig, ResourcePrices
from serve_app.protocols.registry import PROTOCOLS

HOURS_PER_MONTH = 730.0
ROUTER = "router"  # the Router deployment, priced and held like a workload


def guide(tasks: float, acceptance_rate: float, reward_per_task: float, cost: float) -> dict:
    """The guide's three formulas. Revenue, cost and profit in currency; unit_cost per task
    (None without tasks)."""
    revenue = tasks * acceptance_rate * reward_per_task
    unit_cost = cost / tasks if tasks else None
    profit = revenue - (unit_cost * tasks if unit_cost is not None else cost)
    return {"revenue": revenue, "unit_cost": unit_cost, "profit": profit}


def held_cost(prices: ResourcePrices, power_per_kwh: float, cpu_hours: float, gpu_hours: float) -> float:
    """What holding these unit-hours costs: their price, and their power."""
    power_kwh = (cpu_hours * prices.cpu_watts + gpu_hours * prices.gpu_watts) / 1000.0
    return cpu_hours * prices.cpu_per_hour + gpu_hours * prices.gpu_per_hour + power_kwh * power_per_kwh


def cost_per_hour(econ: EconomicsConfig, workload: str, cpu_units: float, gpu_units: float) -> float:
    """Currency per hour of what `workload` holds now (ops not included): the keeper's gauge."""
    return held_cost(econ.prices_of(workload), econ.power_per_kwh, cpu_units, gpu_units)


def subnet_workloads(cfg: MinerConfig) -> dict[int, set[str]]:
    return {s.netuid: {PROTOCOLS[r.protocol].workload for r in s.routes} for s in cfg.subnets}


@dataclass
class Usage:
    """A subnet's counts on one workload over a window (the ledger's sums)."""

    requests: int = 0
    admitted: int = 0
    answered: int = 0
    accepted: int = 0
    late: int = 0
    failed: int = 0  # admitted, not answered
    miner_failures: int = 0  # of those, the miner's fault (5xx): the availability SLO's errors
    retry_refusals: int = 0  # refused with Retry-After (rate limits, shedding, breakers): callers come back
    egress_bytes: int = 0
    refused: dict = field(default_factory=dict)  # error code -> count of the requests not answered

    def add(self, other: "Usage") -> "Usage":
        for name in ("requests", "admitted", "answered", "accepted", "late", "failed", "miner_failures",
                     "retry_refusals", "egress_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for code, n in other.refused.items():
            self.refused[code] = self.refused.get(code, 0) + n
        return self


@dataclass
class Held:
    """Unit-hours a workload's replicas held over a window."""

    cpu_hours: float = 0.0
    gpu_hours: float = 0.0
    replica_hours: float = 0.0


def share(part: float, whole: float, among: int) -> float:
    """`part` of `whole`; with nothing to share by, an equal share of `among`."""
    if whole:
        return part / whole
    return 1.0 / among if among else 0.0


def figures(cfg: MinerConfig, usage: dict[tuple[int, str], Usage], held: dict[str, Held],
            chain_tao: dict[int, float], hours: float) -> dict[int, dict]:
    """netuid -> the window's figures: tasks, acceptance, resource hours, egress, failures,
    revenue, cost, profit, unit cost, cost per 1,000 tasks, and the inputs used. `usage` is
    keyed (netuid, workload); `chain_tao`: TAO each subnet's chain emission paid over the
    window; `hours`: the window's length. Money is None without an `economics:` block."""
    econ = cfg.economics
    routes = subnet_workloads(cfg)
    usage = {key: u for key, u in usage.items() if key[0] in routes}  # a subnet no longer served pays nothing
    per_workload: dict[str, int] = {}
    for (netuid, workload), u in usage.items():
        per_workload[workload] = per_workload.get(workload, 0) + u.admitted
    all_tasks = sum(per_workload.values())
    routed = set().union(*routes.values())
    out = {}
    for subnet in cfg.subnets:
        netuid = subnet.netuid
        total = Usage()
        for workload in sorted(routes[netuid]):
            total.add(usage.get((netuid, workload), Usage()))
        tasks = total.admitted
        acceptance = total.accepted / tasks if tasks else None
        row = {"tasks": tasks, "answered": total.answered, "accepted": total.accepted, "late": total.late,
               "failed": total.failed, "miner_failures": total.miner_failures, "retry_refusals": total.retry_refusals,
               "requests": total.requests, "refused": dict(sorted(total.refused.items())),
               "acceptance_rate": acceptance, "egress_gb": total.egress_bytes / 1e9, "hours": hours,
               "resource_hours": {}, "currency": econ.currency if econ else None}
        cost = 0.0
        row["workloads"] = {w: {"tasks": usage.get((netuid, w), Usage()).admitted,
                                "accepted": usage.get((netuid, w), Usage()).accepted, "cost": None}
                            for w in sorted(routes[netuid])}
        for workload, h in sorted(held.items()):
            if workload == ROUTER or workload not in routed:
                # The router, and a workload no route uses (the agents' retrieve tool's embeddings), serve all tasks.
                part = share(tasks, all_tasks, len(cfg.subnets))
            elif workload in routes[netuid]:
                sharing = sum(1 for s in routes.values() if workload in s)
                part = share(usage.get((netuid, workload), Usage()).admitted, per_workload.get(workload, 0), sharing)
            else:
                continue
            row["resource_hours"][workload] = {"cpu": h.cpu_hours * part, "gpu": h.gpu_hours * part,
                                               "share": part}
            if econ:
                held_part = part * held_cost(econ.prices_of(workload), econ.power_per_kwh, h.cpu_hours, h.gpu_hours)
                cost += held_part
                if workload in row["workloads"]:
                    row["workloads"][workload]["cost"] = held_part
        if econ is None:
            row.update(revenue=None, cost=None, profit=None, unit_cost=None, cost_per_1k_tasks=None,
                       reward_per_task=None)
            out[netuid] = row
            continue
        ops = econ.ops_per_month / HOURS_PER_MONTH * hours / len(cfg.subnets)
        egress = total.egress_bytes / 1e9 * econ.egress_per_gb
        cost += ops + egress
        if subnet.reward.source == "chain":
            earned = chain_tao.get(netuid, 0.0) * econ.tao_price
            reward = earned / total.accepted if total.accepted else None
        else:
            reward = subnet.reward.per_task_tao * econ.tao_price
            earned = None
        money = guide(tasks, acceptance or 0.0, reward or 0.0, cost)
        if earned is not None:  # the chain pays for the window, tasks or none
            money = {**money, "revenue": earned, "profit": earned - cost}
        row.update(money, cost=cost, reward_per_task=reward, reward_source=subnet.reward.source,
                   cost_per_1k_tasks=None if money["unit_cost"] is None else 1000 * money["unit_cost"],
                   inputs={"ops": ops, "egress": egress, "tao_price": econ.tao_price,
                           "chain_tao": chain_tao.get(netuid) if subnet.reward.source == "chain" else None})
        out[netuid] = row
    return out
