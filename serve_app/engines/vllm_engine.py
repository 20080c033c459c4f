"""The agents' model on vLLM (workloads.agents.engine: vllm), for GPU hosts.

vLLM's own engine does what serve_app/engines/llm.py does for transformers: continuous
batching (a step joins the running batch and leaves when done) and constrained decoding
(structured outputs, xgrammar by default) under the same action grammar
(serve_app/agents/grammar.py). So on vLLM the Agents replica hands each step straight to
vLLM's AsyncLLM on its event loop; `VLLMStepRunner` has the ContinuousRunner's surface
(`run`, `queued_items`, `idle`, counters) so the workload and its metrics do not change.
vLLM runs in the replica's process on the GPU share Serve gave it
(placement.gpu_memory_fraction becomes vLLM's gpu_memory_utilization).

Not needed on CPU: `pip install torchrank-miner[vllm]` on the GPU host (vLLM brings its own
CUDA torch). Not run on this project's CPU machine: tests/engines/test_vllm_engine.py skips
without vllm and a GPU.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Optional

from serve_app.config import AgentsConfig
from serve_app.contracts import DeadlinePassed, Generation
from serve_app.engines.base import Engine
from serve_app.engines.llm import resolve_model_path
from serve_app.engines.weights import weights_digest


def sampling_params(max_new_tokens: int, grammar: Optional[str]):
    """Greedy, as the transformers engine; the grammar through vLLM's structured outputs
    (`structured_outputs` from vLLM 0.10, `guided_decoding` before)."""
    from vllm import SamplingParams

    kwargs = {"temperature": 0.0, "max_tokens": max_new_tokens}
    if grammar is not None:
        try:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(json=grammar)
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            kwargs["guided_decoding"] = GuidedDecodingParams(json=grammar)
    return SamplingParams(**kwargs)


class VLLMEngine(Engine):
    """vLLM's AsyncLLM for the replica. Built on the engine thread like any engine; its calls
    run on the replica's event loop (`loop`), where AsyncLLM's output handler lives."""

    FREES = ("llm",)

    def __init__(self, cfg: AgentsConfig, num_threads: int = 1, loop: Optional[asyncio.AbstractEventLoop] = None):
        import torch

        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise RuntimeError(f"workloads.agents.engine: vllm needs vLLM on a GPU host ({exc}): "
                               "`.venv/bin/pip install -e '.[vllm]'`, or engine: transformers") from None

        self.torch, self.device, self.loop = torch, "cuda", loop
        path = resolve_model_path(cfg.model.id, cfg.runtime.cache_dir)
        self.model_id, self.max_new_tokens = cfg.model.id, cfg.model.max_new_tokens
        self.memory_cap = cfg.placement.memory_cap or 0.9
        self.weights_sha256 = weights_digest(path)
        self.dtype = "float16" if cfg.runtime.fp16 else "bfloat16"
        args = AsyncEngineArgs(model=path, dtype=self.dtype, gpu_memory_utilization=self.memory_cap,
                               max_num_seqs=cfg.batching.max_batch_sessions, seed=0, enforce_eager=False)
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = None  # read on the loop at the first step (get_tokenizer is a coroutine in vLLM 0.10+)

    async def prompt(self, messages: list[dict]) -> str:
        if self.tokenizer is None:
            tokenizer = self.llm.get_tokenizer()
            self.tokenizer = await tokenizer if asyncio.iscoroutine(tokenizer) else tokenizer
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def probe(self) -> None:
        """One real token through vLLM, from the engine thread onto the replica's loop."""
        async def one_token():
            async for _ in self.llm.generate(await self.prompt([{"role": "user", "content": "health"}]),
                                             sampling_params(1, None), request_id=f"probe-{time.monotonic_ns()}"):
                pass

        asyncio.run_coroutine_threadsafe(one_token(), self.loop).result(timeout=20)

    def info(self) -> dict:
        return {"model": self.model_id, "weights_sha256": self.weights_sha256, "device": self.device,
                "gpu_memory_fraction": self.memory_cap, "engine": "vllm", "constrained_decoding": "vllm structured outputs",
                "dtype": self.dtype, "max_new_tokens": self.max_new_tokens}

    def close(self) -> None:
        llm = self.__dict__.get("llm")
        if llm is not None:
            llm.shutdown()
        super().close()


class VLLMStepRunner:
    """The ContinuousRunner's surface over vLLM: each step is one vLLM request; a caller that
    goes away or runs out of time aborts it."""

    mode = "continuous"

    def __init__(self, engine: VLLMEngine, max_rows: int):
        self.engine, self.max_rows = engine, max_rows
        self._ids = itertools.count()
        self.running = 0
        self.passes = self.forward_passes = self.tokens = self.largest_pass = self.expired = 0
        self.busy_s = 0.0

    @property
    def queued_items(self) -> int:
        return max(0, self.running - self.max_rows)  # vLLM queues past max_num_seqs

    @property
    def idle(self) -> bool:
        return self.running == 0

    async def run(self, messages: list[dict], grammar: Optional[str] = None, max_new_tokens: Optional[int] = None,
                  deadline: Optional[float] = None) -> Generation:
        request_id = f"step-{next(self._ids)}"
        params = sampling_params(max_new_tokens or self.engine.max_new_tokens, grammar)
        self.running += 1
        self.largest_pass = max(self.largest_pass, self.running)
        started = time.perf_counter()
        try:
            prompt = await self.engine.prompt(messages)
            final = None

            async def decode():
                nonlocal final
                async for output in self.engine.llm.generate(prompt, params, request_id=request_id):
                    final = output

            timeout = None if deadline is None else max(0.0, deadline - time.time())
            try:
                await asyncio.wait_for(decode(), timeout)
            except asyncio.TimeoutError:
                self.expired += 1
                raise DeadlinePassed() from None
        except BaseException:
            await self.engine.llm.abort(request_id)
            raise
        finally:
            self.running -= 1
            self.busy_s += time.perf_counter() - started
        completion = final.outputs[0]
        tokens = len(completion.token_ids)
        self.passes += 1
        self.forward_passes += tokens
        self.tokens += tokens
        return Generation(completion.text, len(final.prompt_token_ids or ()), tokens)
