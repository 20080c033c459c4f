"""The `Agents` Serve deployment: agent runs whose model steps share one running batch.

Each request is one run (serve_app/agents/loop.py) on this replica's event loop. A run's
model step goes to the ContinuousRunner (serve_app/inference/continuous.py): it joins the
batch the engine is decoding and leaves it as soon as its action is complete, while
sessions waiting for tools (async, off the model's thread) do not hold the model up.
Serve's max_ongoing_requests caps the concurrent runs; a run cancelled by its caller
(disconnect, deadline) frees its slot and its row in the batch. `run_stream` is the same
run, yielding each step as it happens (Server-Sent Events at the router).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import AsyncIterator, Optional

from ray import serve

from serve_app.agents.loop import run_agent
from serve_app.agents.tools import (CalculatorArgs, FetchArgs, RetrieveArgs, ScratchpadArgs, Session, Tool, calculator,
                                    make_fetch, make_retrieve, scratchpad)
from serve_app.config import AgentsConfig
from serve_app.contracts import DeadlinePassed
from serve_app.inference.continuous import ContinuousRunner
from serve_app.workloads.replica import WorkloadReplica


@serve.deployment(name="Agents")
class Agents(WorkloadReplica):
    def __init__(self, cfg: AgentsConfig, embeddings=None, role: str = "stable"):
        if cfg.engine == "vllm":  # GPU hosts: vLLM batches and constrains on its own (serve_app/engines/vllm_engine.py)
            from serve_app.engines.vllm_engine import VLLMEngine, VLLMStepRunner

            super().__init__("agents", cfg, functools.partial(VLLMEngine, loop=asyncio.get_event_loop()), role)
            self.runner = VLLMStepRunner(self.engine, max_rows=cfg.batching.max_batch_sessions)
        else:
            from serve_app.engines.llm import LLMEngine
            from serve_app.inference.process import EngineProcess

            build = functools.partial(EngineProcess, LLMEngine) if cfg.runtime.engine_process else LLMEngine
            super().__init__("agents", cfg, build, role)
            self.runner = ContinuousRunner(self.engine_thread, self._decode_call,
                                           max_rows=cfg.batching.max_batch_sessions, mode=cfg.batching.scheduling)
        self.embeddings = embeddings
        self.tools = self._tools(cfg)
        self.runs = 0
        self.steps = 0

    def _tools(self, cfg: AgentsConfig) -> dict[str, Tool]:
        t = cfg.tools
        tools = {"calculator": Tool("calculator", CalculatorArgs, calculator, t.calculator.timeout_s, t.calculator.retries),
                 "scratchpad": Tool("scratchpad", ScratchpadArgs, scratchpad, t.scratchpad.timeout_s, t.scratchpad.retries)}
        if self.embeddings is not None:
            async def embed(texts: list[str]):
                # Counted in the embeddings' admission at the routers (Embeddings.outside_work).
                vectors, _ = await self.embeddings.embed_for_tool.remote(texts)
                return vectors

            tools["retrieve"] = Tool("retrieve", RetrieveArgs, make_retrieve(embed), t.retrieve.timeout_s,
                                     t.retrieve.retries)
        fetch = t.http_fetch
        tools["http_fetch"] = Tool("http_fetch", FetchArgs, make_fetch(fetch.allowed_hosts, fetch.max_bytes),
                                   fetch.timeout_s, fetch.retries)
        return {name: tools[name] for name in cfg.tools.offered(embeddings=self.embeddings is not None)}

    def _decode_call(self, joins, cancels, iterations: int) -> dict:
        """One engine call of the running batch, on the engine thread, measured."""
        out, seconds = self.model_call(self.engine.decode, joins, cancels, iterations)
        self.metrics.record_pass(seconds, self.runner.running, sessions=len(out["finished"]), tokens=out["tokens"])
        return out

    async def _step(self, conversation: list[dict], grammar: Optional[str], deadline: float):
        generation = await self.runner.run(conversation, grammar, deadline=deadline)
        self.steps += 1
        return generation

    def _start(self, task: str, tool_names: list[str], documents: list[str], max_steps: int,
               deadline: Optional[float], on_step=None):
        deadline = deadline if deadline is not None else time.time() + 60
        if time.time() >= deadline:
            raise DeadlinePassed()
        tools = [self.tools[name] for name in tool_names if name in self.tools]
        return run_agent(task, tools, Session(documents=list(documents)),
                         functools.partial(self._step, deadline=deadline), max_steps, deadline, on_step=on_step)

    async def run(self, task: str, tool_names: list[str], documents: list[str], max_steps: int,
                  deadline: Optional[float] = None) -> dict:
        """One agent run -> {"answer", "finish", "steps", "usage"}; DeadlinePassed past `deadline`."""
        run = self._start(task, tool_names, documents, max_steps, deadline)
        with self.load.track():
            result = await run
        self.runs += 1
        return result.as_dict()

    async def run_stream(self, task: str, tool_names: list[str], documents: list[str], max_steps: int,
                         deadline: Optional[float] = None) -> AsyncIterator[tuple[str, dict]]:
        """The run as events: ("step", step) as each step is recorded, then ("answer", the
        run's result without its steps) or ("error", {"code", "message"}) if the deadline
        passes. Closing the stream (the caller hung up) cancels the run and its model step."""
        events: asyncio.Queue = asyncio.Queue()
        try:
            run = self._start(task, tool_names, documents, max_steps, deadline, on_step=events.put_nowait)
        except DeadlinePassed:
            yield "error", {"code": "deadline_exceeded", "message": "the deadline passed before the run started"}
            return
        with self.load.track():
            task_ = asyncio.ensure_future(run)
            try:
                while True:
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, task_}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield "step", getter.result()
                        continue
                    getter.cancel()
                    while not events.empty():
                        yield "step", events.get_nowait()
                    break
                try:
                    result = task_.result()
                except DeadlinePassed:
                    yield "error", {"code": "deadline_exceeded", "message": "the run's deadline passed"}
                    return
                self.runs += 1
                final = result.as_dict()
                final.pop("steps")
                yield "answer", final
            finally:
                if not task_.done():
                    task_.cancel()

    async def try_tool(self, name: str, args: dict, documents: list[str] = ()) -> dict:
        """Run one tool as a run would, outside any run: for operators checking that each tool
        works in the deployed miner (the embeddings reachable, fetch hosts answering)."""
        from serve_app.agents.tools import ToolError, run_tool

        if name not in self.tools:
            return {"error": f"tool {name!r} is not offered; offered: {sorted(self.tools)}"}
        try:
            return {"result": await run_tool(self.tools[name], args, Session(documents=list(documents)))}
        except ToolError as exc:
            return {"error": str(exc)}

    def stats(self) -> dict:
        return {"runs": self.runs, "in_flight": self.load.in_flight, "model_steps": self.steps,
                "engine_calls": self.runner.passes, "forward_passes": self.runner.forward_passes,
                "tokens_decoded": self.runner.tokens, "largest_batch": self.runner.largest_pass,
                "expired": self.runner.expired, "scheduling": self.runner.mode, "tools": sorted(self.tools)}

    def info(self) -> dict:
        return {**self.engine_info, "tools": sorted(self.tools)}
