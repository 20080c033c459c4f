"""What a workload replica needs of its model: one small interface, whether the engine runs
in the replica's process or in a child process (serve_app/inference/process.py).

Lifecycle: the constructor builds the engine (loads, checks and warms up the model) on
the replica's engine thread; then `probe()` is the health check's cheapest real call,
`info()` what /info shows (fixed once started), `gpu_usage()` what the gauges show, and
`close()` frees the model when the replica stops. The work itself is `encode`
(EncodingEngine) or `generate` (GeneratingEngine). Everything is a method, never an
attribute read, so a child-process host can forward each one as it is.
"""

from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from typing import Any

from serve_app.inference.gpu import gpu_usage


class Engine(ABC):
    """An engine sets `torch` (the module) and `device` when it builds its model, and names in
    `FREES` the attributes that hold the model's memory."""

    torch: Any
    device: str
    FREES: tuple[str, ...] = ()

    @abstractmethod
    def probe(self) -> None:
        """The cheapest real call through the model: a wedged model fails it."""

    @abstractmethod
    def info(self) -> dict:
        """The model, its weights' digest, device and settings, for /info."""

    def gpu_usage(self) -> dict[int, tuple[int, float | None]]:
        """This process's memory and utilisation per GPU ({} without CUDA): call it where the model runs."""
        return gpu_usage(self.torch)

    def close(self) -> None:
        """Free the model: its attributes go, and on CUDA the cached blocks go back to this
        replica's share. Safe from any thread; a call still running keeps what it holds and
        may fail; later calls fail."""
        for name in self.FREES:
            self.__dict__.pop(name, None)
        gc.collect()
        if getattr(self, "device", None) == "cuda":
            self.torch.cuda.empty_cache()


class EncodingEngine(Engine):
    @abstractmethod
    def encode(self, texts: list[str], caps=None) -> tuple:
        """(vectors [n, dim], token counts [n]) for `texts`, in order."""


class GeneratingEngine(Engine):
    @abstractmethod
    def generate(self, *args) -> list:
        """One batched call: one output per input, in order."""


class UnloadedEngine(Engine):
    """A rollout's candidate whose model did not load. Its replica stays up, since a candidate
    must not take the miner down, and every call fails with the reason, so the rollout rolls it
    back while stable serves."""

    torch = None
    device = "cpu"

    def __init__(self, model_id: str, error: str):
        self.model_id, self.error = model_id, error

    def probe(self) -> None:
        pass  # nothing to probe; the replica is healthy as an empty shell

    def info(self) -> dict:
        return {"model": self.model_id, "weights_sha256": "not-loaded", "device": "cpu", "status": "failed_to_load",
                "error": self.error}

    def gpu_usage(self) -> dict:
        return {}

    def encode(self, *args, **kwargs):
        raise RuntimeError(f"the candidate model did not load: {self.error}")

    generate = encode
