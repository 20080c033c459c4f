"""The `Agents` Serve deployment: agent runs whose model steps share batched passes.

Each request is one run (serve_app/agents/loop.py) on this replica's event loop. A run's
model step queues its conversation in a CoalescingRunner: the steps of every session
that is waiting for the model go into the next batched `generate` call, while sessions
waiting for tools (async, off the model's thread) do not hold the model up. Serve's
max_ongoing_requests caps the concurrent runs; a run cancelled by its caller (disconnect,
deadline) frees its slot and drops its queued step.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

from ray import serve

from serve_app.agents.loop import run_agent
from serve_app.agents.tools import (CalculatorArgs, FetchArgs, RetrieveArgs, ScratchpadArgs, Session, Tool, calculator,
                                    make_fetch, make_retrieve, scratchpad)
from serve_app.config import AgentsConfig
from serve_app.contracts import DeadlinePassed
from serve_app.inference.coalesce import CoalescingRunner
from serve_app.workloads.replica import WorkloadReplica


@serve.deployment(name="Agents")
class Agents(WorkloadReplica):
    def __init__(self, cfg: AgentsConfig, embeddings=None, role: str = "stable"):
        from serve_app.engines.llm import LLMEngine
        from serve_app.inference.process import EngineProcess

        build = functools.partial(EngineProcess, LLMEngine) if cfg.runtime.engine_process else LLMEngine
        super().__init__("agents", cfg, build, role)
        self.runner = CoalescingRunner(self.engine_thread, self._generate_pass, max_items=cfg.batching.max_batch_sessions)
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
                vectors, _ = await self.embeddings.embed.remote(texts)
                return vectors

            tools["retrieve"] = Tool("retrieve", RetrieveArgs, make_retrieve(embed), t.retrieve.timeout_s,
                                     t.retrieve.retries)
        fetch = t.http_fetch
        tools["http_fetch"] = Tool("http_fetch", FetchArgs, make_fetch(fetch.allowed_hosts, fetch.max_bytes),
                                   fetch.timeout_s, fetch.retries)
        return {name: tools[name] for name in cfg.tools.offered(embeddings=self.embeddings is not None)}

    def _generate_pass(self, conversations: list[list[dict]]):
        """One batched model call for the sessions waiting, on the engine thread, measured."""
        generations, seconds = self.model_call(self.engine.generate, conversations)
        self.metrics.record_pass(seconds, len(conversations), sessions=len(conversations),
                                 tokens=sum(g.completion_tokens for g in generations))
        return (generations,)

    async def _step(self, conversation: list[dict], deadline: float):
        (generations,) = await self.runner.run([conversation], deadline)
        self.steps += 1
        return generations[0]

    async def run(self, task: str, tool_names: list[str], documents: list[str], max_steps: int,
                  deadline: Optional[float] = None) -> dict:
        """One agent run -> {"answer", "finish", "steps", "usage"}; DeadlinePassed past `deadline`."""
        deadline = deadline if deadline is not None else time.time() + 60
        if time.time() >= deadline:
            raise DeadlinePassed()
        tools = [self.tools[name] for name in tool_names if name in self.tools]
        with self.load.track():
            result = await run_agent(task, tools, Session(documents=list(documents)),
                                     functools.partial(self._step, deadline=deadline), max_steps, deadline)
        self.runs += 1
        return result.as_dict()

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
        return {"runs": self.runs, "in_flight": self.load.in_flight, "model_steps": self.steps, "model_calls": self.runner.passes,
                "largest_batch": self.runner.largest_pass, "expired": self.runner.expired, "tools": sorted(self.tools)}

    def info(self) -> dict:
        return {**self.engine_info, "tools": sorted(self.tools)}
