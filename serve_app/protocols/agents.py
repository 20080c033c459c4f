"""Agent runs: POST /v1/agents/runs.

    {"task": str, "tools": [names], "max_steps"?: int, "documents"?: [str], "stream"?: bool}
 -> {"answer": str | null, "finish": "answer" | "max_steps",
     "steps": [{"tool", "args", "result" | "error", "ms"}], "usage": {...}}

With "stream": true the answer is Server-Sent Events (text/event-stream): one `step` event
per step as it ends ({"tool", "args", "result" | "error", "ms"}), then `answer` ({"answer",
"finish", "usage"}) or `error` ({"code", "message"}: the deadline passed, the workload
went away). Refusals before the run starts (auth, limits, admission) stay JSON errors.

The tools a request may name are those this miner offers (GET /info lists them); the
model sees only the ones the request allows.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from serve_app.config import AgentsConfig
from serve_app.protocols.base import limit_exceeded, no_agreement, parse_json


class AgentRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str
    tools: list[str] = Field(default_factory=list, description="Tool names the agent may call.")
    max_steps: Optional[int] = Field(default=None, ge=1)
    documents: list[str] = Field(default_factory=list, description="Texts the retrieve tool searches.")
    stream: bool = Field(default=False, description="Answer with Server-Sent Events, one per step.")


class AgentRuns:
    workload = "agents"
    request_model = AgentRunRequest
    idempotent = True  # greedy decoding, session-local tools: a re-run gives the same answer

    @classmethod
    def for_subnet(cls, cfg, subnet) -> "AgentRuns":
        return cls(cfg.workloads.agents, embeddings=cfg.workloads.embeddings is not None)

    def __init__(self, cfg: AgentsConfig, embeddings: bool):
        self.cfg = cfg
        self.tools = cfg.tools.offered(embeddings)

    def parse(self, body: bytes) -> AgentRunRequest:
        req = parse_json(body, AgentRunRequest)
        cfg = self.cfg
        if not req.task.strip():
            raise limit_exceeded("task", "an empty task")
        if len(req.task) > cfg.limits.max_task_chars:
            raise limit_exceeded("task", f"{len(req.task)} characters, at most {cfg.limits.max_task_chars}")
        unknown = [name for name in req.tools if name not in self.tools]
        if unknown:
            raise limit_exceeded("tools", f"{unknown} not offered here; available: {self.tools}")
        steps = req.max_steps if req.max_steps is not None else cfg.limits.default_max_steps
        if steps > cfg.limits.max_steps:
            raise limit_exceeded("max_steps", f"{steps}, at most {cfg.limits.max_steps}")
        if len(req.documents) > cfg.limits.max_documents:
            raise limit_exceeded("documents", f"{len(req.documents)} documents, at most {cfg.limits.max_documents}")
        for i, doc in enumerate(req.documents):
            if len(doc) > cfg.limits.max_document_chars:
                raise limit_exceeded(f"documents[{i}]", f"{len(doc)} characters, at most {cfg.limits.max_document_chars}")
        return req.model_copy(update={"max_steps": steps, "tools": list(dict.fromkeys(req.tools))})

    def cost(self, req: AgentRunRequest) -> float:
        return 1.0  # one session

    agreement = staticmethod(no_agreement)  # runs differ in wording: a rollout judges errors, step limits, speed

    @staticmethod
    def unfinished(answer: dict) -> bool:
        return answer.get("finish") == "max_steps"

    async def run(self, req: AgentRunRequest, handle, deadline: float, degradable: bool) -> dict:
        return await handle.run.remote(req.task, req.tools, req.documents, req.max_steps, deadline)

    @staticmethod
    def streams(req: AgentRunRequest) -> bool:
        return req.stream

    def stream(self, req: AgentRunRequest, handle, deadline: float):
        """The run's events, (name, data) pairs: a Serve response generator."""
        return handle.options(stream=True).run_stream.remote(req.task, req.tools, req.documents, req.max_steps,
                                                             deadline)
