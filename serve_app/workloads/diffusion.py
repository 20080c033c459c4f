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
import time

from ray import serve

from serve_app.config import DiffusionConfig
from serve_app.contracts import DeadlinePassed, ImageJob, RenderSpec
from serve_app.inference.coalesce import CoalescingRunner

from serve_app.inference.result_cache import ByteLRU
from serve_app.workloads.replica import SERVE_BATCHES_IN_FLIGHT, WorkloadReplica, serve_batch_size

work_in = serve_batch_size(lambda item: item[3])  # in pixel-steps: items are (spec, jobs, deadline, work)


def max_batch_work(cfg: DiffusionConfig) -> int:
    """One Serve batch carries at most a full pipeline call of the costliest images a request may ask for."""
    return cfg.batching.max_batch_images * cfg.limits.max_steps * cfg.limits.max_side * cfg.limits.max_side


@serve.deployment(name="Diffusion")
class Diffusion(WorkloadReplica):
    call_noun = "pipeline call"

    def __init__(self, cfg: DiffusionConfig, role: str = "stable"):
        from serve_app.engines.diffusion import DiffusionEngine
        from serve_app.inference.process import EngineProcess

        build = functools.partial(EngineProcess, DiffusionEngine) if cfg.runtime.engine_process else DiffusionEngine
        super().__init__("diffusion", cfg, build, role)
        self.cache = ByteLRU(cfg.cache_bytes)
        self.runners: dict[RenderSpec, CoalescingRunner] = {}
        self.max_work = max_batch_work(cfg)
        self._render_batch.set_max_batch_size(self.max_work)
        self._render_batch.set_batch_wait_timeout_s(cfg.batching.batch_wait_timeout_s)
        self.calls = 0
        self.busy_s = 0.0  # seconds in pipeline calls: utilisation over any interval
        self.images_done = 0
        self.largest_call = 0
        self.expired = 0

    def runners_in_use(self):
        return self.runners.values()  # one per render spec with work

    def publish_workload_gauges(self) -> None:
        self.metrics.cache_bytes.set(self.cache.bytes, self.metrics.tags)

    def _call(self, spec: RenderSpec, jobs: list[ImageJob]) -> tuple[list[bytes]]:
        """One pipeline call, on the engine thread, measured."""
        images, seconds = self.model_call(self.engine.generate, jobs, spec)
        self.metrics.record_pass(seconds, len(jobs), images=len(jobs), padding=self.cfg.batching.max_batch_images - len(jobs))
        self.busy_s += seconds
        self.calls += 1
        self.images_done += len(jobs)
        self.largest_call = max(self.largest_call, len(jobs))
        return (images,)

    def _runner(self, spec: RenderSpec) -> CoalescingRunner:
        runner = self.runners.get(spec)
        if runner is None:
            runner = self.runners[spec] = CoalescingRunner(
                self.engine_thread, functools.partial(self._call, spec), max_items=self.cfg.batching.max_batch_images)
        return runner

    def _cache_key(self, prompt: str, negative_prompt: str, seed: int, spec: RenderSpec) -> tuple:
        preset = self.cfg.model.presets[spec.preset]
        # Everything the bytes depend on: the preset's guidance and scheduler too, not only its name.
        return (self.cfg.model.id, prompt, negative_prompt, seed, spec, preset.guidance_scale, preset.scheduler)

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
