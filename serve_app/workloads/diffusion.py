"""The `Diffusion` Serve deployment: cached, batched text-to-image over the engine.

A request's images are looked up in the result cache first; only the misses reach the
model. `@serve.batch` gathers concurrent requests (bounded in pixel-steps), and under it
one CoalescingRunner per render spec (preset, steps, size) merges the images that queued
while the engine was busy into the next pipeline call. Specs never share a call, and a
spec with nothing queued never holds another back: each runner only waits for the engine.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

from ray import serve

from serve_app.config import DiffusionConfig
from serve_app.engines.coalesce import CoalescingRunner, DeadlinePassed
from serve_app.engines.diffusion import ImageJob, RenderSpec
from serve_app.engines.result_cache import ByteLRU
from serve_app.observability import logs
from serve_app.observability.metrics import GAUGE_PERIOD_S, WorkloadMetrics
from serve_app.ops.autoscaling import LoadWindow
from serve_app.workloads.common import SERVE_BATCHES_IN_FLIGHT, start_engine

log = logging.getLogger("ray.serve.torchrank.diffusion")
PROBE_TIMEOUT_S = 20.0


def max_batch_work(cfg: DiffusionConfig) -> int:
    """One Serve batch carries at most a full pipeline call of the costliest images a request may ask for."""
    return cfg.max_batch_images * cfg.max_steps * cfg.max_side * cfg.max_side


def work_in(batch: list) -> int:
    """Batch size in pixel-steps for @serve.batch: items are (spec, jobs, deadline, work).
    Must never raise: an exception kills the batch loop."""
    try:
        return sum(item[3] for item in batch)
    except Exception:
        return len(batch)


@serve.deployment(name="Diffusion")
class Diffusion:
    def __init__(self, cfg: DiffusionConfig):
        from serve_app.engines.diffusion import DiffusionEngine

        self.cfg = cfg
        from serve_app.engines.process import EngineProcess, InProcessEngine

        host = EngineProcess if cfg.engine_process else InProcessEngine
        self.torch, self.engine = start_engine("diffusion", cfg, functools.partial(host, DiffusionEngine))
        self.engine_info = self.engine.call("info")  # fixed for the replica's life: never wait on a call for it
        self.cache = ByteLRU(cfg.cache_bytes)
        self.runners: dict[RenderSpec, CoalescingRunner] = {}
        self.metrics = WorkloadMetrics("diffusion")
        self.max_work = max_batch_work(cfg)
        self._render_batch.set_max_batch_size(self.max_work)
        self._render_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.load = LoadWindow()  # latencies and in-flight requests, for the autoscaler
        self.calls = 0
        self.busy_s = 0.0  # seconds in pipeline calls: utilisation over any interval
        self.images_done = 0
        self.largest_call = 0
        self.expired = 0
        self.call_started: float | None = None  # perf_counter at the start of the running pipeline call
        self._background = [asyncio.create_task(self._publish_gauges()), asyncio.create_task(logs.flush_every())]

    def _call(self, spec: RenderSpec, jobs: list[ImageJob]) -> tuple[list[bytes]]:
        """One pipeline call, on the engine thread, measured."""
        self.call_started = started = time.perf_counter()
        try:
            images = self.engine.call("generate", jobs, spec)
        finally:
            self.call_started = None
        seconds = time.perf_counter() - started
        self.metrics.record_pass(seconds, len(jobs), images=len(jobs), padding=self.cfg.max_batch_images - len(jobs))
        self.busy_s += seconds
        self.calls += 1
        self.images_done += len(jobs)
        self.largest_call = max(self.largest_call, len(jobs))
        return (images,)

    def _runner(self, spec: RenderSpec) -> CoalescingRunner:
        runner = self.runners.get(spec)
        if runner is None:
            runner = self.runners[spec] = CoalescingRunner(
                self.torch, functools.partial(self._call, spec), max_items=self.cfg.max_batch_images)
        return runner

    def _cache_key(self, prompt: str, negative_prompt: str, seed: int, spec: RenderSpec) -> tuple:
        preset = self.cfg.presets[spec.preset]
        # Everything the bytes depend on: the preset's guidance and scheduler too, not only its name.
        return (self.cfg.model, prompt, negative_prompt, seed, spec, preset.guidance_scale, preset.scheduler)

    async def generate(self, prompt: str, negative_prompt: str, seeds: list[int], spec: RenderSpec,
                       deadline: float | None = None) -> list[bytes]:
        """PNG bytes for each seed (in order). Cached images come back at once; the rest are
        rendered, unless `deadline` (time.time()) passes first: then DeadlinePassed."""
        keys = [self._cache_key(prompt, negative_prompt, seed, spec) for seed in seeds]
        images = [self.cache.get(key) for key in keys]
        missing = [i for i, image in enumerate(images) if image is None]
        self.metrics.record_cache(hits=len(seeds) - len(missing), misses=len(missing))
        if not missing:
            return images
        if deadline is not None and time.time() >= deadline:
            raise DeadlinePassed()
        with self.load.track():
            # Each job carries its deadline: the engine stops a call at the next step once all of its jobs are late.
            jobs = [ImageJob(prompt, seeds[i], negative_prompt, deadline) for i in missing]
            # Serve refuses an item over max_batch_size: clamp (only a caller bypassing the adapter's limits gets there).
            work = min(len(jobs) * spec.work, self.max_work)
            result = await self._render_batch((spec, jobs, deadline, work))
        if isinstance(result, BaseException):
            raise result
        for i, image in zip(missing, result):
            images[i] = image
            self.cache.put(keys[i], image)
        return images

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0.0, max_concurrent_batches=SERVE_BATCHES_IN_FLIGHT,
                 batch_size_fn=work_in)
    async def _render_batch(self, requests: list[tuple[RenderSpec, list[ImageJob], float | None, int]]):
        # Each request goes to its spec's runner, keeping its own deadline; failures come back as values.
        return await asyncio.gather(*(self._render(spec, jobs, deadline) for spec, jobs, deadline, _ in requests),
                                    return_exceptions=True)

    async def _render(self, spec: RenderSpec, jobs: list[ImageJob], deadline: float | None) -> list[bytes]:
        runner = self._runner(spec)
        try:
            (images,) = await runner.run(jobs, deadline)
            return images
        except DeadlinePassed:
            self.expired += 1
            raise
        finally:
            if runner.idle and self.runners.get(spec) is runner:
                del self.runners[spec]  # specs come and go: keep only those with work

    async def _publish_gauges(self) -> None:
        while True:
            try:
                self.metrics.in_flight.set(self.load.in_flight, self.metrics.tags)
                self.metrics.queued.set(sum(r.queued_items for r in self.runners.values()), self.metrics.tags)
                self.metrics.cache_bytes.set(self.cache.bytes, self.metrics.tags)
                if self.engine_info["device"] == "cuda":  # read where the model runs, between calls
                    self.metrics.record_gpu(await self.torch.run(self.engine.call, "gpu_usage"))
            except Exception:  # the GPU-idle alert depends on this loop: never let it die
                log.exception("publishing diffusion gauges failed")
            await asyncio.sleep(GAUGE_PERIOD_S)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve calls this for the autoscaling policy (serve_app/ops/autoscaling.py)."""
        return self.load.stats(queued=sum(r.queued_items for r in self.runners.values()))

    def stats(self) -> dict:
        return {
            "pipeline_calls": self.calls,  # requests' calls: not the warm-up or health probes
            "busy_s": round(self.busy_s, 3),
            "images_rendered": self.images_done,
            "largest_call": self.largest_call,
            "expired": self.expired,
            "cache": {"hits": self.cache.hits, "misses": self.cache.misses, "bytes": self.cache.bytes,
                      "entries": len(self.cache)},
        }

    def info(self) -> dict:
        return self.engine_info

    async def check_health(self) -> None:
        # Busy: calls in progress show the engine works, unless one has run too long (wedged).
        # Idle: a real one-step call at the smallest size (Serve allows a check 30 s).
        started = self.call_started
        if started is not None and time.perf_counter() - started > self.cfg.stuck_call_s:
            raise RuntimeError(f"a pipeline call has run for over {self.cfg.stuck_call_s:.0f}s")
        if started is None and all(runner.idle for runner in self.runners.values()):
            await asyncio.wait_for(self.torch.run(self.engine.call, "probe"), timeout=PROBE_TIMEOUT_S)
