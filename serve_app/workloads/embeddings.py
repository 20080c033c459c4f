"""The `Embeddings` Serve deployment: dynamic batching across requests over the engine.

`@serve.batch` groups the requests that arrive together (and waits `batch_wait_timeout_s`
for more, if set); the CoalescingRunner under it merges whatever queued while the engine
was busy into the next forward pass.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from serve_app.config import EmbeddingsConfig
from serve_app.contracts import DeadlinePassed
from serve_app.inference.coalesce import CoalescingRunner
from serve_app.ops.hysteresis import Hysteresis
from serve_app.workloads.replica import SERVE_BATCHES_IN_FLIGHT, WorkloadReplica, serve_batch_size

log = logging.getLogger("ray.serve.torchrank.embeddings")
texts_in = serve_batch_size(lambda request: len(request[0]))  # items are (texts, deadline, cap)


@serve.deployment(name="Embeddings")
class Embeddings(WorkloadReplica):
    def __init__(self, cfg: EmbeddingsConfig, role: str = "stable"):
        from serve_app.engines.embeddings import SentenceEmbeddingEngine

        super().__init__("embeddings", cfg, SentenceEmbeddingEngine, role)
        self.runner = CoalescingRunner(self.engine_thread, self._encode_pass, max_items=cfg.batching.max_batch_texts)
        self._embed_batch.set_max_batch_size(cfg.batching.max_batch_texts)
        self._embed_batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        self.tool_texts_in_flight = 0  # from the agents' retrieve tool (embed_for_tool)
        # The cheaper preset (shorter texts) for subnets that allow it, under sustained overload.
        self.degrade = Hysteresis(cfg.degraded.on_after_s, cfg.degraded.off_after_s) if cfg.degraded else None
        # (when, runner.busy_s, runner.items_waited) at the last gauge period: load over the period
        self._load_seen = (time.perf_counter(), 0.0, 0)

    def _encode_pass(self, items: list[tuple[str, int | None]]):
        """One forward pass over (text, token cap) items, on the engine thread, measured."""
        caps = [cap for _, cap in items]
        (vectors, tokens), seconds = self.model_call(self.engine.encode, [text for text, _ in items],
                                                     caps if any(caps) else None)
        self.metrics.record_pass(seconds, len(items), texts=len(items), tokens=int(tokens.sum()))
        return vectors, tokens

    def publish_workload_gauges(self) -> None:
        """The degraded preset follows the model's load over the last gauge period."""
        now, busy_s, waited = time.perf_counter(), self.runner.busy_s, self.runner.items_waited
        seen_at, seen_busy, seen_waited = self._load_seen
        period = max(1e-3, now - seen_at)
        busy, waited_per_s = (busy_s - seen_busy) / period, (waited - seen_waited) / period
        self._load_seen = (now, busy_s, waited)
        if self.degrade is not None:
            was, wanted = self.degrade.on, self.cfg.degraded
            if self.degrade.update(busy >= wanted.busy_fraction and waited_per_s >= wanted.waited_items) != was:
                log.warning("degraded preset %s (model busy %.0f%%, %.0f texts/s waited for it)",
                            "on" if self.degrade.on else "off", busy * 100, waited_per_s)
            self.metrics.degraded.set(int(self.degrade.on), self.metrics.tags)

    @property
    def degraded(self) -> bool:
        return self.degrade is not None and self.degrade.on

    async def embed(self, texts: list[str], deadline: float | None = None, degradable: bool = False):
        """One request's texts -> (vectors [n, dim], total tokens).

        `deadline` (time.time()): past it, the texts are dropped before the model and
        DeadlinePassed is raised. `degradable`: the subnet accepts the cheaper preset.
        """
        if deadline is not None and time.time() >= deadline:
            raise DeadlinePassed()
        cap = self.cfg.degraded.max_seq_length if degradable and self.degraded else None
        with self.load.track():
            result = await self._embed_batch((texts, deadline, cap))
        if isinstance(result, BaseException):
            raise result
        vectors, tokens = result
        return vectors, int(tokens.sum())

    async def embed_for_tool(self, texts: list[str], deadline: float | None = None):
        """An agent tool's texts (the retrieve tool calls this replica directly, not through a
        router): `embed`, counted in `outside_work` so the routers' admission sees them."""
        self.tool_texts_in_flight += len(texts)
        try:
            return await self.embed(texts, deadline)
        finally:
            self.tool_texts_in_flight -= len(texts)

    def outside_work(self) -> int:
        """Texts in flight here that no router admitted (the agents' tools): for admission."""
        return self.tool_texts_in_flight

    async def embed_many(self, requests: list[tuple[list[str], float | None, bool]]) -> list:
        """Many requests' (texts, deadline, degradable) in one call, as the router's
        CallBatcher sends them: one result per request, (vectors, tokens) or its exception.
        Each request keeps its own deadline; the runner merges them into shared passes."""
        return await asyncio.gather(*(self.embed(texts, deadline, degradable) for texts, deadline, degradable in requests),
                                    return_exceptions=True)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, max_concurrent_batches=SERVE_BATCHES_IN_FLIGHT,
                 batch_size_fn=texts_in)
    async def _embed_batch(self, requests: list[tuple[list[str], float | None, int | None]]):
        # One runner entry per request, so each keeps its own deadline; the runner
        # still merges them into shared forward passes. Failures come back as values.
        return await asyncio.gather(
            *(self.runner.run([(text, cap) for text in texts], deadline) for texts, deadline, cap in requests),
            return_exceptions=True)

    def stats(self) -> dict:
        return {
            "forward_calls": self.runner.passes,
            "texts_encoded": self.runner.items_done,
            "largest_batch": self.runner.largest_pass,
            "expired": self.runner.expired,
            "degraded": self.degraded,
        }
