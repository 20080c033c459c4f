"""The router's table: for each full path, the subnet, protocol adapter, workload handle and
the per-subnet and per-workload guards (metagraph, breaker, admission, rate limit) that the
request pipeline (serve_app/router/pipeline.py) walks through."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from serve_app.chain.metagraph import MetagraphCache, make_source
from serve_app.config import MinerConfig, SubnetConfig
from serve_app.ops.admission import Admission
from serve_app.ops.breaker import CircuitBreaker
from serve_app.ops.ratelimit import RateLimiter
from serve_app.protocols.base import Adapter
from serve_app.protocols.registry import PROTOCOLS, make_adapter


@dataclass(frozen=True)
class Route:
    path: str
    subnet: SubnetConfig
    metagraph: MetagraphCache
    adapter: Adapter
    workload: object  # the workload's DeploymentHandle
    breaker: CircuitBreaker
    admission: Admission
    rate_limit: RateLimiter
    rollout: Optional[object] = None  # the workload's RolloutRouter while it has a canary


@dataclass
class RouteTable:
    routes: dict[str, Route] = field(default_factory=dict)
    metagraphs: dict[int, MetagraphCache] = field(default_factory=dict)
    # Each workload's capacity is shared by every subnet using it: one admission per workload.
    admission: dict[str, Admission] = field(default_factory=dict)
    breakers: dict[tuple[int, str], CircuitBreaker] = field(default_factory=dict)

    def subnet_breakers(self, netuid: int) -> dict[str, CircuitBreaker]:
        return {workload: b for (n, workload), b in self.breakers.items() if n == netuid}


async def build_routes(cfg: MinerConfig, workloads: dict[str, object], rollouts: Optional[dict] = None) -> RouteTable:
    """Every route of every subnet, with each subnet's metagraph read once (a failed first read
    leaves its requests at 503 until a background refresh succeeds). `rollouts`: workload ->
    its RolloutRouter, for workloads with a canary."""
    rollouts = rollouts or {}
    table = RouteTable(admission={name: Admission((wl := getattr(cfg.workloads, name)).load.admission, wl.in_flight_items)
                                  for name in workloads})
    for subnet in cfg.subnets:
        cache = MetagraphCache(make_source(subnet.metagraph, subnet.netuid), subnet.metagraph.refresh_s,
                               subnet.metagraph.max_age_s)
        await cache.refresh()
        cache.start()
        table.metagraphs[subnet.netuid] = cache
        rate_limit = RateLimiter(subnet.rate_limit, replicas=cfg.router.num_replicas)
        for route in subnet.routes:
            workload = PROTOCOLS[route.protocol].workload
            path = subnet.prefix + route.path
            table.routes[path] = Route(
                path=path,
                subnet=subnet,
                metagraph=cache,
                adapter=make_adapter(route.protocol, cfg, subnet),
                workload=workloads[workload],
                breaker=table.breakers.setdefault((subnet.netuid, workload), CircuitBreaker(subnet.breaker)),
                admission=table.admission[workload],
                rate_limit=rate_limit,
                rollout=rollouts.get(workload),
            )
    return table
