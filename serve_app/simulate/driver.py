"""One simulation from a miner config: its population, payloads and reference, the run, the report."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Optional, Sequence

from serve_app.config import MinerConfig, SubnetConfig
from serve_app.simulate.arrivals import arrival_times
from serve_app.simulate.payloads import Payloads, reference_encoder, text_pool
from serve_app.simulate.population import population, served_kinds
from serve_app.simulate.runner import Fault, Simulation
from serve_app.simulate.scoring import TARGET, score_run


def pick_subnet(cfg: MinerConfig, netuid: Optional[int]) -> SubnetConfig:
    if netuid is None:
        return cfg.subnets[0]
    for subnet in cfg.subnets:
        if subnet.netuid == netuid:
            return subnet
    raise ValueError(f"the config serves no subnet {netuid}: it serves {[s.netuid for s in cfg.subnets]}")


def prepare(cfg: MinerConfig, subnet: SubnetConfig, url: str, validators_file: Optional[Path] = None,
            seed: int = 0) -> Simulation:
    """The subnet's validators and payloads, ready to run against `url` (checking vectors' shapes
    only until `with_reference`)."""
    validators = population(cfg, subnet, validators_file)
    tools = tuple(cfg.workloads.agents.tools.offered(cfg.workloads.embeddings is not None)) \
        if cfg.workloads.agents is not None else ()
    embeddings = cfg.workloads.embeddings
    payloads = Payloads(served_kinds(subnet), texts=text_pool(), tools=tools,
                        max_texts=min(4, embeddings.limits.max_texts_per_request) if embeddings is not None else 4)
    return Simulation(url, cfg.wallet.hotkey_ss58(), subnet.auth.scheme, validators, payloads, seed=seed)


def reference_vectors(cfg: MinerConfig, texts: list[str]):
    """The text pool's vectors from the reference model, loaded in this process; None without an
    embeddings workload."""
    if cfg.workloads.embeddings is None:
        return None
    return reference_encoder(cfg.workloads.embeddings.model.id)(texts)


def simulate(sim: Simulation, netuid: int, seconds: float, rate: float, profile: str = "steady", seed: int = 0,
             faults: Sequence[Fault] = (), target: float = TARGET, arrivals: Optional[list[float]] = None) -> dict:
    """Run `sim` for `seconds` at `rate` (open loop, `profile`) and score it."""
    started = time.time()
    times = arrival_times(rate, seconds, profile, seed) if arrivals is None else arrivals
    attempts = asyncio.run(sim.run(times, faults))
    run = {"url": sim.url, "netuid": netuid, "seconds": seconds, "rate": rate, "profile": profile, "seed": seed,
           "started_at": round(started, 3), "sent": len(attempts), "reference": sim.payloads.reference is not None}
    return score_run(attempts, sim.validators, run, sim.windows, target)
