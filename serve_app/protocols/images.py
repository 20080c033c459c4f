"""OpenAI-compatible text-to-image: POST /v1/images/generations.

Beyond OpenAI's fields: `seed` (validators re-run and compare bytes), `preset` (one of the
presets the subnet offers), `steps` and `negative_prompt`. Each image in the answer carries
its seed, and the answer names the preset, steps and size used, so any image can be
reproduced.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import DiffusionConfig, SubnetDiffusion

from serve_app.contracts import RenderSpec
from serve_app.protocols.base import limit_exceeded, parse_json

MAX_SEED = 2**63 - 1


class ImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    n: int = Field(default=1, ge=1)
    size: Optional[str] = Field(default=None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT")
    response_format: Literal["b64_json"] = "b64_json"
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    preset: Optional[str] = None
    steps: Optional[int] = Field(default=None, ge=1, description="Default: the preset's.")
    negative_prompt: str = ""
    model: Optional[str] = None
    user: Optional[str] = None


class OpenAIImages:
    workload = "diffusion"
    request_model = ImagesRequest
    idempotent = True  # a seeded image: the same bytes again, no side effect

    @classmethod
    def for_subnet(cls, cfg, subnet) -> "OpenAIImages":
        return cls(cfg.workloads.diffusion, subnet.diffusion)

    def __init__(self, cfg: DiffusionConfig, policy: SubnetDiffusion = SubnetDiffusion()):
        self.cfg = cfg
        self.default_preset = policy.default_preset or cfg.model.default_preset
        self.allowed = policy.allowed_presets or tuple(cfg.model.presets)
        # The subnet's limits bound what one request costs (pixel-steps); config keeps them within the workload's.
        self.max_steps = policy.max_steps or cfg.limits.max_steps
        self.max_side = policy.max_side or cfg.limits.max_side

    def parse(self, body: bytes) -> ImagesRequest:
        """The request with its preset, steps, size and seed filled in and checked (422 otherwise)."""
        req = parse_json(body, ImagesRequest)
        cfg = self.cfg
        preset_name = req.preset or self.default_preset
        if preset_name not in self.allowed:
            raise limit_exceeded("preset", f"{preset_name!r} is not offered on this subnet; choose from {list(self.allowed)}")
        preset = cfg.model.presets[preset_name]
        steps = req.steps if req.steps is not None else preset.steps
        if steps > self.max_steps:
            raise limit_exceeded("steps", f"{steps}, at most {self.max_steps}")
        width, height = (int(side) for side in req.size.split("x")) if req.size else (preset.width, preset.height)
        for side in (width, height):
            if not cfg.limits.min_side <= side <= self.max_side or side % 8:
                raise limit_exceeded("size", f"{width}x{height}: each side a multiple of 8 from {cfg.limits.min_side} "
                                             f"to {self.max_side}")
        if req.n > cfg.batching.max_batch_images:
            raise limit_exceeded("n", f"at most {cfg.batching.max_batch_images} images per request")
        for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if len(text) > cfg.limits.max_prompt_chars:
                raise limit_exceeded(field, f"{len(text)} characters, at most {cfg.limits.max_prompt_chars}")
        if not req.prompt.strip():
            raise limit_exceeded("prompt", "an empty prompt")
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - req.n)
        if seed + req.n - 1 > MAX_SEED:
            raise limit_exceeded("seed", f"seed + n - 1 must not exceed {MAX_SEED}")
        return req.model_copy(update={"preset": preset_name, "steps": steps, "size": f"{width}x{height}", "seed": seed})

    def spec(self, req: ImagesRequest) -> RenderSpec:
        """Of a parsed request."""
        width, height = (int(side) for side in req.size.split("x"))
        return RenderSpec(req.preset, req.steps, width, height)

    def seeds(self, req: ImagesRequest) -> list[int]:
        """Image i of a request uses seed + i: each image reproducible on its own."""
        return [req.seed + i for i in range(req.n)]

    def cost(self, req: ImagesRequest) -> float:
        """Images weighted by pixel-steps against the default preset's: a 4-step 64x64 image costs
        half an 8-step one."""
        default = self.cfg.model.presets[self.cfg.model.default_preset]
        width, height = (int(side) for side in req.size.split("x"))
        return req.n * (req.steps * width * height) / (default.steps * default.width * default.height)

    @staticmethod
    def unfinished(answer: dict) -> bool:
        return False

    @staticmethod
    def agreement(stable: dict, candidate: dict, canary) -> tuple[bool, float]:
        """The same seeds give images whose pixels differ on average (0-255) by at most
        canary.max_pixel_diff; the measure is the largest such mean over the images."""
        worst = max(pixel_difference(a["b64_json"], b["b64_json"]) for a, b in zip(stable["data"], candidate["data"]))
        return bool(worst <= canary.max_pixel_diff), worst

    async def run(self, req: ImagesRequest, handle, deadline: float, degradable: bool) -> dict:
        seeds = self.seeds(req)
        images = await handle.generate.remote(req.prompt, req.negative_prompt, seeds, self.spec(req), deadline)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode(), "seed": seed} for png, seed in zip(images, seeds)],
                "preset": req.preset, "steps": req.steps, "size": req.size}


def pixel_difference(a_b64: str, b_b64: str) -> float:
    """Mean absolute difference of two images' RGB pixels (0-255); 255 when their sizes differ."""
    import io

    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB"), dtype=np.int16)
            for x in (a_b64, b_b64))
    return 255.0 if a.shape != b.shape else float(np.abs(a - b).mean())
