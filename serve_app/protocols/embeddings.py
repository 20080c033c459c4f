"""OpenAI-compatible embeddings: POST /v1/embeddings."""

from __future__ import annotations

import base64
from typing import Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import EmbeddingsConfig
from serve_app.protocols.base import limit_exceeded, parse_json
from serve_app.router.batching import CallBatcher


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input: Union[str, list[str]] = Field(description="One text or a list of texts.")
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class OpenAIEmbeddings:
    workload = "embeddings"
    request_model = EmbeddingsRequest
    idempotent = True

    @classmethod
    def for_subnet(cls, cfg, subnet) -> "OpenAIEmbeddings":
        return cls(cfg.workloads.embeddings)

    def __init__(self, cfg: EmbeddingsConfig):
        self.cfg = cfg
        self.accepted_models = {cfg.model.name, cfg.model.id}
        self._batchers: dict[str, CallBatcher] = {}

    def parse(self, body: bytes) -> EmbeddingsRequest:
        req = parse_json(body, EmbeddingsRequest)
        texts = req.texts
        if not texts:
            raise limit_exceeded("input", "at least one text is required")
        if len(texts) > self.cfg.limits.max_texts_per_request:
            raise limit_exceeded("input", f"{len(texts)} texts, at most {self.cfg.limits.max_texts_per_request} per request")
        for i, text in enumerate(texts):
            if len(text) > self.cfg.limits.max_chars_per_text:
                field = "input" if isinstance(req.input, str) else f"input[{i}]"
                raise limit_exceeded(field, f"{len(text)} characters, at most {self.cfg.limits.max_chars_per_text}")
        if req.model is not None and req.model not in self.accepted_models:
            raise limit_exceeded("model", f"{req.model!r} is not served here; this miner serves {self.cfg.model.name!r}")
        return req

    def cost(self, req: EmbeddingsRequest) -> float:
        return len(req.texts)

    def _batcher(self, handle) -> CallBatcher:
        """Concurrent requests to one deployment share calls: two out per replica keep its next pass fed."""
        batcher = self._batchers.get(handle.deployment_name)
        if batcher is None:
            cfg = self.cfg
            scaling = cfg.placement.autoscaling
            replicas = scaling.max_replicas if scaling else cfg.placement.num_replicas
            batcher = self._batchers[handle.deployment_name] = CallBatcher(
                lambda requests: handle.embed_many.remote(requests), max_concurrent=2 * replicas,
                max_items=cfg.batching.max_batch_texts)
        return batcher

    @staticmethod
    def unfinished(answer: dict) -> bool:
        return False

    @staticmethod
    def agreement(stable: dict, candidate: dict, canary) -> tuple[bool, float]:
        """Every vector's cosine to stable's at least canary.min_cosine; the measure is the lowest."""
        a, b = vectors_of(stable), vectors_of(candidate)
        if a.shape != b.shape:
            return False, -1.0
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        lowest = float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))
        return bool(lowest >= canary.min_cosine), lowest

    async def run(self, req: EmbeddingsRequest, handle, deadline: float, degradable: bool) -> dict:
        texts = req.texts
        vectors, tokens = await self._batcher(handle).submit((texts, deadline, degradable), size=len(texts))
        if req.encoding_format == "base64":
            encoded = [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = list(vectors)  # numpy rows: orjson writes them directly
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)],
            "model": self.cfg.model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


def vectors_of(answer: dict) -> np.ndarray:
    """The [n, dim] vectors of an answer, in either encoding."""
    rows = [d["embedding"] for d in answer["data"]]
    if rows and isinstance(rows[0], str):
        return np.stack([np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows])
    return np.asarray(rows, dtype=np.float32)
