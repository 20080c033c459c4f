"""OpenAI-compatible text-to-image: POST /v1/images/generations (in progress: not routed yet).

Beyond OpenAI's fields: `seed` (validators re-run and compare bytes), `preset` (one of the
model's presets) and `negative_prompt`. Each image in the answer carries its seed, so a
request sent without one can still be reproduced.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import DiffusionConfig
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
    negative_prompt: str = ""
    model: Optional[str] = None
    user: Optional[str] = None


class OpenAIImages:
    workload = "diffusion"
    request_model = ImagesRequest
    idempotent = True  # a seeded image: the same bytes again, no side effect

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg

    def parse(self, body: bytes) -> ImagesRequest:
        req = parse_json(body, ImagesRequest)
        preset_name = req.preset or self.cfg.default_preset
        preset = self.cfg.presets.get(preset_name)
        if preset is None:
            raise limit_exceeded("preset", f"{preset_name!r} is not one of {sorted(self.cfg.presets)}")
        if req.size is not None and req.size != f"{preset.width}x{preset.height}":
            raise limit_exceeded("size", f"preset {preset_name!r} makes {preset.width}x{preset.height} images")
        if req.n > self.cfg.max_batch_images:
            raise limit_exceeded("n", f"at most {self.cfg.max_batch_images} images per request")
        for field, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if len(text) > self.cfg.max_prompt_chars:
                raise limit_exceeded(field, f"{len(text)} characters, at most {self.cfg.max_prompt_chars}")
        if not req.prompt.strip():
            raise limit_exceeded("prompt", "an empty prompt")
        seed = req.seed if req.seed is not None else secrets.randbelow(MAX_SEED - req.n)
        if seed + req.n - 1 > MAX_SEED:
            raise limit_exceeded("seed", f"seed + n - 1 must not exceed {MAX_SEED}")
        return req.model_copy(update={"preset": preset_name, "seed": seed})

    def seeds(self, req: ImagesRequest) -> list[int]:
        """Image i of a request uses seed + i: each image reproducible on its own."""
        return [req.seed + i for i in range(req.n)]

    async def run(self, req: ImagesRequest, handle, deadline: float, degradable: bool) -> dict:
        seeds = self.seeds(req)
        images = await handle.generate.remote(req.prompt, req.negative_prompt, seeds, req.preset, deadline)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode(), "seed": seed} for png, seed in zip(images, seeds)]}
