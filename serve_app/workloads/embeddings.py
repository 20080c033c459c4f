"""The `Embeddings` Serve deployment: dynamic batching across requests over the engine."""

from __future__ import annotations

import asyncio

from ray import serve

from serve_app.config import EmbeddingsConfig
from serve_app.engines.thread import EngineThread


def texts_in(batch: list) -> int:
    """Batch size in texts for @serve.batch. Must never raise: an exception kills the batch loop."""
    try:
        return sum(len(texts) for texts in batch)
    except Exception:
        return len(batch)


@serve.deployment(name="Embeddings")
class Embeddings:
    def __init__(self, cfg: EmbeddingsConfig):
        from serve_app.engines.embeddings import SentenceEmbeddingEngine

        self.cfg = cfg
        self.torch = EngineThread("embeddings")
        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        self.engine = self.torch.run_sync(SentenceEmbeddingEngine, cfg, threads)
        self._embed_batch.set_max_batch_size(cfg.max_batch_texts)
        self._embed_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.forward_calls = 0
        self.texts_encoded = 0
        self.largest_batch = 0

    async def embed(self, texts: list[str]):
        """One request's texts -> (vectors [n, dim], total tokens)."""
        vectors, tokens = await self._embed_batch(texts)
        return vectors, int(tokens.sum())

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, batch_size_fn=texts_in)
    async def _embed_batch(self, requests: list[list[str]]):
        flat = [text for texts in requests for text in texts]
        vectors, tokens = await self.torch.run(self.engine.encode, flat)
        self.forward_calls += 1
        self.texts_encoded += len(flat)
        self.largest_batch = max(self.largest_batch, len(flat))
        out, start = [], 0
        for texts in requests:
            out.append((vectors[start : start + len(texts)], tokens[start : start + len(texts)]))
            start += len(texts)
        return out

    def stats(self) -> dict:
        return {
            "forward_calls": self.forward_calls,
            "texts_encoded": self.texts_encoded,
            "largest_batch": self.largest_batch,
        }

    async def check_health(self) -> None:
        # A real (tiny) forward pass: a wedged model fails this and Serve replaces the replica.
        await asyncio.wait_for(self.torch.run(self.engine.encode, ["health"]), timeout=20)
