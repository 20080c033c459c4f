"""Protocol name (as in a route's config) -> adapter."""

from __future__ import annotations

from serve_app.config import MinerConfig
from serve_app.protocols.base import Adapter


def make_adapter(protocol: str, cfg: MinerConfig) -> Adapter:
    if protocol == "openai-embeddings":
        from serve_app.protocols.embeddings import OpenAIEmbeddings

        return OpenAIEmbeddings(cfg.workloads.embeddings)
    raise ValueError(f"unknown protocol {protocol!r}")
