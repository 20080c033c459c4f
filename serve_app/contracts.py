"""What the router side (protocols, the request pipeline, the agent loop) and the workload
side (workloads and engines) exchange. Cheap to import: no torch, no Serve."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class DeadlinePassed(Exception):
    """The caller's deadline passed before its work was done: it was dropped before it reached the model,
    or the model stopped it part way (the diffusion engine, between steps)."""


@dataclass(frozen=True)
class ImageJob:
    prompt: str
    seed: int
    negative_prompt: str = ""
    deadline: Optional[float] = None  # time.time(); None: no deadline (warm-up, health probe)


@dataclass(frozen=True)
class RenderSpec:
    """What one pipeline call shares: only images with equal specs are batched together."""

    preset: str
    steps: int
    width: int
    height: int

    @property
    def work(self) -> int:
        """Pixel-steps of one image: what an image of this spec costs, roughly."""
        return self.width * self.height * self.steps


@dataclass(frozen=True)
class StepRequest:
    """One session's model step for the continuous batch (serve_app/engines/llm.py `decode`)."""

    key: int  # the caller's id for the step, unique among those in the batch
    messages: list
    grammar: Optional[str] = None  # the action's JSON schema text (serve_app/agents/grammar.py); None: free text
    max_new_tokens: Optional[int] = None  # None: the engine's


@dataclass(frozen=True)
class Generation:
    """One conversation's next message from the language model."""

    text: str
    prompt_tokens: int
    completion_tokens: int
