"""Protocol name (as in a route's config) -> adapter."""

from __future__ import annotations

from serve_app.config import MinerConfig, SubnetConfig
from serve_app.protocols.base import Adapter


def make_adapter(protocol: str, cfg: MinerConfig, subnet: SubnetConfig) -> Adapter:
    if protocol == "openai-embeddings":
        from serve_app.protocols.embeddings import OpenAIEmbeddings

        return OpenAIEmbeddings(cfg.workloads.embeddings)
    if protocol == "openai-images":
        from serve_app.protocols.images import OpenAIImages

        return OpenAIImages(cfg.workloads.diffusion, subnet.diffusion)
    if protocol == "agent-runs":
        from serve_app.protocols.agents import AgentRuns

        return AgentRuns(cfg.workloads.agents, embeddings=cfg.workloads.embeddings is not None)
    raise ValueError(f"unknown protocol {protocol!r}")
