"""The one table of wire protocols: a route's `protocol` in the config -> the workload that
serves it and the adapter class that speaks it. The config's choices, the router's routes
and the checks of which workloads a config needs all read it. Imports nothing heavy: the
config module uses it."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.config import MinerConfig, SubnetConfig
    from serve_app.protocols.base import Adapter


@dataclass(frozen=True)
class Protocol:
    name: str
    workload: str  # the field under `workloads:` and the Serve deployment it runs in
    adapter: str  # "module:Class"; the class has for_subnet(cfg, subnet)


PROTOCOLS = {p.name: p for p in (
    Protocol("openai-embeddings", "embeddings", "serve_app.protocols.embeddings:OpenAIEmbeddings"),
    Protocol("openai-images", "diffusion", "serve_app.protocols.images:OpenAIImages"),
    Protocol("agent-runs", "agents", "serve_app.protocols.agents:AgentRuns"),
)}


def make_adapter(protocol: str, cfg: MinerConfig, subnet: SubnetConfig) -> Adapter:
    module, name = PROTOCOLS[protocol].adapter.split(":")
    return getattr(importlib.import_module(module), name).for_subnet(cfg, subnet)


def workload_adapter(workload: str) -> type:
    """The adapter class of the protocol `workload` serves: its rollout comparisons (agreement, unfinished)."""
    protocol = next(p for p in PROTOCOLS.values() if p.workload == workload)
    module, name = protocol.adapter.split(":")
    return getattr(importlib.import_module(module), name)
