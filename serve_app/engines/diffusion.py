"""Text-to-image engine over a diffusers pipeline (no Serve here: serve_app/workloads/diffusion.py).

Determinism: every pipeline call runs exactly `max_batch_images` images, padding with
blank prompts, and each image has its own seeded generator. With identical shapes each
image's arithmetic is the same whatever shares its batch, so a seeded request gives the
same PNG bytes alone or batched. Unpadded, a batch's shape changes the arithmetic a little,
enough to flip some pixels after rounding (benchmarks/README.md, "Figures moved from
module docstrings").
"""

from __future__ import annotations

import functools
import io
import logging
import time
from pathlib import Path
from typing import Optional

from serve_app.config import DiffusionConfig, DiffusionPreset
from serve_app.contracts import DeadlinePassed, ImageJob, RenderSpec
from serve_app.engines.base import GeneratingEngine

from serve_app.engines.tiny_diffusion import TINY_DIFFUSION_ID, build_tiny_pipeline
from serve_app.engines.weights import weights_digest
from serve_app.inference.gpu import torch_runtime

log = logging.getLogger("ray.serve.torchrank.diffusion")

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "dpm": "DPMSolverMultistepScheduler"}


def resolve_pipeline_path(cfg: DiffusionConfig) -> str:
    if cfg.model.id == TINY_DIFFUSION_ID:
        return str(build_tiny_pipeline(Path(cfg.runtime.cache_dir).expanduser() / "tiny-sd"))
    return cfg.model.id  # a local directory or a hub id: from_pretrained takes both


class DiffusionEngine(GeneratingEngine):
    FREES = ("pipe", "pipes")

    def __init__(self, cfg: DiffusionConfig, num_threads: int = 1):
        self.torch, self.device, dtype = torch_runtime(cfg.runtime, cfg.placement.memory_cap, num_threads,
                                                       fp16=cfg.runtime.fp16)
        from diffusers import AutoPipelineForText2Image

        self.cfg = cfg
        path = resolve_pipeline_path(cfg)
        self.weights_sha256 = weights_digest(path)
        pipe = AutoPipelineForText2Image.from_pretrained(path, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        if cfg.runtime.attention_slicing:
            pipe.enable_attention_slicing()
        if cfg.runtime.vae_tiling:
            pipe.vae.enable_tiling()
        self.pipe = pipe.to(self.device)
        # One pipeline per preset, sharing the model weights: a preset may name its own scheduler.
        self.pipes = {name: self._with_scheduler(preset.scheduler) for name, preset in cfg.model.presets.items()}
        self.calls = 0
        self.dtype = str(dtype).removeprefix("torch.")
        log.info("loaded %s on %s (%s)", cfg.model.id, self.device, self.dtype)
        self.generate([ImageJob("warm up", 0)], self.preset_spec(cfg.model.default_preset))  # kernels, allocator, caches

    def info(self) -> dict:
        return {"model": self.cfg.model.id, "weights_sha256": self.weights_sha256, "device": self.device, "dtype": self.dtype,
                "gpu_memory_fraction": self.cfg.placement.memory_cap if self.device == "cuda" else None,
                "images_per_call": self.cfg.batching.max_batch_images, "default_preset": self.cfg.model.default_preset,
                "presets": {name: p.model_dump() for name, p in self.cfg.model.presets.items()}}

    def preset_spec(self, name: str) -> RenderSpec:
        preset = self.cfg.model.presets[name]
        return RenderSpec(name, preset.steps, preset.width, preset.height)

    def probe(self) -> None:
        """The cheapest real call (one step at the smallest size): the health check."""
        self.generate([ImageJob("health", 0)], RenderSpec(self.cfg.model.default_preset, 1, self.cfg.limits.min_side, self.cfg.limits.min_side))

    def _with_scheduler(self, name: str):
        if name == "default":
            return self.pipe
        import diffusers

        scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(self.pipe.scheduler.config)
        return type(self.pipe)(**{**self.pipe.components, "scheduler": scheduler})

    def generate(self, jobs: list[ImageJob], spec: RenderSpec) -> list[bytes]:
        """PNG bytes per job, in order: one pipeline call; len(jobs) <= max_batch_images."""
        preset: DiffusionPreset = self.cfg.model.presets[spec.preset]
        size = self.cfg.batching.max_batch_images
        if not 0 < len(jobs) <= size:
            raise ValueError(f"{len(jobs)} images in one call; 1 to {size} allowed")
        deadline = last_deadline(jobs)
        if deadline is not None and time.time() >= deadline:
            raise DeadlinePassed()
        padded = list(jobs) + [ImageJob("", 0)] * (size - len(jobs))
        generators = [self.torch.Generator(device="cpu").manual_seed(job.seed) for job in padded]
        with self.torch.inference_mode():
            images = self.pipes[spec.preset](
                prompt=[job.prompt for job in padded], negative_prompt=[job.negative_prompt for job in padded],
                num_inference_steps=spec.steps, guidance_scale=preset.guidance_scale,
                width=spec.width, height=spec.height, generator=generators, output_type="pil",
                callback_on_step_end=None if deadline is None else functools.partial(_stop_after, deadline)).images
        self.calls += 1
        return [png(image) for image in images[: len(jobs)]]


def last_deadline(jobs: list[ImageJob]) -> Optional[float]:
    """When every job of a call is late; None when a job has no deadline. A call shared with
    work still in time goes on for it."""
    if any(job.deadline is None for job in jobs):
        return None
    return max(job.deadline for job in jobs)


def _stop_after(deadline: float, pipe, step: int, timestep, tensors: dict) -> dict:
    """`callback_on_step_end`: a running call cannot be cut from outside, so without this a late
    call would hold the replica for all its steps. It raises rather than set `pipe._interrupt`,
    which would still decode (and PNG-encode) latents nobody will take."""
    if time.time() >= deadline:
        raise DeadlinePassed()
    return tensors


def png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
