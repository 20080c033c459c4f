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
from serve_app.engines.coalesce import CoalescingRunner, DeadlinePassed
from serve_app.engines.gpu import gpu_usage
from serve_app.observability import logs
from serve_app.observability.metrics import GAUGE_PERIOD_S, WorkloadMetrics
from serve_app.ops.autoscaling import LoadWindow
from serve_app.ops.watchdog import Hysteresis
from serve_app.workloads.common import SERVE_BATCHES_IN_FLIGHT, start_engine

log = logging.getLogger("ray.serve.torchrank.embeddings")
def texts_in(batch: list) -> int:
    """Batch size in texts for @serve.batch (items are (texts, deadline, cap)).
    Must never raise: an exception kills the batch loop."""
    try:
        return sum(len(request[0]) for request in batch)
    except Exception:
        return len(batch)


@serve.deployment(name="Embeddings")
class Embeddings:
    def __init__(self, cfg: EmbeddingsConfig):
        from serve_app.engines.embeddings import SentenceEmbeddingEngine

        self.cfg = cfg
        self.torch, self.engine = start_engine("embeddings", cfg, SentenceEmbeddingEngine)
        self.metrics = WorkloadMetrics("embeddings")
        self.runner = CoalescingRunner(self.torch, self._encode_pass, max_items=cfg.max_batch_texts)
        self._embed_batch.set_max_batch_size(cfg.max_batch_texts)
        self._embed_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.load = LoadWindow()  # latencies and in-flight requests, for the autoscaler
        # The cheaper preset (shorter texts) for subnets that allow it, under sustained overload.
        self.degrade = Hysteresis(cfg.degraded.on_after_s, cfg.degraded.off_after_s) if cfg.degraded else None
        # (when, runner.busy_s, runner.items_waited) at the last gauge period: load over the period
        self._load_seen = (time.perf_counter(), 0.0, 0)
        self._background = [asyncio.create_task(self._publish_gauges()), asyncio.create_task(logs.flush_every())]

    def _encode_pass(self, items: list[tuple[str, int | None]]):
        """One forward pass over (text, token cap) items, on the engine thread, measured."""
        started = time.perf_counter()
        caps = [cap for _, cap in items]
        vectors, tokens = self.engine.encode([text for text, _ in items], caps if any(caps) else None)
        self.metrics.record_pass(time.perf_counter() - started, len(items), texts=len(items), tokens=int(tokens.sum()))
        return vectors, tokens

    async def _publish_gauges(self) -> None:
        # Gauges are sampled here, off the request path; Ray exports them every few seconds anyway.
        while True:
            try:
                self.metrics.in_flight.set(self.load.in_flight, self.metrics.tags)
                queued = self.runner.queued_items
                self.metrics.queued.set(queued, self.metrics.tags)
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
                self.metrics.record_gpu(gpu_usage(self.engine.torch))
            except Exception:  # the GPU-idle alert depends on this loop: never let it die
                log.exception("publishing embeddings gauges failed")
            await asyncio.sleep(GAUGE_PERIOD_S)

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

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this for the autoscaling policy (serve_app/ops/autoscaling.py)."""
        return self.load.stats(queued=self.runner.queued_items)

    def stats(self) -> dict:
        return {
            "forward_calls": self.runner.passes,
            "texts_encoded": self.runner.items_done,
            "largest_batch": self.runner.largest_pass,
            "expired": self.runner.expired,
            "degraded": self.degraded,
        }

    def info(self) -> dict:
        return self.engine.info

    async def check_health(self) -> None:
        # A real (tiny) forward pass: a wedged model fails this and Serve replaces the replica.
        await asyncio.wait_for(self.torch.run(self.engine.encode, ["health"]), timeout=20)
